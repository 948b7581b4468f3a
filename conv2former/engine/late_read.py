"""A small flag tensor that an asynchronous collective is producing, read on the host one step later without making
the host wait for the work queued since.

``tensor.item()`` on a GPU copies on the current stream, so the host waits for everything queued before the copy,
the next step's forward and backward included: the "read one step late" flags (divergence, preemption) would then
cost a full pipeline drain per step. On CUDA the value is instead copied into pinned host memory (``non_blocking``)
right after the collective, a CUDA event is recorded behind that copy, and reading waits for that event only. On CPU
(gloo) nothing changes: the collective's handle is waited on and the tensor read when the value is needed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class LateRead:
    def __init__(self, tensor: torch.Tensor, work: Optional[dist.Work] = None) -> None:
        self.tensor, self.work = tensor, work
        self.host: Optional[torch.Tensor] = None
        self.event: Optional[torch.cuda.Event] = None
        if tensor.is_cuda:
            if work is not None:
                work.wait()  # NCCL: the current stream waits for the collective; the host does not
                self.work = None
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        """Whether reading would not wait (CUDA: the copy is done; CPU: the collective is done)."""
        if self.event is not None:
            return bool(self.event.query())
        return self.work is None or bool(self.work.is_completed())

    def wait(self) -> None:
        """Wait for the collective (CPU) or the copy (CUDA), not for later work."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.event is not None:
            self.event.synchronize()

    def value(self) -> torch.Tensor:
        """The tensor's value, on the host for CUDA (after ``wait``)."""
        self.wait()
        return self.host if self.host is not None else self.tensor
