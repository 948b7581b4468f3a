"""Work only rank 0 does (writing the export, ds_to_universal, pruning old checkpoints) while
the other ranks wait for it, with a timeout of its own.

A ``dist.barrier`` there would be bounded by the collective timeout (``deepspeed.timeout_minutes``, 10 by default)
and, on NCCL, enforced by torch's watchdog, which aborts the waiting ranks: consolidating Conv2Former-L and writing it
to a slow bucket can take longer than that. So the others wait on a key of the rendezvous store (the TCP store at
MASTER_ADDR:MASTER_PORT that every launcher provides) that rank 0 sets when done: no collective, no GPU, a timeout
of its own (``deepspeed.rank0_work_timeout_minutes``). If rank 0 dies meanwhile, the deepspeed launcher's store
(in rank 0's process) goes with it and the wait fails at once; under torchrun the agent stops the other ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Callable, List, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")
_ROUND: List[int] = [0]  # how many waits this process has taken part in (the same sequence on every rank)


def _store() -> "dist.TCPStore":
    """A client of the rendezvous store (timeouts are given per wait)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, wait_for_workers=False
    )


def store_barrier(timeout_minutes: float) -> None:
    """Every rank: return once all ranks got here, waiting up to ``timeout_minutes`` (through the store: no
    collective). The last rank to arrive sets the key the others wait on."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    _ROUND[0] += 1
    key = f"c2f/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/rank0_work/{_ROUND[0]}"
    store = _store()
    if store.add(f"{key}/arrived", 1) == dist.get_world_size():
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"], timedelta(minutes=timeout_minutes))


def on_rank0(work: Callable[[], T], timeout_minutes: float) -> Optional[T]:
    """``work()`` on rank 0 (its result there; None elsewhere) while the other ranks wait for it up to
    ``timeout_minutes``; every rank returns once rank 0 is done."""
    result = work() if not dist.is_initialized() or dist.get_rank() == 0 else None
    store_barrier(timeout_minutes)
    return result
