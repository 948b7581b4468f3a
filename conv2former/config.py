"""Typed configuration of the pipeline (dataclasses; YAML files and ``--set a.b=value`` overrides build on these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@dataclass
class AugmentConfig:
    """Training augmentation. Per-sample ops run in the loader; Mixup/CutMix and random erasing on the device batch."""

    randaugment: bool = True          # RandAugment n=2, m=9 (timm "rand-m9-mstd0.5-inc1" in the torch backend)
    randaugment_n: int = 2
    randaugment_m: int = 9
    hflip: float = 0.5
    scale: Tuple[float, float] = (0.08, 1.0)         # random-resized-crop area range
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)      # random-resized-crop aspect range
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    random_erasing: float = 0.25


@dataclass
class DataConfig:
    """Where the shards are and how batches are made. ``batch_size`` is per rank (the micro-batch)."""

    root: str = ""                    # shard root holding _info.json, train/, val/ (any fsspec URL)
    backend: str = "auto"             # auto | dali-gpu | dali-cpu | torch
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    workers: int = 4                  # DALI threads, or DataLoader workers
    seed: int = 0
    shuffle_buffer: int = 4096        # per-rank sample shuffle buffer (in addition to the per-epoch shard order)
    crop_pct: float = 0.875           # eval: resize the shorter side to image_size / crop_pct, then center crop
    crop_mode: str = "center"         # eval: center | squash (resize to image_size x image_size, no crop)
    mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD
    channels_last: bool = False
    cache_dir: Optional[str] = None   # local cache for remote shards (DALI reads local files)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
