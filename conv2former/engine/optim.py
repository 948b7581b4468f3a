"""Optimizer parameter groups and the per-step learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from conv2former.config import TrainConfig


@dataclass
class Schedule:
    """Everything derived from the config and the world size (printed by --dry-run)."""

    world_size: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    micro_steps_per_epoch: int   # loader batches per rank per epoch (a multiple of grad_accum)
    steps_per_epoch: int         # optimizer steps per epoch
    total_steps: int             # the schedule's length (epochs x steps_per_epoch)
    warmup_steps: int
    lr: float                    # peak lr = base_lr x global_batch / 1024
    stop_step: int               # where this run stops (max_steps, or total_steps)

    def as_dict(self) -> Dict[str, float]:
        return dict(self.__dict__)


def param_groups(model: nn.Module, cfg: TrainConfig) -> List[Dict]:
    """No weight decay for 1-D parameters (norms, biases, layer scales); optional layer-wise lr decay."""
    if cfg.optim.layer_decay:
        return param_groups_layer_decay(model, weight_decay=cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay)
    return param_groups_weight_decay(model, weight_decay=cfg.optim.weight_decay)


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, schedule: Schedule) -> CosineLRScheduler:
    """Linear warmup from ~0 then cosine to min_lr, stepped per optimizer step (``step_update``)."""
    return CosineLRScheduler(
        optimizer, t_initial=max(1, schedule.total_steps - schedule.warmup_steps), lr_min=cfg.schedule.min_lr,
        warmup_t=schedule.warmup_steps, warmup_lr_init=schedule.lr * 1e-3 if schedule.warmup_steps else 0.0,
        warmup_prefix=True, t_in_epochs=False,
    )
