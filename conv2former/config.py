"""Typed configuration of the pipeline: dataclasses, filled from a stage's YAML defaults, ``--config FILE`` and
``--set a.b=value`` overrides (later wins). Unknown keys and impossible values are one-line ``UserError``s."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from conv2former.errors import UserError


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
    channels_last: Optional[bool] = None  # batches in channels_last memory format; None: on GPU only
    cache_dir: Optional[str] = None   # local cache for remote shards (DALI reads local files)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    variant: str = "conv2former_l"
    drop_path_rate: float = 0.1
    kernel_size: Optional[int] = None
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    base_lr: float = 1e-3             # lr = base_lr * global_batch / 1024 (paper, section 4.1)
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0            # 0 = no clipping (the paper's setting)
    layer_decay: Optional[float] = None


@dataclass
class ScheduleConfig:
    epochs: int = 90
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    max_steps: Optional[int] = None   # stop early without changing the schedule
    global_batch: int = 4096
    eval_every_epochs: int = 1


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    bf16: bool = True                 # on GPU; CPU runs are fp32
    overlap_comm: bool = True         # reduce gradients during the backward pass (DeepSpeed's default: ZeRO-3 only)


@dataclass
class CheckpointConfig:
    save_every: int = 1000            # steps; and at each epoch end
    keep_last: int = 3


@dataclass
class LoggingConfig:
    print_every: int = 20


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    output: str = "runs/default"
    seed: int = 0
    ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = False          # timm's EMA warmup (decay ramps up from 0): for short runs, so BN stats catch up
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_dict(cfg: Any) -> Dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(out)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin in (tuple, Tuple, list, List):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise UserError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def apply_overrides(cfg: Any, values: Dict[str, Any], prefix: str = "") -> None:
    """Set nested fields from a (possibly nested) dict; unknown keys are errors naming the valid ones."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            apply_overrides(current, value, f"{where}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], where))


def parse_set(items: Sequence[str]) -> Dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict with YAML-parsed values."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set optim.base_lr=2e-3")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data
