"""After a failed collective: was it another rank (dead, or hung past the timeout), which one, and the one line that
says so, printed by one surviving rank. Ranks answer a roll call through the launcher's rendezvous store, and a rank
leaving for a fault of its own announces it there first, so the others stay quiet."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import List, Optional, Tuple

import torch.distributed as dist

from conv2former.errors import Diverged, RankFault, RunFault

# What a failed collective says (gloo raises a plain RuntimeError; NCCL and the store raise torch's DistError types).
COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "gloo", "NCCL")


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or hung (not a bug of this rank)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in COLLECTIVE_FAILURES)


def _rendezvous_store(wait_s: float) -> "dist.TCPStore":
    """A client of the rendezvous store at MASTER_ADDR:MASTER_PORT (under the deepspeed launcher it lives in rank 0's
    process; under torchrun in the agent)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=wait_s),
        wait_for_workers=False,
    )


def _key(kind: str, rank: int) -> str:
    return f"c2f/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"


def announce_fault(rank: int, status: str) -> None:
    """Before a rank leaves for a fault of its own (it printed the line), tell the others through the store, so that
    their roll call does not report it as a lost rank. Best effort: the store may be gone."""
    try:
        _rendezvous_store(2.0).set(_key("fault", rank), status)
    except (RuntimeError, KeyError, ValueError):
        pass


def roll_call(rank: int, world_size: int, wait_s: float = 5.0) -> Optional[Tuple[List[int], List[int]]]:
    """After a failed collective: (the ranks that do not answer within ``wait_s``, those of them that announced a
    fault of their own), each surviving rank answering by writing a key into the rendezvous store; None when that
    store itself is gone."""
    try:
        store = _rendezvous_store(wait_s)
        store.set(_key("alive", rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world_size) if not store.check([_key("alive", r)])]
            if not missing or time.monotonic() > deadline:
                return missing, [r for r in missing if store.check([_key("fault", r)])]
            time.sleep(0.2)
    except (RuntimeError, KeyError, ValueError):  # store unreachable (DistStoreError is a RuntimeError)
        return None


def lost_ranks_line(rank: int, world_size: int, step: int, err: BaseException, timeout_min: float) -> str:
    """The one line naming the rank(s) that failed, printed by the lowest surviving rank; '' on the others, and when
    the lost ranks left for a fault they reported themselves."""
    seen = (str(err).strip().splitlines() or [""])[0]
    seen = seen.split("] ", 1)[-1][:160]  # without gloo's source-file prefix
    answer = roll_call(rank, world_size)
    if answer is None:  # the store in rank 0's process is gone: rank 0 died or left
        who, printer = "rank 0 (which hosts the rendezvous store) is gone (see its own error line, if any)", 1
    elif answer[0] and set(answer[1]) == set(answer[0]):
        return ""  # they left for a fault of their own and printed why
    elif answer[0]:
        missing = answer[0]
        who = f"rank {','.join(map(str, missing))} stopped answering (dead, or hung past the collective timeout)"
        printer = min(r for r in range(world_size) if r not in missing)
    else:
        who, printer = "a collective failed although every rank still answers", 0
    if rank != printer:
        return ""
    return (
        f"{who} at step {step}; rank {rank} saw: {seen}; collective timeout {timeout_min:g} min "
        "(--set deepspeed.timeout_minutes); relaunch the same command to resume from the newest complete checkpoint"
    )


def as_run_fault(err: Exception, rank: int, world_size: int, step: int, timeout_minutes: float) -> RunFault:
    """``err`` as the run fault it ends the run with, its line empty on the ranks that do not print it (a fault of
    this rank is announced first, so the others' roll call stays quiet; a failed collective names the lost ranks);
    anything else re-raised."""
    if isinstance(err, RunFault):
        if world_size > 1 and not isinstance(err, (RankFault, Diverged)):  # (every rank diverges at once)
            announce_fault(rank, err.status)
        return err
    if is_collective_failure(err):
        return RankFault(lost_ranks_line(rank, world_size, step, err, timeout_minutes))
    raise err
