"""SIGTERM / SIGUSR1 (Slurm preemption): finish the step, checkpoint, exit 0."""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class Preempted(Exception):
    """Every rank agreed to stop (SIGTERM/SIGUSR1) and a checkpoint was saved: the run ends with exit 0."""


class Preemption:
    """The ranks agree to stop through an all-reduce of a flag.

    The all-reduce is started without waiting at every optimizer step and read one step later, when the next step's
    work is already queued, so the check never leaves the GPU idle; all ranks read the same value at the same step,
    so they stop at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._flag: Optional[torch.Tensor] = None  # created at the first poll
        self._work: Optional[dist.Work] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True

    def poll(self, device: torch.device) -> bool:
        """Whether every rank had agreed to stop by the previous call; starts this step's agreement."""
        if self._flag is None:
            agreed, self._flag = False, torch.zeros(1, device=device)
        else:
            self.wait()
            agreed = bool(self._flag.item())
        self._flag.fill_(1.0 if self.requested else 0.0)  # a kernel on GPU, not a host-to-device copy
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True) if dist.is_initialized() else None
        return agreed

    def wait(self) -> None:
        """Let the outstanding agreement finish (before other collectives such as a checkpoint)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
