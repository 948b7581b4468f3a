"""The schedule derived from the config and the world size, the optimizer's parameter groups, the per-step lr."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from conv2former.config import OptimConfig, ScheduleConfig
from conv2former.engine.layer_decay import param_groups_depth_decay
from conv2former.errors import UserError


@dataclass
class Schedule:
    """Everything derived from the config and the world size (printed by --dry-run)."""

    world_size: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    micro_steps_per_epoch: int  # loader batches per rank per epoch (a multiple of grad_accum)
    steps_per_epoch: int  # optimizer steps per epoch
    total_steps: int  # the schedule's length (epochs x steps_per_epoch)
    warmup_steps: int
    lr: float  # peak lr = base_lr x global_batch / 1024
    stop_step: int  # where this run stops (max_steps, or total_steps)

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


def derive_schedule(cfg: ScheduleConfig, base_lr: float, micro: int, world_size: int, loader_steps: int) -> Schedule:
    """The schedule of ``cfg`` for ``world_size`` ranks of ``micro`` samples whose epoch holds ``loader_steps``
    micro-batches per rank; one-line errors for a global batch the ranks cannot share."""
    per_step = micro * world_size
    if cfg.global_batch % per_step:
        raise UserError(
            f"global batch {cfg.global_batch} is not divisible by {world_size} ranks x micro-batch "
            f"{micro} = {per_step}: change --global-batch or --micro-batch"
        )
    accum = cfg.global_batch // per_step
    steps_per_epoch = loader_steps // accum
    if steps_per_epoch == 0:
        raise UserError(
            f"one optimizer step needs {accum} micro-batches per rank but an epoch holds {loader_steps}: "
            "lower --global-batch"
        )
    total = cfg.epochs * steps_per_epoch
    stop = min(total, max(0, cfg.max_steps)) if cfg.max_steps is not None else total
    return Schedule(
        world_size=world_size,
        micro_batch=micro,
        global_batch=cfg.global_batch,
        grad_accum=accum,
        micro_steps_per_epoch=steps_per_epoch * accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
        lr=base_lr * cfg.global_batch / 1024,
        stop_step=stop,
    )


def param_groups(model: nn.Module, cfg: OptimConfig) -> List[Dict[str, Any]]:
    """No weight decay for 1-D parameters (norms, biases, layer scales); optional layer-wise lr decay over
    ConvNeXt's 12 depth groups (conv2former/engine/layer_decay.py)."""
    if cfg.layer_decay:
        return param_groups_depth_decay(model, cfg.weight_decay, cfg.layer_decay)
    return param_groups_weight_decay(model, weight_decay=cfg.weight_decay)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, schedule: Schedule) -> CosineLRScheduler:
    """Linear warmup from 0 (as ConvNeXt's ``cosine_scheduler``) then cosine to min_lr, stepped per optimizer step
    (``step_update``)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, schedule.total_steps - schedule.warmup_steps),
        lr_min=cfg.min_lr,
        warmup_t=schedule.warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
