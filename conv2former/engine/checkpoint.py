"""Checkpoints: ``CheckpointManager`` saves DeepSpeed's engine with the registered components (``state``), marks a
tag complete once every rank wrote its part, falls back to older tags, converts across world sizes and keeps the
newest few. The layout (``tag_for``, ``list_tags``, ``newest_complete``, ``COMPLETE``) is what the readers of a
run (export, weights, the remote output) rely on; the export folder is written by conv2former.export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from conv2former.engine import disk
from conv2former.engine.checkpoint_layout import (
    COMPLETE,
    complete_tags,
    list_tags,
    mark_complete,
    newest_complete,
    tag_for,
)
from conv2former.engine.distributed import gather
from conv2former.engine.rank0_work import on_rank0
from conv2former.engine.state import CheckpointState
from conv2former.errors import CheckpointFault
from conv2former.retry import attempt
from conv2former.units import human

Engine = Any  # a deepspeed.DeepSpeedEngine


def _retain(ckpt_dir: str, keep_last: int) -> None:
    for old in complete_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def _save(
    engine: Engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep_last: int, timeout_minutes: float
) -> str:
    """Save on every rank; mark complete after a barrier; keep the newest ``keep_last`` complete tags. A rank that
    fails to write raises ``SaveFailed`` on every rank (after the others finished their part: no rank is left
    waiting in a collective), naming the failing ranks and their errors."""
    tag = tag_for(step)
    error = attempt(lambda: engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False))
    if error is not None and dist.is_initialized():
        dist.barrier()  # the ranks that wrote their part wait in DeepSpeed's closing barrier
    _raise_if_failed(tag, gather(error))
    error = attempt(lambda: mark_complete(ckpt_dir, tag, step, engine.world_size)) if engine.global_rank == 0 else None
    _raise_if_failed(tag, gather(error))
    on_rank0(lambda: _retain(ckpt_dir, keep_last), timeout_minutes)  # (deleting old tags from a bucket takes a while)
    return tag


class SaveFailed(Exception):
    def __init__(self, tag: str, errors: Dict[int, str]) -> None:
        super().__init__(f"{tag}: " + "; ".join(f"rank {r}: {e}" for r, e in errors.items()))
        self.tag, self.errors = tag, errors


def _raise_if_failed(tag: str, errors: List[Optional[str]]) -> None:
    failed = {rank: err for rank, err in enumerate(errors) if err is not None}
    if failed:
        raise SaveFailed(tag, failed)


def _universal_tag(ckpt_dir: str, tag: str, timeout_minutes: float) -> str:
    """Convert ``tag`` to DeepSpeed's universal format once (rank 0; the others wait up to ``timeout_minutes``), for
    a different world size."""
    out = f"{tag}_universal"

    def convert() -> None:
        if os.path.exists(os.path.join(ckpt_dir, out, COMPLETE)):
            return
        command = ["-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(ckpt_dir, tag)]
        command += ["--output_folder", os.path.join(ckpt_dir, out)]
        subprocess.run([sys.executable, *command], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(ckpt_dir, out, COMPLETE), "w") as f:
            f.write("{}")

    on_rank0(convert, timeout_minutes)
    return out


def _resume_universal(engine: Engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {tag}")
    client_state["tag"] = tag
    return client_state


def _resume(engine: Engine, ckpt_dir: str, passed_over: List[Dict[str, str]]) -> Optional[Dict[str, Any]]:
    """Load the newest complete, loadable checkpoint; fall back to older ones with a warning (each tag passed over
    goes into ``passed_over`` with the reason: "incomplete" or "unloadable")."""
    for tag in reversed(list_tags(ckpt_dir)):
        tag_dir = os.path.join(ckpt_dir, tag)
        if not os.path.exists(os.path.join(tag_dir, COMPLETE)):
            if engine.global_rank == 0:
                warnings.warn(f"checkpoint {tag_dir} is incomplete (no '{COMPLETE}' marker): trying an older one")
            passed_over.append({"tag": tag, "reason": "incomplete"})
            continue
        try:
            path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
        except Exception as err:  # a corrupted file: DeepSpeed/torch raise many types
            if engine.global_rank == 0:
                warnings.warn(
                    f"checkpoint {tag_dir} could not be loaded ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:120]}): trying an older one"
                )
            passed_over.append({"tag": tag, "reason": "unloadable"})
            continue
        if path is None:
            continue
        client_state["tag"] = tag
        return client_state
    return None


class CheckpointManager:
    """``OUTPUT/checkpoints/``: where a run saves and from where it resumes.

    Saving happens on every rank (DeepSpeed writes each rank's part), then rank 0 marks the tag ``complete``, points
    ``latest`` at it and keeps the newest ``keep_last`` complete tags. Resuming takes the newest complete, loadable
    tag (older ones on failure, with a warning); a tag saved by another number of ranks is converted once to
    DeepSpeed's universal format, which must be known before ``deepspeed.initialize`` (``configure``).
    """

    def __init__(
        self,
        ckpt_dir: str,
        keep_last: int,
        rank: int,
        world_size: int,
        save_every: int = 0,
        rank0_timeout_minutes: float = 60.0,
    ) -> None:
        self.dir, self.keep_last, self.rank, self.world_size = ckpt_dir, keep_last, rank, world_size
        self.rank0_timeout_minutes = rank0_timeout_minutes  # how long the others wait for rank 0's conversion
        self.save_every = save_every  # steps between periodic checkpoints (0: only at epoch ends and the end)
        self.newest = newest_complete(ckpt_dir)
        self.saved_at = 0  # the step of the newest checkpoint this run saved or resumed from
        self.universal: Optional[str] = None
        self.passed_over: List[Dict[str, str]] = []  # newer tags the last load could not use, and why
        self.size_bytes = 0  # one checkpoint: estimated (expect), then measured after each save
        self.estimated_bytes = 0  # the estimate alone (expect)

    def configure(self, ds_config: Dict[str, Any]) -> Optional[str]:
        """Prepare a resume across world sizes; returns a line to show when that happens."""
        saved_by = self.newest.get("world_size", self.world_size) if self.newest else self.world_size
        if saved_by == self.world_size:
            return None
        assert self.newest is not None  # (saved_by came from it)
        self.universal = _universal_tag(self.dir, self.newest["tag"], self.rank0_timeout_minutes)
        ds_config["checkpoint"] = {"load_universal": True}
        return (
            f"checkpoint {self.newest['tag']} was saved by {saved_by} ranks: resuming on {self.world_size} "
            f"through {self.universal}"
        )

    def load(self, engine: Engine, state: CheckpointState) -> Optional[str]:
        """Load the newest good checkpoint into ``engine`` and the registered components of ``state``; returns its
        tag, or None for a fresh run."""
        client: Optional[Dict[str, Any]]
        if self.universal is not None:
            client = _resume_universal(engine, self.dir, self.universal)
        else:
            client = _resume(engine, self.dir, self.passed_over) if list_tags(self.dir) else None
        if client is None:
            return None
        state.load_state_dict(client, where=os.path.join(self.dir, client["tag"]))
        self.saved_at = int(client["step"])
        return client["tag"]

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` ends with a periodic checkpoint (``checkpoint.save_every``)."""
        return bool(self.save_every) and step % self.save_every == 0

    def expect(self, size: disk.CheckpointSize) -> List[str]:
        """Take the estimated size of a checkpoint; return the lines to log (rank 0): the size, and a warning with
        the numbers when ``keep_last + 1`` checkpoints do not fit in the free space."""
        self.size_bytes = self.estimated_bytes = size.total
        if self.rank != 0:
            return []
        os.makedirs(self.dir, exist_ok=True)
        existing = sum(disk.tree_bytes(os.path.join(self.dir, t)) for t in list_tags(self.dir))
        lines = [f"checkpoints: about {size.describe()}, {human(disk.free_bytes(self.dir))} free in {self.dir}"]
        warning = disk.space_warning(self.dir, size, self.keep_last, existing)
        return lines + ([f"warning: {warning}"] if warning else [])

    def save(self, engine: Engine, step: int, state: CheckpointState) -> str:
        """Checkpoint ``step`` with the components of ``state``; a failed write ends the run with a ``CheckpointFault`` on every rank (the message,
        on rank 0: the path, the error, bytes needed and free, the newest complete checkpoint)."""
        try:
            tag = _save(engine, self.dir, step, state.state_dict(), self.keep_last, self.rank0_timeout_minutes)
        except SaveFailed as failure:
            raise CheckpointFault(self._failure_line(failure) if self.rank == 0 else "") from None
        self.saved_at = step
        if self.rank == 0:
            self.size_bytes = disk.tree_bytes(os.path.join(self.dir, tag))  # measured: the next save's need
        return tag

    def _failure_line(self, failure: SaveFailed) -> str:
        tag_dir = os.path.join(self.dir, failure.tag)
        shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete: resume would skip it; give its space back
        free = disk.free_bytes(self.dir)
        full = "the disk is full: " if free < self.size_bytes else ""
        newest = newest_complete(self.dir)
        good = os.path.join(self.dir, newest["tag"]) if newest else "none"
        ranks = ",".join(str(r) for r in failure.errors)
        return (
            f"{full}saving checkpoint {tag_dir} failed on rank {ranks} ({next(iter(failure.errors.values()))}); "
            f"a checkpoint needs about {human(self.size_bytes)}, {human(free)} is free there; the "
            f"incomplete checkpoint was removed and the newest complete one is {good}: free space (or lower "
            "checkpoint.keep_last) and relaunch the same command to resume from it"
        )
