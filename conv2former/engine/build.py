"""What a ``ResolvedRun`` is built into, by the Trainer and ``--dry-run`` alike: the model, the training data with
its schedule, and the DeepSpeed engine. One function each, so the dry run times the network and the schedule the run
will train, never a copy that can drift from it."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import DeepSpeedConfig
from conv2former.data.base import ShardLoader
from conv2former.data.loader import build_loader
from conv2former.engine.optim import Schedule, build_optimizer, derive_schedule
from conv2former.engine.precision import precision_config
from conv2former.engine.run import ResolvedRun

__all__ = ["build_model", "build_train_data", "deepspeed_config", "build_engine"]


def build_model(run: ResolvedRun) -> Any:  # a timm model (set_grad_checkpointing, group_matcher, ...)
    """The run's network on the CPU (the same initial weights on every rank that seeds alike)."""
    model: Any = timm.create_model(run.cfg.model.variant, **run.model_kwargs())
    if run.cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_train_data(run: ResolvedRun, rank: int, device: torch.device) -> Tuple[ShardLoader, Schedule]:
    """This rank's training loader (progressive resizing and batch scaling set up) and the schedule its length
    gives."""
    cfg = run.cfg
    loader = build_loader(run.data, "train", rank, run.world_size, device, sizes=run.sizes)
    schedule = derive_schedule(cfg.schedule, cfg.optim.base_lr, run.micro_batch, run.world_size, len(loader))
    if cfg.data.size_schedule_scale_batch:  # each epoch's micro-batch from its size, the global batch kept
        mixing = cfg.data.augment.mixup > 0 or cfg.data.augment.cutmix > 0
        loader.scale_batch_with_size(schedule.micro_batch * schedule.grad_accum, mixing)
    return loader, schedule


def deepspeed_config(cfg: DeepSpeedConfig, clip_grad: float, schedule: Schedule, precision: str) -> Dict[str, Any]:
    return {
        "train_batch_size": schedule.global_batch,
        "train_micro_batch_size_per_gpu": schedule.micro_batch,
        "gradient_accumulation_steps": schedule.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": bool(cfg.overlap_comm)},
        **precision_config(precision, cfg),
        "gradient_clipping": float(clip_grad),  # explicit: DeepSpeed >= 0.19.3 clips at 1.0 otherwise
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(
    run: ResolvedRun,
    schedule: Schedule,
    model: torch.nn.Module,
    device: torch.device,
    adjust: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Tuple[Any, torch.optim.Optimizer]:
    """(DeepSpeed engine, its optimizer) for ``model``: AdamW with the run's parameter groups, the run's precision,
    ZeRO stage and batch settings; ``adjust`` may add to DeepSpeed's config first (the checkpoint writer's)."""
    import deepspeed

    cfg = run.cfg
    if device.type == "cuda":
        # Parameters stay contiguous: DeepSpeed broadcasts them as bytes (channels_last weights fail there) and ZeRO
        # re-flattens them anyway. The loader hands channels_last batches, so cuDNN runs NHWC kernels.
        model = model.to(device=device)
        # fixed input sizes: let cuDNN pick the fastest kernels once, unless the bits must repeat run to run
        torch.backends.cudnn.benchmark = not cfg.deterministic
    optimizer = build_optimizer(model, cfg.optim, schedule.lr)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim.clip_grad, schedule, run.precision)
    if adjust is not None:
        adjust(ds_config)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.model.compile:
        compile_engine(engine, run)
    return engine, optimizer


def compile_engine(engine: Any, run: ResolvedRun) -> None:
    """torch.compile through DeepSpeed with static shapes: one graph per input shape (each training size of the
    size schedule, the evaluation batch), never a dynamic-shape graph; the recompile limit admits them all."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = compile_limit(run.sizes.sizes() or [run.cfg.data.image_size])
    engine.compile(compile_kwargs={"dynamic": False})


def compile_limit(sizes: Any) -> int:
    """torch.compile's recompile limit for a run training at ``sizes``: a graph per size, plus the evaluation's
    (its batch, no gradients) and two spare, never below torch's own limit."""
    import torch._dynamo.config as dynamo_config

    return max(int(dynamo_config.recompile_limit), len(sizes) + 4)
