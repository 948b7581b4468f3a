"""Where this process sits: rank variables from the launcher (or a one-rank default), free ports, cross-rank sync."""

from __future__ import annotations

import os
import socket
from typing import Tuple

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Without a launcher (plain ``python launch/...``) run as rank 0 of 1 on a free local port."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher (deepspeed, torchrun, srun wrapper) set them."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def sync_batchnorm_stats(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks so every rank holds the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf)
                buf /= dist.get_world_size()
