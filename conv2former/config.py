"""Typed configuration of the pipeline: dataclasses, filled from a stage's YAML defaults, ``--config FILE`` and
``--set a.b=value`` overrides (later wins). Unknown keys and impossible values are one-line ``UserError``s."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from conv2former.errors import UserError


@dataclass
class AugmentConfig:
    """Training augmentation. Per-sample ops run in the loader; Mixup/CutMix and random erasing on the device batch."""

    randaugment: bool = True  # RandAugment n=2, m=9 (timm "rand-m9-mstd0.5-inc1" in the torch backend)
    randaugment_n: int = 2  # ops per image
    randaugment_m: int = 9  # magnitude (of 10)
    hflip: float = 0.5  # horizontal flip probability
    scale: Tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1  # applied to the (mixed) one-hot targets
    random_erasing: float = 0.25  # probability of timm's RandomErasing per image (pixel mode)


@dataclass
class DataConfig:
    """Where the shards are and how batches are made. ``batch_size`` is per rank (the micro-batch)."""

    root: str = ""  # shard root holding _info.json, train/, val/ (any fsspec URL)
    backend: str = "auto"  # auto | dali-gpu | dali-cpu | torch
    image_size: int = 224  # training and evaluation input side, pixels (with size_schedule: the final size)
    size_schedule: Tuple[Tuple[float, float], ...] = ()  # progressive resizing: [[fraction of the run, px], ...]
    size_schedule_mode: str = "step"  # step: each size from its fraction on | linear: FFCV's ramp (32-px steps)
    size_schedule_regularization: Optional[float] = None  # augment strength at the smallest size (EfficientNetV2)
    size_schedule_scale_batch: bool = False  # micro-batch grows with 1/area at low sizes (same global batch)
    batch_size: Union[int, str] = 32  # micro-batch per rank (training); auto: the largest that fits (memory_budget)
    memory_budget: Optional[str] = None  # what batch_size=auto plans for per rank, e.g. 80GiB; None: the GPU's total
    eval_batch_size: Optional[int] = None  # per rank; None: batch_size
    workers: int = 4  # DALI threads, or DataLoader workers
    hw_decoder_load: float = 0.65  # dali-gpu train: share of JPEGs for the GPU hardware decoder (A100/H100)
    seed: Optional[int] = None  # shard order and augmentation draws; None: the run's top-level seed
    shuffle_buffer: int = 4096  # per-rank sample shuffle buffer (in addition to the per-epoch shard order)
    crop_pct: float = 0.875  # eval: resize the shorter side to image_size / crop_pct, then center crop
    crop_mode: str = "center"  # eval: center | squash (resize to image_size x image_size, no crop)
    mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # normalisation mean (RGB, 0-1 scale)
    std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD  # normalisation std (RGB, 0-1 scale)
    channels_last: Optional[bool] = None  # batches in channels_last memory format; None: on GPU only
    cache_dir: Optional[str] = None  # node-local cache of remote shards, shared by the node's ranks (~/.cache/...)
    cache_limit: Optional[str] = None  # that cache's bound, e.g. 200GB = 200e9 bytes (unused shards, LRU first)
    fetch_workers: int = 8  # parallel downloads per rank from a remote root
    skip_bad_shards: bool = False  # a shard unreadable mid-epoch: skip it with a warning (True) or stop (exit 6)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation

    def micro_batch(self) -> int:
        """``batch_size`` as a number (``auto`` is resolved into ``ResolvedRun.micro_batch``: engine/run.py)."""
        if isinstance(self.batch_size, int) and self.batch_size > 0:
            return self.batch_size
        if self.batch_size == "auto":
            raise UserError("data.batch_size=auto is decided by the training launchers; give a number here")
        raise UserError(f"data.batch_size: expected a positive integer or auto, got {self.batch_size!r}")

    def validate(self) -> None:
        """This section's own checks (one-line errors): the shard root, the batch size, the backend's name, the
        size schedule, the byte sizes."""
        from conv2former.data.loader import BACKENDS
        from conv2former.units import parse_bytes

        if not self.root:
            raise UserError("no data given: pass --data DIR_OR_URL (a shard root made by data_prep/shard.py)")
        if self.batch_size != "auto":
            self.micro_batch()
        if self.backend not in ("auto", *BACKENDS):
            raise UserError(f"unknown data backend {self.backend!r}: choose auto, {', '.join(BACKENDS)}")
        self.size_schedule_of(1)
        parse_bytes(self.memory_budget, "data.memory_budget")
        parse_bytes(self.cache_limit, "data.cache_limit")

    def size_schedule_of(self, epochs: int) -> Any:
        """The training crop size of each epoch (``SizeSchedule``; checked) over a run of ``epochs``."""
        from conv2former.data.size_schedule import SizeSchedule

        return SizeSchedule.from_config(
            self.size_schedule, self.size_schedule_mode, epochs, self.image_size, self.size_schedule_regularization,
            self.size_schedule_scale_batch,
        )  # fmt: skip


@dataclass
class ModelConfig:
    variant: str = "conv2former_l"  # a registered timm name (the launchers' --variant takes short names)
    drop_path_rate: float = 0.1  # stochastic depth at the last block (linear over depth)
    kernel_size: Optional[int] = None  # modulation kernel; None: the variant's own (11, or 7 for n and b_22k)
    grad_checkpointing: bool = False  # per-block activation checkpointing (memory for compute)
    compile: bool = False  # torch.compile the DeepSpeed engine

    def create_kwargs(self, num_classes: int) -> Dict[str, Any]:
        """``timm.create_model(variant, **these)``: what every builder of this run's network passes (the engine, the
        dry run, the memory planner, evaluation, the fine-tune's checks)."""
        kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=self.drop_path_rate)
        if self.kernel_size:
            kwargs["kernel_size"] = self.kernel_size
        return kwargs


@dataclass
class CpuConfig:
    """CPU runs only (conv2former/cpu): a GPU run installs none of it."""

    depthwise: str = "measure"  # measure | fixed | off: how depthwise convolutions choose their formulation
    depthwise_cache: Optional[str] = None  # JSON file keeping measured choices between runs (per processor)
    keep_freed_memory: bool = True  # malloc reuses freed memory (no page faults each step)


@dataclass
class OptimConfig:
    base_lr: float = 1e-3  # lr = base_lr * global_batch / 1024 (paper, section 4.1)
    weight_decay: float = 0.05  # AdamW decoupled decay; none on 1-D parameters (norms, biases, layer scales)
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 0.0  # 0 = no clipping (the paper's setting)
    layer_decay: Optional[float] = None  # layer-wise lr decay (fine-tuning: 0.8); None: off


@dataclass
class ScheduleConfig:
    epochs: int = 90  # the schedule's length
    warmup_epochs: float = 5.0  # linear warmup, per optimizer step
    min_lr: float = 1e-6  # the cosine schedule's floor
    max_steps: Optional[int] = None  # stop early without changing the schedule
    global_batch: int = 4096  # images per optimizer step over all ranks (ranks x micro-batch x accumulation)
    eval_every_epochs: int = 1  # evaluate every N epochs (and at the end)

    def validate(self) -> None:
        if self.epochs <= 0:
            raise UserError(f"schedule.epochs must be positive, got {self.epochs}")
        if self.global_batch <= 0:
            raise UserError(f"schedule.global_batch must be positive, got {self.global_batch}")
        if self.eval_every_epochs <= 0:
            raise UserError(f"schedule.eval_every_epochs must be positive, got {self.eval_every_epochs}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto: bf16 on GPU, fp32 on CPU (engine/precision.py)
    grad_accum_dtype: str = "fp32"  # fp32 | model: how bf16/fp16 gradients add up over micro-batches (ZeRO 1-3)
    communication_data_type: Optional[str] = None  # fp32 | bf16 | fp16 for gradient reduction; None: DeepSpeed's
    fp16_initial_scale_power: int = 16  # fp16: the dynamic loss scale starts at 2**this
    overlap_comm: bool = True  # reduce gradients during the backward pass (DeepSpeed's default: ZeRO-3 only)
    timeout_minutes: float = 10.0  # collective timeout: a dead or hung rank ends the run after this (exit 5)
    rank0_work_timeout_minutes: float = 60.0  # others wait this long for rank 0's export / conversion (gloo)

    def validate(self) -> None:
        from conv2former.engine.precision import COMM_DTYPES, PRECISIONS

        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key, value, allowed in (
            ("deepspeed.precision", self.precision, PRECISIONS),
            ("deepspeed.grad_accum_dtype", self.grad_accum_dtype, ("fp32", "model")),
            ("deepspeed.communication_data_type", self.communication_data_type, (None, *COMM_DTYPES)),
        ):
            if value not in allowed:
                raise UserError(f"{key}: unknown {value!r}: choose one of {', '.join(str(a) for a in allowed)}")


@dataclass
class CheckpointConfig:
    save_every: int = 1000  # steps; and at each epoch end
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    keep_best: bool = False  # also export the best-evaluated weights to OUTPUT/export/best/ (fine-tuning: true)
    staging_dir: Optional[str] = None  # a remote --output (s3://...): node-local folder the run writes before upload


@dataclass
class GuardConfig:
    max_bad_steps: int = 1  # consecutive steps with a non-finite loss or grad norm before the run stops (exit 3)
    max_overflow_skips: int = 20  # fp16: consecutive loss-scaler skips tolerated before that counts as a bad step
    inject_nan_at: Optional[int] = None  # test aid: rank 0's loss is NaN at this optimizer step (1-based)


@dataclass
class LoggingConfig:
    print_every: int = 20  # steps between recorded training scalars
    backends: Tuple[str, ...] = ("tensorboard", "jsonl")  # also wandb, mlflow (optional extras): the same scalars
    project: str = "conv2former"  # the W&B project / MLflow experiment
    mlflow_tracking_uri: Optional[str] = None  # None: MLflow's own (MLFLOW_TRACKING_URI, or ./mlruns)

    def validate(self) -> None:
        from conv2former.engine.sinks import check_backends

        check_backends(self.backends)  # (an unknown backend, or one whose package is missing)
        if self.print_every <= 0:
            raise UserError(f"logging.print_every must be positive, got {self.print_every}")


@dataclass
class ProfileConfig:
    steps: Optional[str] = None  # A-B: a torch.profiler trace of optimizer steps A..B per rank in OUTPUT/profile/
    memory: bool = False  # with steps: allocations in the trace, and a CUDA memory snapshot on a GPU

    def validate(self) -> None:
        from conv2former.engine.profiling import parse_steps

        if self.steps:
            parse_steps(self.steps)


@dataclass
class FinetuneConfig:
    """How launch/finetune.py starts from pretrained weights (ignored by pretraining)."""

    head: str = "synset"  # synset: pretrained rows mapped by synset | reinit: a fresh head
    head_init_scale: float = 0.001  # fresh head rows: trunc-normal(0.02) x this (ConvNeXt's --head_init_scale)


@dataclass
class GpuConfig:
    """GPU runs only (conv2former/gpu_depthwise.py): a CPU run installs none of it."""

    depthwise: str = "measure"  # measure | plain | triton: how depthwise convolutions choose their formulation


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # a name for the run's logs and export tag
    output: str = "runs/default"  # run folder or fsspec URL: checkpoints/, export/, tb/, log.jsonl, summary.json
    seed: int = 0  # initial weights, dropout and (unless data.seed) the data order
    deterministic: bool = False  # the same bits run to run on a GPU (cuDNN deterministic, no benchmark; slower)
    ema: bool = False  # keep an exponential moving average of the weights (timm ModelEmaV3)
    ema_decay: float = 0.9999  # the EMA's decay per optimizer step
    ema_warmup: bool = False  # timm's EMA warmup (decay ramps up from 0): for short runs, so BN stats catch up
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)

    def validate(self) -> None:
        """Every section's own checks, then the ones across sections: the one place a config is judged (one-line
        ``UserError``s), before anything prints it or builds from it (engine/run.py ``resolve_run``)."""
        for section in (self.data, self.schedule, self.deepspeed, self.logging, self.profile):
            section.validate()
        if self.data.size_schedule_scale_batch and self.deepspeed.zero_stage == 3:
            raise UserError(
                "data.size_schedule_scale_batch changes the accumulation mid-run, which is tested with ZeRO 0-2 "
                "hooks only: use deepspeed.zero_stage 1 or 2 with it, or leave it off"
            )


def to_dict(cfg: Any) -> Dict[str, Any]:
    out = dataclasses.asdict(cfg)

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(out)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], Union[int, str]: the first type that takes the value
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return _coerce(value, option, where)
            except UserError:
                continue
        return _coerce(value, options[-1], where)
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


# keys that moved: a config or --set naming the old one is an error naming the new one (and the value to give it)
MOVED: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "model.depthwise": ("cpu.depthwise", lambda value: value),
    "model.depthwise_cache": ("cpu.depthwise_cache", lambda value: value),
    "keep_freed_memory": ("cpu.keep_freed_memory", lambda value: str(value).lower()),
    "deepspeed.bf16": ("deepspeed.precision", lambda value: "bf16" if value else "fp32"),
}


def apply_overrides(cfg: Any, values: Dict[str, Any], prefix: str = "") -> None:
    """Set nested fields from a (possibly nested) dict; unknown keys are errors naming the valid ones."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if where in MOVED:
            new, translate = MOVED[where]
            raise UserError(f"config key {where!r} is now {new!r}: use --set {new}={translate(value)}")
        if key not in names:
            raise UserError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(
                    f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}"
                )
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


def field_docs(cls: Optional[type] = None, prefix: str = "") -> Dict[str, str]:
    """``{"section.key": the comment beside its declaration above}`` for every leaf field of ``TrainConfig``."""
    import inspect
    import re

    cls = cls or TrainConfig
    source = inspect.getsource(cls)
    comments = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^\n#]*#([^\n]*)$", source, re.M)}
    hints = typing.get_type_hints(cls)
    docs: Dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
        else:
            docs[f"{prefix}{f.name}"] = comments.get(f.name, "")
    return docs


def describe_config(cfg: "TrainConfig") -> str:
    """Every field as ``key = value  # what it is``, in declaration order (the launchers' --help-config)."""
    lines = []
    for key, doc in field_docs().items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, tuple):
            value = list(value)
        lines.append(
            f"{key} = {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}"
        )
    return "\n".join(lines)
