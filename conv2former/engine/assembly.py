"""The training stage's parts, put together once for the Trainer: the DeepSpeed engine with its schedule, the EMA,
the batch augmentation and loss, and the components (engine/component.py) in the order they act after each
optimizer step, each registered with the checkpoint state. What the Trainer then runs is only the loop
(engine/trainer.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
from timm.loss import SoftTargetCrossEntropy

from conv2former.data.augment import BatchAugment
from conv2former.engine.batchnorm import BatchNormStats
from conv2former.engine.build import build_engine, build_model
from conv2former.engine.checkpoint import CheckpointManager
from conv2former.engine.checkpointing import Checkpointing
from conv2former.engine.component import Component, Components
from conv2former.engine.disk import estimate_checkpoint
from conv2former.engine.ema import make_ema
from conv2former.engine.epoch_eval import EpochEvaluation
from conv2former.engine.exporting import Exporter
from conv2former.engine.guard import StepGuard
from conv2former.engine.metrics import Metrics, get_logger
from conv2former.engine.optim import Schedule, build_scheduler
from conv2former.engine.precision import DTYPES
from conv2former.engine.preemption import Preemption
from conv2former.engine.profiling import StepProfiler
from conv2former.engine.run import ResolvedRun
from conv2former.engine.run_output import RunOutput
from conv2former.engine.sinks import open_sinks
from conv2former.engine.state import CheckpointState, RngState
from conv2former.engine.training_log import TrainingLog


@dataclass
class Where:
    """This rank's place in the run and what the Trainer built before the engine."""

    rank: int
    device: torch.device
    output: RunOutput
    checkpoints: CheckpointManager
    loader: Any  # the training ShardLoader
    schedule: Schedule
    depthwise: Any  # DepthwiseChoice


@dataclass
class Parts:
    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any  # timm's CosineLRScheduler, stepped per optimizer step
    dtype: torch.dtype  # the model's (and so the batches') dtype under DeepSpeed
    augment: BatchAugment
    criterion: torch.nn.Module
    metrics: Metrics
    profiler: StepProfiler
    preemption: Preemption
    training_log: TrainingLog
    checkpointing: Checkpointing
    evaluation: EpochEvaluation
    exporter: Exporter
    components: Components  # every part with state, cadence or a summary
    state: CheckpointState


def assemble(run: ResolvedRun, where: Where, model: torch.nn.Module, progress: Any) -> Parts:
    """Everything the loop needs, for ``model`` on this rank; ``progress`` (epoch, step) is checkpointed first."""
    cfg, rank, device = run.cfg, where.rank, where.device

    def note_resume(
        ds_config: Dict[str, Any],
    ) -> None:  # (a checkpoint of another world size: DeepSpeed's universal load)
        line = where.checkpoints.configure(ds_config)
        if line:
            get_logger(rank).info(line)

    engine, optimizer = build_engine(run, where.schedule, model, device, note_resume)
    ema = make_ema(engine, lambda: build_model(run), cfg.ema_decay, cfg.ema_warmup, device,
                   cfg.deepspeed.zero_stage == 3) if cfg.ema else None  # fmt: skip
    size = estimate_checkpoint(model, cfg.deepspeed.zero_stage, run.precision != "fp32", cfg.ema, run.world_size)
    for line in where.checkpoints.expect(size):
        get_logger(rank).info(line)
    metrics = _metrics(run, where)
    batchnorm = BatchNormStats([engine.module] + ([ema.module] if ema is not None else []))
    dtype = DTYPES[run.precision]
    state = CheckpointState(rank, run.world_size)
    guard = StepGuard(cfg.guard, engine, device, run.precision, metrics, where.checkpoints.dir, rank)
    preemption = Preemption(device)
    checkpointing = Checkpointing(where.checkpoints, engine, state, guard, batchnorm, where.output, metrics,
                                  preemption.wait)  # fmt: skip
    preemption.checkpoint = checkpointing.save_now  # (a stop agreed: checkpoint first)
    evaluation = EpochEvaluation(run, rank, device, engine, ema, batchnorm, dtype, metrics)
    exporter = Exporter(where.output, engine.module, evaluation, batchnorm, ema, list(run.classes),
                        run.config_dict(), cfg.checkpoint.keep_best, cfg.deepspeed.rank0_work_timeout_minutes,
                        metrics)  # fmt: skip
    profiler = StepProfiler(cfg.profile.steps, cfg.profile.memory, os.path.join(where.output.local, "profile"), rank,
                            device, where.output.shown)  # fmt: skip
    training_log = TrainingLog(metrics, engine, device, where.loader, where.schedule.global_batch, cfg.logging.print_every,
                               where.depthwise, run.precision == "fp16")  # fmt: skip
    # after each optimizer step, in this order: the EMA, the profile window, the scalars, the guard (Diverged),
    # preemption (checkpoint, Preempted), the periodic checkpoint; then the ones acting at epoch ends and the end
    per_step: List[Component] = [ema] if ema is not None else []
    per_step += [profiler, training_log, guard, preemption, checkpointing, evaluation, exporter, where.depthwise]
    components = Components(per_step)
    scheduler = build_scheduler(optimizer, cfg.schedule, where.schedule)
    _register(state, run, where, progress, scheduler, batchnorm, components)
    augment = BatchAugment(cfg.data.augment, len(run.classes), device)
    return Parts(engine, scheduler, dtype, augment, SoftTargetCrossEntropy(), metrics, profiler, preemption,
                 training_log, checkpointing, evaluation, exporter, components, state)  # fmt: skip


def _metrics(run: ResolvedRun, where: Where) -> Metrics:
    """The scalars' sinks (rank 0) and the bar."""
    cfg = run.cfg
    sinks = (
        open_sinks(cfg.logging.backends, where.output.local, cfg.logging.project,
                   os.path.basename(cfg.output.rstrip("/")), run.config_dict(), cfg.logging.mlflow_tracking_uri)
        if where.rank == 0
        else []
    )  # fmt: skip
    return Metrics(where.output.local, where.rank, where.schedule.stop_step, 0, cfg.stage, sinks)


def _register(
    state: CheckpointState, run: ResolvedRun, where: Where, progress: Any, scheduler: Any, batchnorm: BatchNormStats,
    components: Components,
) -> None:  # fmt: skip
    """Everything a checkpoint holds beside DeepSpeed's model and optimizer state, with its scope
    (conv2former/engine/state.py applies the per-rank and other-world-size rules)."""
    state.register(None, progress, required=True)  # "epoch", "step"
    state.register("scheduler", scheduler, required=True)
    components.register(state)  # the EMA, the best evaluation, the guard, the depthwise choices
    state.register("data", where.loader, per_rank=True, other_world="first", required=True)
    state.register("rng", RngState(), per_rank=True)
    state.register("batchnorm", batchnorm, per_rank=True)  # (the saved model holds their average)
    state.constant("config", run.config_dict())
    state.constant("classes", list(run.classes))
    state.constant("schedule", where.schedule.as_dict())
    # what DeepSpeed's ds_to_universal needs to convert this checkpoint for another world size
    state.constant("universal_checkpoint_info", {"universal_checkpoint_version": 0.2})
