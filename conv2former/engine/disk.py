"""Disk space for checkpoints: what one checkpoint takes, whether ``keep_last + 1`` of them fit, and sizes in words.

A checkpoint holds (DeepSpeed's layout, summed over ranks):
  * the model weights in the module's dtype (fp32, or bf16/fp16: ``deepspeed.precision``), once (ZeRO 0-2: rank 0's model file;
    ZeRO-3 keeps only partitions, so the weights are counted with the optimizer);
  * the optimizer state: AdamW's two moments in fp32, plus an fp32 master copy of the weights wherever DeepSpeed
    keeps one (ZeRO 1-3, and bf16/fp16 at ZeRO 0) — 12 bytes per parameter, or 8 for fp32 ZeRO 0;
  * our client state: the EMA weights in fp32 (written by every rank at ZeRO-3, by rank 0 otherwise), the data
    positions and RNG states (small).
During a save the newest ``keep_last`` complete checkpoints stay on disk while the next one is written, so a run
needs room for ``keep_last + 1`` of them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from conv2former.units import human


@dataclass
class CheckpointSize:
    weights: int  # bytes of the model weights
    optimizer: int  # bytes of AdamW's state (moments, master copy)
    ema: int  # bytes of the EMA weights (all copies)
    world_size: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.ema

    @property
    def per_rank(self) -> int:
        return -(-self.total // self.world_size)

    def describe(self) -> str:
        return (
            f"{human(self.total)} per checkpoint (weights {human(self.weights)}, optimizer {human(self.optimizer)}, "
            f"EMA {human(self.ema)}; about {human(self.per_rank)} per rank of {self.world_size})"
        )


def estimate_checkpoint(
    model: torch.nn.Module, zero_stage: int, half: bool, ema: bool, world_size: int
) -> CheckpointSize:
    """The size of one checkpoint of ``model`` (see the module docstring for what is counted); ``half``: bf16 or
    fp16 weights. A ZeRO-3 model's parameters count whole (``ds_numel``: DeepSpeed leaves them empty on each rank)."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weights = 0 if zero_stage == 3 else params * (2 if half else 4) + buffers
    master = 4 if (zero_stage > 0 or half) else 0
    optimizer = params * (8 + master)
    ema_copies = world_size if zero_stage == 3 else 1
    ema_bytes = (params * 4 + buffers) * ema_copies if ema else 0
    return CheckpointSize(weights, optimizer, ema_bytes, world_size)


def tree_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # removed meanwhile (retention on another rank)
                pass
    return total


def free_bytes(path: str) -> int:
    """Free bytes for an unprivileged writer on the filesystem of ``path`` (or of its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def space_warning(ckpt_dir: str, size: CheckpointSize, keep_last: int, existing: int) -> Optional[str]:
    """A warning with the numbers when ``keep_last + 1`` checkpoints do not fit beside the ``existing`` bytes of
    checkpoints already there (which retention will replace), else None."""
    needed = (keep_last + 1) * size.total - existing
    free = free_bytes(ckpt_dir)
    if needed <= free:
        return None
    return (
        f"{ckpt_dir} has {human(free)} free but needs about {human(needed)} more for checkpoint.keep_last={keep_last} "
        f"+ 1 checkpoints of {size.describe()}: a save will fail when the disk fills; free space, move --output, or "
        "lower --set checkpoint.keep_last"
    )
