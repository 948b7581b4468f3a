"""Checkpoints as the Trainer's component: every ``checkpoint.save_every`` optimizer steps (its cadence), at each
epoch end and at the end (``save_now``), through ``checkpoint.CheckpointManager`` with every registered component's
state; never from a bad step (skipped with a warning) or from non-finite weights (``Diverged``); a remote output
gets the tag uploaded after it is written."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict

import torch

from conv2former.engine.batchnorm import BatchNormStats
from conv2former.engine.checkpoint import CheckpointManager
from conv2former.engine.component import Component
from conv2former.engine.guard import StepGuard, weights_finite
from conv2former.engine.metrics import Metrics
from conv2former.engine.run_output import RunOutput
from conv2former.engine.state import CheckpointState


class Checkpointing(Component):
    def __init__(
        self, manager: CheckpointManager, engine: Any, state: CheckpointState, guard: StepGuard,
        batchnorm: BatchNormStats, output: RunOutput, metrics: Metrics, wait: Callable[[], None],
    ) -> None:  # fmt: skip
        self.manager, self.engine, self.state, self.guard = manager, engine, state, guard
        self.batchnorm, self.output, self.metrics = batchnorm, output, metrics
        self.wait = wait  # (the outstanding preemption agreement finishes before the save's collectives)

    @property
    def saved_at(self) -> int:
        """The step of the newest checkpoint this run saved or resumed from."""
        return self.manager.saved_at

    def due(self, step: int) -> bool:
        return self.manager.due(step)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.save_now(step)
        self.metrics.restart_window()  # time training only

    def save_now(self, step: int) -> None:
        """Checkpoint now, unless this very step was bad (its flag is read now, one sync per checkpoint: the save is
        skipped with a warning) or the weights are not finite (``Diverged``)."""
        self.wait()
        if self.guard.last_step_bad(step):
            self.metrics.warn(f"warning: step {step} was not finite: its checkpoint is skipped")
            return
        if not weights_finite(self.engine.module):  # nothing written: the newest on disk stays the last good one
            raise self.guard.fault(step)
        start = time.perf_counter()
        with self.batchnorm.averaged():  # the saved model (and EMA) hold the average over ranks
            tag = self.manager.save(self.engine, step, self.state)
        took = {"seconds": time.perf_counter() - start, "bytes": float(self.manager.size_bytes)}
        if self.output.remote:  # upload the tag (then mark it complete there) and the run's other files
            start = time.perf_counter()
            self.metrics.flush()
            line = self.output.push_checkpoint(tag, self.manager.keep_last)
            if line:
                self.metrics.warn(line)
            took["upload_seconds"] = time.perf_counter() - start
        self.metrics.scalars(step, took, kind="checkpoint")  # how long a save blocks training, and its size

    def summary(self) -> Dict[str, Any]:
        # the estimate the disk-space warning used, and the newest checkpoint's measured size (rank 0)
        return {"checkpoint_bytes": {"estimated": self.manager.estimated_bytes, "written": self.manager.size_bytes}}
