"""Divergence: a non-finite loss or gradient norm, detected on every rank without a per-step host sync.

Each optimizer step's flag (loss or gradient norm not finite) is all-reduced asynchronously and read one step later,
when the next step's work is already queued (the pattern of ``preemption.Preemption``), so every rank sees the same
bad steps at the same time. By then the bad step's update may already be applied (DeepSpeed skips it only where it
detects the overflow itself, as ZeRO 1/2 do for an infinite gradient norm), so after ``guard.max_bad_steps``
consecutive bad steps (default 1) the run stops. Checkpoints are never written from non-finite weights
(``weights_finite``), so the newest checkpoint on disk stays the last good one and ``keep_last`` never removes it.

Under fp16 an overflowing gradient is expected now and then: DeepSpeed's loss scaler skips that step and halves the
scale. Such a skip (``overflow_skipped``, known on the host) is not a bad step; only a non-finite loss is, or more than
``max_overflow_skips`` skips in a row (the scale has then reached its floor and the gradients still overflow).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from conv2former.config import GuardConfig
from conv2former.engine.component import Component
from conv2former.engine.late_read import LateRead
from conv2former.engine.state import CheckpointState
from conv2former.errors import Diverged

DIVERGED = "diverged"  # the summary's status begins so


class DivergenceGuard:
    def __init__(self, max_bad_steps: int, device: torch.device, max_overflow_skips: int = 20) -> None:
        self.max_bad_steps = max(1, int(max_bad_steps))
        self.max_overflow_skips = max(1, int(max_overflow_skips))
        self.device = device
        self.overflow_skips = 0  # fp16 steps DeepSpeed's loss scaler skipped, in all
        self.overflow_run = 0  # ... in a row up to the newest step
        self.bad_steps: List[Dict[str, Any]] = []  # every bad step seen: step, loss, grad_norm
        self.consecutive = 0
        self._pending: Optional[Dict[str, Any]] = None  # the previous step: its flag, work handle, values

    def observe(
        self, step: int, loss: torch.Tensor, grad_norm: Any, overflow_skipped: bool = False
    ) -> Optional[Dict[str, Any]]:
        """Start step ``step``'s check; return the previous step's record when it was bad (read one step late).
        ``overflow_skipped``: fp16's loss scaler skipped this step (its gradient norm is then not judged)."""
        bad_record = self._read_previous()
        norm = (
            grad_norm
            if isinstance(grad_norm, torch.Tensor)
            else torch.tensor(float("nan") if grad_norm is None else float(grad_norm), device=self.device)
        )
        judged = grad_norm is not None and not overflow_skipped
        finite_norm = torch.isfinite(norm) if judged else torch.ones((), dtype=torch.bool, device=self.device)
        self.overflow_skips += int(overflow_skipped)
        self.overflow_run = self.overflow_run + 1 if overflow_skipped else 0
        flag = (~(torch.isfinite(loss) & finite_norm)).float().reshape(1)
        if self.overflow_run > self.max_overflow_skips:  # (known on the host: no device round trip)
            flag = torch.ones_like(flag)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True) if dist.is_initialized() else None
        self._pending = {"step": step, "flag": LateRead(flag, work), "loss": loss, "grad_norm": norm}
        return bad_record

    def flush(self) -> Optional[Dict[str, Any]]:
        """Read the last outstanding check (at the end of an epoch or before a checkpoint)."""
        return self._read_previous()

    def _read_previous(self) -> Optional[Dict[str, Any]]:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if not pending["flag"].value().item():  # (CUDA: waits for that step's flag only; engine/late_read.py)
            self.consecutive = 0
            return None
        self.consecutive += 1
        record = {
            "step": pending["step"],
            "loss": float(pending["loss"].item()),
            "grad_norm": float(pending["grad_norm"].item()),
        }
        self.bad_steps.append(record)
        return record

    def last_run(self) -> List[Dict[str, Any]]:
        """The newest run of consecutive bad steps (its first one is where the run diverged)."""
        run = self.bad_steps[-1:]
        for record in reversed(self.bad_steps[:-1]):
            if record["step"] != run[0]["step"] - 1:
                break
            run.insert(0, record)
        return run

    def state_dict(self) -> Dict[str, Any]:
        """The bad steps so far (a checkpoint is written only after a good step, so none is outstanding)."""
        return {"bad_steps": list(self.bad_steps), "consecutive": self.consecutive,
                "overflow_skips": self.overflow_skips, "overflow_run": self.overflow_run}  # fmt: skip

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.bad_steps = [dict(record) for record in state["bad_steps"]]
        self.consecutive = int(state["consecutive"])
        self.overflow_skips = int(state.get("overflow_skips", 0))  # (checkpoints before fp16 have neither)
        self.overflow_run = int(state.get("overflow_run", 0))

    @property
    def tripped(self) -> bool:
        return self.consecutive >= self.max_bad_steps


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every rank's parameters are finite (ZeRO-3: each rank checks its own partition)."""
    finite = torch.ones(1)
    tensors = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    for tensor in tensors:
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            finite.zero_()
            break
    finite = finite.to(tensors[0].device if tensors else "cpu")
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


class StepGuard(Component):
    """The guard as the Trainer's component: after each optimizer step, that step's check started and the previous
    one's read; a bad step recorded (log.jsonl, TensorBoard); ``Diverged`` raised at the guard's limit."""

    def __init__(
        self, cfg: GuardConfig, engine: Any, device: torch.device, precision: str, metrics: Any, checkpoint_dir: str,
        rank: int,
    ) -> None:  # fmt: skip
        self.guard = DivergenceGuard(cfg.max_bad_steps, device, cfg.max_overflow_skips)
        self.engine, self.precision, self.metrics = engine, precision, metrics
        self.checkpoint_dir, self.rank = checkpoint_dir, rank

    def register(self, state: CheckpointState) -> None:
        state.register("guard", self.guard)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        skipped = self.precision == "fp16" and not self.engine.was_step_applied()  # the loss scaler's (host) flag
        bad = self.guard.observe(step, loss, self.engine.get_global_grad_norm(), skipped)
        self._record(bad)
        if bad is not None and self.guard.tripped:
            raise self.fault(step)

    def last_step_bad(self, step: int) -> bool:
        """Read the outstanding check (before a checkpoint): whether step ``step`` was bad (recorded; ``Diverged``
        at the limit)."""
        bad = self.guard.flush()
        self._record(bad)
        if bad is not None and self.guard.tripped:
            raise self.fault(step)
        return bad is not None

    def _record(self, bad: Optional[Dict[str, Any]]) -> None:
        if bad is not None:
            self.metrics.scalars(bad["step"], {"loss": bad["loss"], "grad_norm": bad["grad_norm"]}, kind="bad_step")

    def fault(self, step: int) -> Diverged:
        """The fault a diverged run ends with: its one line (rank 0) and the summary's status."""
        from conv2former.engine.checkpoint_layout import newest_complete

        self._record(self.guard.flush())  # the last step's flag, recorded like the others
        run = self.guard.last_run()
        what = f"step {step}: the weights are not finite"
        if run:
            seen = run[0]
            what = f"step {seen['step']}: loss {seen['loss']:.4g}, grad norm {seen['grad_norm']:.4g}"
            if len(run) > 1:
                what += f" (bad steps {seen['step']}-{run[-1]['step']})"
        newest = newest_complete(self.checkpoint_dir)
        good = os.path.join(self.checkpoint_dir, newest["tag"]) if newest else "none (no checkpoint was written)"
        line = (
            f"training diverged at {what}; nothing was saved from non-finite weights, the last good checkpoint is "
            f"{good}; try a lower optim.base_lr, more schedule.warmup_epochs or gradient clipping "
            "(--set optim.clip_grad=1.0)"
        )
        return Diverged(line if self.rank == 0 else "", f"{DIVERGED} at {what}")

    def summary(self) -> Dict[str, Any]:
        return {"bad_steps": self.guard.bad_steps, "overflow_skips": self.guard.overflow_skips}
