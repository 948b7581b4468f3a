"""SIGTERM / SIGUSR1 (Slurm preemption): finish the step, checkpoint, exit 0."""

from __future__ import annotations

import signal
from typing import Callable, Optional

import torch
import torch.distributed as dist

from conv2former.engine.component import Component
from conv2former.engine.late_read import LateRead


class Preempted(Exception):
    """Every rank agreed to stop (SIGTERM/SIGUSR1) and a checkpoint was saved: the run ends with exit 0."""


class Preemption(Component):
    """The ranks agree to stop through an all-reduce of a flag; as the Trainer's component, after each optimizer
    step: when they agreed, ``checkpoint(step)`` and ``Preempted``.

    The all-reduce is started without waiting at every optimizer step and read one step later, when the next step's
    work is already queued, so the check never leaves the GPU idle; all ranks read the same value at the same step,
    so they stop at the same step.
    """

    def __init__(
        self, device: Optional[torch.device] = None, checkpoint: Optional[Callable[[int], None]] = None
    ) -> None:
        self.device, self.checkpoint = device or torch.device("cpu"), checkpoint
        self.requested = False
        self._flag: Optional[torch.Tensor] = None  # created at the first poll
        self._read: Optional[LateRead] = None  # the outstanding agreement
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.requested = True

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        if self.poll(self.device):
            if self.checkpoint is not None:
                self.checkpoint(step)
            raise Preempted()

    def poll(self, device: torch.device) -> bool:
        """Whether every rank had agreed to stop by the previous call; starts this step's agreement."""
        agreed = False
        if self._flag is None:
            self._flag = torch.zeros(1, device=device)
        elif self._read is not None:
            agreed = bool(self._read.value().item())  # (CUDA: waits for that flag's copy only)
        self._flag.fill_(1.0 if self.requested else 0.0)  # a kernel on GPU, not a host-to-device copy
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True) if dist.is_initialized() else None
        self._read = LateRead(self._flag, work)
        return agreed

    def wait(self) -> None:
        """Let the outstanding agreement finish (before other collectives such as a checkpoint)."""
        if self._read is not None:
            self._read.wait()
