"""What a run tells its user: a rank-aware ``logging`` logger, TensorBoard scalars, ``log.jsonl``, the progress bar,
and the timing window behind images/s, step time and data time."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from conv2former.engine.sinks import JsonlSink, Sink, TensorBoardSink

LOGGER_NAME = "conv2former"


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def get_logger(rank: Optional[int] = None) -> logging.Logger:
    """The pipeline's logger: on rank 0, INFO to stdout and warnings/errors to stderr, as bare messages; on other
    ranks only warnings and errors. Configured once per process (``rank`` from the RANK variable when not given)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not getattr(logger, "_c2f_configured", False):
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        out = logging.StreamHandler(sys.stdout)
        out.addFilter(_BelowWarning())
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
        logger._c2f_configured = True  # type: ignore[attr-defined]
    return logger


def memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated on the GPU, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Metrics:
    """Rank 0 sends the scalars to the sinks (conv2former/engine/sinks.py: TensorBoard ``OUTPUT/tb`` and JSON lines
    ``OUTPUT/log.jsonl`` by default) and draws the bar; other ranks write nothing. Training scalars are averaged over
    a window: the steps since the last record."""

    def __init__(
        self, output: str, rank: int, total_steps: int, initial_step: int, desc: str, sinks: Optional[List[Sink]] = None
    ) -> None:
        self.rank = rank
        if sinks is None and rank == 0:
            sinks = [TensorBoardSink(output), JsonlSink(output)]
        self.sinks: List[Sink] = list(sinks or []) if rank == 0 else []
        self.total_steps, self.initial_step, self.desc = total_steps, initial_step, desc
        self._bar: Optional[tqdm] = None  # drawn at its first use (after a resume has set initial_step)
        self.restart_window()

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(total=self.total_steps, initial=self.initial_step, disable=self.rank != 0, unit="step",
                             dynamic_ncols=True, desc=self.desc, file=sys.stderr)  # fmt: skip
        return self._bar

    def start_at(self, step: int) -> None:
        """The run (re)starts at optimizer step ``step`` (a resume): where the bar begins."""
        self.initial_step = step

    # the timing window
    def restart_window(self) -> None:
        self.window_steps, self.window_data, self.window_start = 0, 0.0, time.perf_counter()

    def add_data_time(self, seconds: float) -> None:
        self.window_data += seconds

    def step_done(self) -> None:
        self.window_steps += 1
        self.bar.update(1)

    def window(self) -> Dict[str, float]:
        """Seconds per optimizer step and waiting for data per step, averaged over the window."""
        steps = max(1, self.window_steps)
        return {"step_time": (time.perf_counter() - self.window_start) / steps, "data_time": self.window_data / steps}

    # records
    def scalars(self, step: int, values: Dict[str, float], kind: str = "train") -> None:
        for sink in self.sinks:  # (none on the other ranks, or after close)
            sink.log(kind, step, values)

    def warn(self, message: str) -> None:
        """A warning on rank 0 on a line of its own above the bar (every rank sees the same thing here)."""
        if self.rank == 0:
            tqdm.write(message, file=sys.stderr)

    def note(self, message: str) -> None:
        """An INFO line on rank 0, on a line of its own above the bar."""
        if self.rank == 0:
            tqdm.write(message, file=sys.stdout)

    def close_bar(self) -> None:
        """The bar ends here (a line printed after it starts on its own line)."""
        if self._bar is not None:
            self._bar.close()

    def show(self, **postfix: str) -> None:
        self.bar.set_postfix(**postfix)

    def flush(self) -> None:
        """TensorBoard's events on disk now (log.jsonl is flushed at every line)."""
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
