"""Evaluation as the Trainer's component: top-1/top-5 of the model (and of its EMA) on the val split at the epoch
ends its cadence names (``schedule.eval_every_epochs``, and always the last epoch) and at the end of training,
logged as ``eval/*`` scalars with the best so far (``eval/best_top1``, ``eval/best_epoch``), the best checkpointed
(``best``) for ``checkpoint.keep_best``."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from conv2former.data.loader import build_loader
from conv2former.engine.batchnorm import BatchNormStats
from conv2former.engine.best import BestEvaluation, evaluation_record
from conv2former.engine.component import Component
from conv2former.engine.evaluator import Evaluator
from conv2former.engine.metrics import Metrics, get_logger
from conv2former.engine.run import ResolvedRun
from conv2former.engine.state import CheckpointState
from conv2former.errors import UserError


class EpochEvaluation(Component):
    def __init__(
        self, run: ResolvedRun, rank: int, device: torch.device, engine: Any, ema: Any, batchnorm: BatchNormStats,
        dtype: torch.dtype, metrics: Metrics,
    ) -> None:  # fmt: skip
        self.engine, self.ema, self.batchnorm, self.dtype, self.metrics = engine, ema, batchnorm, dtype, metrics
        self.half = dtype if run.precision != "fp32" else None  # the EMA: fp32 weights, half-precision compute
        self.every, self.epochs = run.cfg.schedule.eval_every_epochs, run.cfg.schedule.epochs
        self.evaluator = Evaluator(len(run.classes), device)
        self.val_loader = None
        try:
            self.val_loader = build_loader(run.data, "val", rank, run.world_size, device)
        except UserError as err:
            if rank == 0:
                get_logger(rank).warning(f"no evaluation: {err}")
        self.best = BestEvaluation()
        self.last: Dict[str, float] = {}  # the newest evaluation

    def register(self, state: CheckpointState) -> None:
        state.register("best", self.best)

    def due(self, step: int) -> bool:
        return False  # (its cadence is in epochs: due_at_epoch_end)

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether the end of epoch ``epoch`` (1-based: the number of epochs done) evaluates."""
        return epoch % self.every == 0 or epoch == self.epochs

    def run(self, epoch: int, step: int) -> Dict[str, float]:
        """Evaluate now (every rank takes part); the result is also ``last``."""
        if self.val_loader is None:
            self.last = {}
            return self.last
        with self.batchnorm.averaged():
            out = self._top_k(self.engine, "", self.dtype, None)
            if self.ema is not None:
                with self.ema.gathered() as ema_module:  # (ZeRO-3: the ranks' partitions, gathered for this)
                    out.update(self._top_k(ema_module, "ema_", torch.float32, self.half))
        self.best.observe(out, epoch, step)
        self.metrics.scalars(step, {**out, "epoch": epoch, **self.best.scalars()}, kind="eval")
        self.last = out
        return out

    def _top_k(
        self, model: Any, prefix: str, input_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype]
    ) -> Dict[str, float]:
        assert self.val_loader is not None
        self.val_loader.set_epoch(0)
        result = self.evaluator.run(model, self.val_loader, input_dtype, autocast_dtype)
        out = {f"{prefix}top1": result.top1, f"{prefix}top5": result.top5}
        return out if prefix else {**out, "num_samples": result.num_samples}

    def record(self, epoch: int, step: int) -> Dict[str, Any]:
        """What the export's ``evaluation.json`` holds: the newest evaluation and the best one."""
        last = {**self.last, "epoch": epoch, "step": step} if self.last else None
        return evaluation_record(last, self.best.best)

    def summary(self) -> Dict[str, Any]:
        return {"eval": self.last, "best_eval": self.best.best}
