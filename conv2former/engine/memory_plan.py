"""The memory planner: what one rank's GPU holds for a config, and the largest micro-batch that fits, without a GPU.

Activations are measured, not modelled: the real model (the variant, its classes, precision, layout, activation
checkpointing) runs one forward and backward on fake tensors (``FakeTensorMode``: shapes and dtypes, no data) under
torch's ``MemTracker``, which follows every tensor's storage and reports the peak, at two micro-batches to get the
bytes per sample and the fixed part. What the optimizer keeps follows ZeRO's memory model (the ZeRO paper, as
DeepSpeed implements it): with bf16/fp16, 2 bytes per parameter of weights and 2 of gradients in the training dtype
and 12 of fp32 master weights and AdamW moments; with fp32, 4 + 4 + 8. Stage 1 shards the 12 (8) over the ranks,
stage 2 the gradients too, stage 3 the weights (and the fp32 EMA, engine/ema.py ShardedEma) too. ``RESERVE_BYTES`` stands for what
no tensor accounts for (the CUDA context, cuDNN/cuBLAS workspaces, NCCL buffers, DALI's decoder, fragmentation).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import DataConfig, ModelConfig, TrainConfig
from conv2former.engine.metrics import get_logger
from conv2former.engine.precision import DTYPES, cast_like_engine
from conv2former.errors import UserError
from conv2former.units import GiB, is_decimal, parse_bytes

RESERVE_BYTES = 3 * GiB
PROBE_BATCHES = (2, 4)  # micro-batches measured: activations are linear in the batch (checked by the tests)


def _fake_model(model_cfg: ModelConfig, num_classes: int, dtype: torch.dtype) -> Tuple[Any, Any]:
    """The run's model (``ModelConfig.create_kwargs``, activation checkpointing as configured) with fake parameters
    (meta-built, then storage-less CPU tensors), cast as DeepSpeed casts it: floating parameters to the training
    dtype, buffers kept (the stem BatchNorm's statistics stay fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model: Any = timm.create_model(model_cfg.variant, **model_cfg.create_kwargs(num_classes))
    model.set_grad_checkpointing(model_cfg.grad_checkpointing)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = cast_like_engine(model.to_empty(device="cpu").train(), dtype)
    return model, mode


class LiveBytes(TorchDispatchMode):
    """Every storage an operation creates inside this mode, with its size, from creation until it is freed (a weak
    reference's callback), in order: the peak of the live bytes, leaving out chosen storages (the gradients).

    Hand-written because torch's MemTracker (torch.distributed._tools) attributes memory to modules with hooks and
    snapshots at every module boundary: 40x slower here (54 s against 1.3 s for Conv2Former-L)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.index: Any = WeakIdKeyDictionary()  # storage -> its number
        self.events: List[Tuple[int, int]] = []  # (storage number, +bytes at creation / -bytes when freed)
        self.refs: List[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self.index:
            return
        number, size = len(self.refs), storage.nbytes()
        self.index[storage] = number
        self.events.append((number, size))

        def freed(_: Any) -> None:
            self.events.append((number, -size))

        self.refs.append(weakref.ref(storage, freed))

    def peak(self, leave_out: Iterable[torch.Tensor] = ()) -> int:
        """The most bytes live at once, not counting the storages of ``leave_out``."""
        skip = {self.index[t.untyped_storage()] for t in leave_out if t.untyped_storage() in self.index}
        live = most = 0
        for number, change in self.events:
            if number not in skip:
                live += change
                most = max(most, live)
        return most


def step_activation_bytes(
    model_cfg: ModelConfig, num_classes: int, image_size: int, batch: int, precision: str, channels_last: bool
) -> int:
    """Peak bytes of one forward + backward of a micro-batch beyond the weights and their gradients (activations
    saved for backward, temporaries, the batch itself), measured on fake tensors."""
    dtype = DTYPES[precision]
    model, mode = _fake_model(model_cfg, num_classes, dtype)
    with mode:
        images = torch.empty(batch, 3, image_size, image_size, dtype=dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.zeros(batch, dtype=torch.long)
        with LiveBytes() as live:
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
            loss.backward()
            del loss
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return live.peak(leave_out=grads) + images.numel() * images.element_size()


@dataclass
class MemoryPlan:
    parameters: int  # count
    state_bytes: Dict[str, int]  # per rank: weights, gradients, optimizer (master + moments), ema
    activation_fixed: int  # bytes of activations independent of the batch
    activation_per_sample: int  # bytes per sample of the micro-batch
    reserve: int = RESERVE_BYTES

    def total(self, micro_batch: int) -> int:
        """Bytes one rank needs at ``micro_batch``."""
        return sum(self.state_bytes.values()) + self.activations(micro_batch) + self.reserve

    def activations(self, micro_batch: int) -> int:
        return self.activation_fixed + self.activation_per_sample * micro_batch

    def largest_fitting(self, gpu_bytes: int) -> int:
        """The largest micro-batch whose total fits in ``gpu_bytes`` (0: not even one sample)."""
        room = gpu_bytes - sum(self.state_bytes.values()) - self.activation_fixed - self.reserve
        return max(0, room // max(1, self.activation_per_sample))


def state_bytes(parameters: int, precision: str, zero_stage: int, world_size: int, ema: bool) -> Dict[str, int]:
    """Per rank: the bytes of weights, gradients, optimizer state (fp32 master weights and AdamW's two moments) and
    the EMA (fp32; sharded at ZeRO-3), under ZeRO ``zero_stage`` on ``world_size`` ranks."""
    low = precision != "fp32"
    weight_b, grad_b, optim_b = (2, 2, 12) if low else (4, 4, 8)
    shard = max(1, world_size)
    return {
        "weights": parameters * weight_b // (shard if zero_stage >= 3 else 1),
        "gradients": parameters * grad_b // (shard if zero_stage >= 2 else 1),
        "optimizer": parameters * optim_b // (shard if zero_stage >= 1 else 1),
        "ema": parameters * 4 // (shard if zero_stage >= 3 else 1) if ema else 0,  # (ZeRO-3: each rank's partition)
    }


def plan_memory(cfg: TrainConfig, num_classes: int, world_size: int, precision: str) -> MemoryPlan:
    """The plan for ``cfg`` on ``world_size`` ranks training in ``precision`` (activations measured twice)."""
    channels_last = cfg.data.channels_last if cfg.data.channels_last is not None else True  # (a GPU's default)
    small, large = (
        step_activation_bytes(cfg.model, num_classes, cfg.data.image_size, batch, precision, channels_last)
        for batch in PROBE_BATCHES
    )
    per_sample = math.ceil((large - small) / (PROBE_BATCHES[1] - PROBE_BATCHES[0]))
    with torch.device("meta"):
        model = timm.create_model(cfg.model.variant, **cfg.model.create_kwargs(num_classes))
    parameters = sum(p.numel() for p in model.parameters())
    return MemoryPlan(
        parameters=parameters,
        state_bytes=state_bytes(parameters, precision, cfg.deepspeed.zero_stage, world_size, cfg.ema),
        activation_fixed=max(0, small - per_sample * PROBE_BATCHES[0]),
        activation_per_sample=per_sample,
    )


def visible_gpu_bytes() -> Optional[int]:
    """Free bytes of this process's GPU, or None without one."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def fitting_micro_batch(plan: MemoryPlan, gpu_bytes: int, global_batch: int, world_size: int) -> int:
    """The largest micro-batch that fits and divides the global batch over the ranks (accumulation follows)."""
    largest = min(plan.largest_fitting(gpu_bytes), global_batch // max(1, world_size))
    for micro in range(largest, 0, -1):
        if global_batch % (micro * world_size) == 0:
            return micro
    raise UserError(
        f"not even a micro-batch of 1 fits in {gpu_bytes / GiB:.1f} GiB per rank ({plan.total(1) / GiB:.1f} GiB "
        "needed): turn on model.grad_checkpointing, a higher deepspeed.zero_stage, or use GPUs with more memory"
    )


def plan_report(
    plan: MemoryPlan, micro_batch: int, gpu_bytes: Optional[int], global_batch: int, world_size: int
) -> Dict[str, Any]:
    """What ``--plan-memory`` prints and the summary's ``memory_plan`` holds (GiB per rank)."""

    def gib(n: int) -> float:
        return round(n / GiB, 2)

    state = {key: gib(value) for key, value in plan.state_bytes.items()}
    report: Dict[str, Any] = {
        "parameters": plan.parameters,
        "micro_batch": micro_batch,
        "per_rank_gib": {
            **state,
            "activations": gib(plan.activations(micro_batch)),
            "reserve": gib(plan.reserve),
            "total": gib(plan.total(micro_batch)),
        },  # fmt: skip
        "activation_gib_per_sample": round(plan.activation_per_sample / GiB, 4),
    }
    if gpu_bytes is not None:
        largest = plan.largest_fitting(gpu_bytes)
        report.update(gpu_memory_gib=gib(gpu_bytes), largest_micro_batch=largest)
        report["auto_micro_batch"] = fitting_micro_batch(plan, gpu_bytes, global_batch, world_size) if largest else 0
    return report


def plan_memory_report(cfg: TrainConfig, world_size: int, gpu_memory: Optional[str]) -> Dict[str, Any]:
    """``--plan-memory``: the plan for the run ``cfg`` resolves to on ``world_size`` GPU ranks, at its micro-batch
    (with ``auto``, the one that fits), against ``gpu_memory`` (default: this GPU's free memory; none on a CPU)."""
    from conv2former.engine.run import resolve_run

    budget = parse_bytes(gpu_memory, "--gpu-memory") if gpu_memory else visible_gpu_bytes()
    run = resolve_run(cfg, world_size, gpu=True, gpu_bytes=budget, planning=True)
    plan = run.plan or plan_memory(run.cfg, len(run.classes), world_size, run.precision)
    report = plan_report(plan, run.micro_batch, budget, cfg.schedule.global_batch, world_size)
    grad_ckpt = "on" if cfg.model.grad_checkpointing else "off"
    return {"variant": cfg.model.variant, "image_size": cfg.data.image_size, "precision": run.precision,
            "zero_stage": cfg.deepspeed.zero_stage, "ranks": world_size, "grad_checkpointing": grad_ckpt,
            **report}  # fmt: skip


def run_budget(data: DataConfig, gpu: bool) -> int:
    """The per-rank bytes ``batch_size=auto`` plans for: ``data.memory_budget``, else the GPU's total memory (the
    same on every rank of a homogeneous job, so all ranks pick the same micro-batch)."""
    if data.memory_budget:
        budget = int(parse_bytes(data.memory_budget, "data.memory_budget") or 0)
        if is_decimal(data.memory_budget):  # (the one meaning of GB since 2026-12-06: conv2former/units.py)
            get_logger().warning(
                f"data.memory_budget {data.memory_budget} = {budget / GiB:.1f} GiB (GB is 10^9 bytes; before "
                f"2026-12-06 it read as GiB): write {data.memory_budget.upper().replace('GB', 'GiB')} for that"
            )
        return budget
    if not gpu:
        raise UserError(
            "data.batch_size=auto without a GPU needs data.memory_budget (e.g. --set data.memory_budget=16GiB)"
        )
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
