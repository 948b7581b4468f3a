"""One resolution of a run: the config judged once and every ``auto`` decided once, into a frozen ``ResolvedRun``.

``resolve_run(cfg, world_size, gpu)`` is the only place a run's config is validated (``TrainConfig.validate``: each
section its own checks, then the ones across sections) and its open choices are made: the precision for the device,
the data backend, the data seed, the micro-batch (``data.batch_size: auto`` through the memory planner), the size
schedule and the classes. The Trainer, ``--dry-run``, ``--plan-memory``, evaluation and the fine-tune's checks all
build from the object it returns (engine/build.py), so they cannot disagree about the network, the schedule or a
refusal. The config itself is never changed after the command line resolved it (what ``--help-config`` printed is
what the run was given); the resolved values live in their own fields, and ``data`` hands the loaders a copy of the
data section with them filled in.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from conv2former.config import DataConfig, TrainConfig, to_dict
from conv2former.data.size_schedule import SizeSchedule
from conv2former.errors import UserError

__all__ = ["ResolvedRun", "resolve_run"]


@dataclass(frozen=True)
class ResolvedRun:
    cfg: TrainConfig  # the config as the command line resolved it (a private copy, never changed)
    world_size: int
    gpu: bool  # the run trains on CUDA GPUs (--plan-memory: plans for them)
    precision: str  # bf16 | fp16 | fp32
    backend: str  # dali-gpu | dali-cpu | torch (--plan-memory: as configured)
    data_seed: int  # data.seed, or the run's seed
    micro_batch: int  # per rank: data.batch_size, or the largest that fits (auto)
    classes: Tuple[str, ...]  # the shard root's classes.txt
    sizes: SizeSchedule  # the training crop size of each epoch (progressive resizing)
    memory_plan: Optional[Dict[str, Any]] = None  # data.batch_size=auto: the plan that chose micro_batch
    plan: Any = field(default=None, compare=False, repr=False)  # that MemoryPlan (the planner reports from it)

    @property
    def data(self) -> DataConfig:
        """The data section with the resolved backend, seed and micro-batch: what the loaders are given."""
        return dataclasses.replace(
            self.cfg.data, backend=self.backend, seed=self.data_seed, batch_size=self.micro_batch
        )

    def config_dict(self) -> Dict[str, Any]:
        """The config as checkpoints, the export and the sinks record it (the resolved data section)."""
        return to_dict(dataclasses.replace(self.cfg, data=self.data))

    def model_kwargs(self) -> Dict[str, Any]:
        """``timm.create_model(variant, **these)``: the network every builder of this run makes."""
        return self.cfg.model.create_kwargs(len(self.classes))

    def summary(self) -> Dict[str, Any]:
        """Its part of the run summary."""
        return {"precision": self.precision, "micro_batch": self.micro_batch, "memory_plan": self.memory_plan}


def resolve_run(
    cfg: TrainConfig, world_size: int, gpu: bool, gpu_bytes: Optional[int] = None, planning: bool = False
) -> ResolvedRun:
    """``cfg`` judged and resolved for ``world_size`` ranks (on GPUs when ``gpu``). ``gpu_bytes``: the per-rank
    memory ``batch_size=auto`` plans for (default ``data.memory_budget``, else the GPU's). ``planning``
    (``--plan-memory``): resolve for a GPU run without one here (auto precision is bf16; the backend is not
    resolved). Raises one-line ``UserError``s."""
    from conv2former.data.loader import resolve_backend
    from conv2former.data.shard_format import read_classes
    from conv2former.data.shards import reachable_root
    from conv2former.engine.precision import resolve_precision

    cfg = copy.deepcopy(cfg)
    cfg.validate()
    if planning:
        precision = "bf16" if cfg.deepspeed.precision == "auto" else cfg.deepspeed.precision
        backend = cfg.data.backend
    else:
        precision = resolve_precision(cfg.deepspeed, gpu)  # (a precision this device lacks fails here)
        backend = resolve_backend(cfg.data.backend)
    reachable_root(cfg.data.root)  # (a missing root or credentials: one line naming the URL)
    classes = tuple(read_classes(cfg.data.root))
    sizes = cfg.data.size_schedule_of(cfg.schedule.epochs)
    micro, plan, report = cfg.data.batch_size, None, None
    if cfg.data.batch_size == "auto":
        micro, plan, report = _auto_micro_batch(cfg, len(classes), world_size, gpu, precision, gpu_bytes, planning)
    data_seed = cfg.data.seed if cfg.data.seed is not None else cfg.seed  # documented: the data follow the run's seed
    return ResolvedRun(
        cfg, world_size, gpu, precision, backend, data_seed, int(micro), classes, sizes, report, plan
    )  # fmt: skip


def _auto_micro_batch(
    cfg: TrainConfig, num_classes: int, world_size: int, gpu: bool, precision: str, gpu_bytes: Optional[int],
    planning: bool,
) -> Tuple[int, Any, Dict[str, Any]]:  # fmt: skip
    """``data.batch_size: auto``: the largest micro-batch that fits the budget and divides the global batch over the
    ranks (accumulation follows; the global batch and so the schedule are unchanged), with its plan and report."""
    from conv2former.engine.memory_plan import fitting_micro_batch, plan_memory, plan_report, run_budget

    if gpu_bytes is None and planning:
        raise UserError("--plan-memory with data.batch_size=auto needs --gpu-memory (e.g. 80GB) without a GPU")
    budget = gpu_bytes if gpu_bytes is not None else run_budget(cfg.data, gpu)
    plan = plan_memory(cfg, num_classes, world_size, precision)
    micro = fitting_micro_batch(plan, budget, cfg.schedule.global_batch, world_size)
    return micro, plan, plan_report(plan, micro, budget, cfg.schedule.global_batch, world_size)
