"""``build_loader(cfg, split, rank, world_size)``: batches of (images, labels) from our shards, on any backend
(``conv2former.data.base.ShardLoader`` describes what every loader does)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Tuple

import torch

from conv2former.config import DataConfig
from conv2former.data.base import ShardLoader
from conv2former.data.shards import open_split
from conv2former.data.size_schedule import SizeSchedule
from conv2former.errors import UserError

BACKENDS = ("dali-gpu", "dali-cpu", "torch")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    if name == "auto":
        if dali_available():
            return "dali-gpu" if torch.cuda.is_available() else "dali-cpu"
        return "torch"
    if name not in BACKENDS:
        raise UserError(f"unknown data backend {name!r}: choose auto, {', '.join(BACKENDS)}")
    if name.startswith("dali") and not dali_available():
        raise UserError(
            f"backend {name} needs NVIDIA DALI: pip install '.[dali]' (nvidia-dali-cuda120), or use --backend torch"
        )
    if name == "dali-gpu" and not torch.cuda.is_available():
        raise UserError(
            "backend dali-gpu needs a CUDA GPU and none is visible: use --backend dali-cpu or --backend torch"
        )
    return name


def build_loader(
    cfg: DataConfig,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    device: Optional[torch.device] = None,
    train: Optional[bool] = None,
    sizes: Optional[SizeSchedule] = None,
) -> ShardLoader:
    """Batches of ``split`` for ``rank`` of ``world_size``; ``train`` defaults to ``split == "train"``; ``sizes``:
    the training crop size per epoch (progressive resizing)."""
    backend = resolve_backend(cfg.backend)
    train = split == "train" if train is None else train
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "dali-gpu" else torch.device("cpu")
    shards = open_split(
        cfg.root,
        split,
        cfg.cache_dir,
        keep_missing=bool(cfg.skip_bad_shards) and train,
        cache_limit=cfg.cache_limit,
        cache_workers=cfg.fetch_workers,
    )
    if backend == "torch":
        from conv2former.data.torch_loader import TorchLoader

        return TorchLoader(cfg, shards, train, rank, world_size, device, sizes)
    from conv2former.data.dali_loader import DaliLoader

    return DaliLoader(cfg, shards, train, rank, world_size, device, gpu=backend == "dali-gpu", sizes=sizes)


def first_eval_images(cfg: DataConfig, split: str, count: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the first ``count`` samples of ``split`` through the eval transform of ``cfg``,
    on one CPU process with the torch backend (padding dropped): what the analyses and the ONNX check look at."""
    cfg = dataclasses.replace(cfg, backend="torch", workers=0)
    taken = 0
    for images, labels in build_loader(cfg, split, 0, 1, torch.device("cpu"), train=False):
        keep = labels >= 0
        images, labels = images[keep][: count - taken], labels[keep][: count - taken]
        taken += len(images)
        if len(images):
            yield images.contiguous(memory_format=torch.contiguous_format), labels
        if taken >= count:
            return
