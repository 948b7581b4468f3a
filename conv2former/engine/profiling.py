"""``profile.steps=A-B``: a torch.profiler trace of optimizer steps A to B of the real run, one Chrome trace per rank
in ``OUTPUT/profile/rank<N>.json`` (open in chrome://tracing or Perfetto), each optimizer step a ``step N`` region
and each wait for the loader a ``data_wait`` region; ``profile.memory=true`` adds the allocations to the trace and, on
a GPU, a CUDA memory snapshot (``memory_rank<N>.pickle``, for pytorch.org/memory_viz). Off by default, and then
nothing is profiled or labelled: the loop's regions are null contexts.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import torch

from conv2former.engine.component import Component
from conv2former.errors import UserError


def parse_steps(text: str) -> Tuple[int, int]:
    """``"A-B"`` (or ``"A"``) as the first and last optimizer step to profile."""
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise UserError(f"profile.steps: expected A-B (optimizer steps, e.g. 100-105), got {text!r}") from None
    if a < 1 or b < a:
        raise UserError(f"profile.steps: {text!r} is not a range of optimizer steps (1 <= A <= B)")
    return a, b


class StepProfiler(Component):
    """As the Trainer's component: closes each profiled step (``after_step``) and reports the trace's folder
    (``summary``, through ``shown``: the path as the user gave the output)."""

    def __init__(
        self, steps: Optional[str], memory: bool, out_dir: str, rank: int, device: torch.device,
        shown: Callable[[Optional[str]], Optional[str]] = lambda path: path,
    ) -> None:  # fmt: skip
        self.shown = shown
        self.window = parse_steps(steps) if steps else None
        self.memory, self.out_dir, self.rank, self.device = memory, out_dir, rank, device
        self.profiler: Any = None
        self.step_region: Any = None
        self.written: Optional[str] = None  # the trace, once written

    def region(self, name: str) -> ContextManager[Any]:
        """A labelled region in the trace while profiling; nothing otherwise."""
        if self.profiler is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(name)

    def step_starts(self, step: int) -> None:
        """Before the first micro-batch of optimizer step ``step``: start the trace at the window's first step and
        open the step's region."""
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            return
        if self.profiler is None:
            self._start()
        self.step_region = torch.profiler.record_function(f"step {step}")
        self.step_region.__enter__()

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.step_done(step)

    def summary(self) -> Dict[str, Any]:
        return {"profile": self.shown(self.written) if self.written else None}

    def step_done(self, step: int) -> None:
        """After optimizer step ``step``: close its region; after the window's last step, write the trace."""
        if self.step_region is not None:
            self.step_region.__exit__(None, None, None)
            self.step_region = None
        if self.profiler is not None and self.window is not None and step >= self.window[1]:
            self._stop()

    def close(self) -> None:
        """The run ended inside the window: write what was traced."""
        if self.profiler is not None:
            self.step_done(self.window[1] if self.window else 0)

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if self.memory:
                torch.cuda.memory._record_memory_history()
        self.profiler = torch.profiler.profile(activities=activities, profile_memory=self.memory, record_shapes=True)
        self.profiler.start()

    def _stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.stop()
        os.makedirs(self.out_dir, exist_ok=True)
        self.written = os.path.join(self.out_dir, f"rank{self.rank}.json")
        self.profiler.export_chrome_trace(self.written)
        if self.device.type == "cuda" and self.memory:
            torch.cuda.memory._dump_snapshot(os.path.join(self.out_dir, f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler = None
