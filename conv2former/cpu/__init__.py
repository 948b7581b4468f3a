"""CPU tuning, in one optional place: which formulation each depthwise convolution runs as
(``depthwise_tuner.DepthwiseTuner``) and glibc's malloc keeping freed memory for reuse (``malloc``).

Nothing here is active until ``CpuTuning.install(cfg.cpu)``, which the training engine (and the evaluation and
analysis commands) call on CPU runs only: a GPU run's convolutions are cuDNN's and its memory CUDA's. The settings
are the config's ``cpu`` section (``cpu.depthwise``, ``cpu.depthwise_cache``, ``cpu.keep_freed_memory``), validated
here and nowhere else; the environment variable ``C2F_DEPTHWISE`` overrides ``cpu.depthwise`` (the test suite sets
``fixed`` so that separate runs compare bit for bit).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from conv2former import depthwise
from conv2former.config import CpuConfig
from conv2former.cpu.depthwise_tuner import MODES, DepthwiseTuner
from conv2former.cpu.malloc import freed_memory_kept, keep_freed_memory
from conv2former.errors import UserError

__all__ = ["CpuTuning", "ENV_MODE", "MODES", "not_installed_summary", "settings"]

ENV_MODE = "C2F_DEPTHWISE"


def _writable_cache(path: str) -> str:
    """``path`` (``~`` expanded) once its folder exists and a lock beside it can be written: a cache that cannot be
    written is found when the tuning is installed, not in the middle of the first training step."""
    path = os.path.expanduser(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path + ".lock", "a").close()
    except OSError as err:
        raise UserError(
            f"cpu.depthwise_cache: cannot write the depthwise cache {path} ({err.strerror}): give a writable local path"
        ) from None
    return path


def settings(config: CpuConfig) -> CpuConfig:
    """``config`` validated, with ``C2F_DEPTHWISE`` applied and the cache path expanded; a ``UserError`` naming the
    setting otherwise."""
    for where, mode in (("cpu.depthwise", config.depthwise), (ENV_MODE, os.environ.get(ENV_MODE))):
        if mode and mode not in MODES:
            raise UserError(f"{where}: unknown depthwise mode {mode!r}: choose one of {', '.join(MODES)}")
    mode = os.environ.get(ENV_MODE) or config.depthwise
    cache = _writable_cache(config.depthwise_cache) if config.depthwise_cache is not None else None
    return CpuConfig(depthwise=mode, depthwise_cache=cache, keep_freed_memory=config.keep_freed_memory)


class CpuTuning:
    """The CPU tuning of one process, once installed: its depthwise tuner is the process's chooser and, with
    ``cpu.keep_freed_memory``, malloc keeps freed memory. A checkpointed component (the tuner's choices, per rank)."""

    def __init__(self, config: CpuConfig) -> None:
        self.config = settings(config)
        self.tuner = DepthwiseTuner(self.config.depthwise, self.config.depthwise_cache)
        self.reported = 0  # how many of the tuner's measurements ``new_measurements`` has returned

    @classmethod
    def install(cls, config: Optional[CpuConfig] = None) -> "CpuTuning":
        """Validate ``config`` (the defaults when None), make its tuner the process's depthwise chooser and apply
        the malloc policy (which lasts as long as the process)."""
        tuning = cls(config if config is not None else CpuConfig())
        depthwise.use_chooser(tuning.tuner)
        if tuning.config.keep_freed_memory:
            keep_freed_memory()
        return tuning

    def uninstall(self) -> None:
        """Plain depthwise convolutions again (the malloc policy cannot be undone within a process)."""
        if depthwise.use_chooser(None) is not self.tuner:
            raise RuntimeError("another depthwise chooser was installed after this one")

    def state_dict(self) -> Dict[str, List[str]]:
        return self.tuner.state_dict()

    def load_state_dict(self, state: Dict[str, List[str]]) -> None:
        self.tuner.load_state_dict(state)

    def new_measurements(self) -> List[str]:
        """One line per formulation measured since the last call: shape, choice, each candidate's time."""
        new = self.tuner.measured[self.reported :]
        self.reported += len(new)
        return [self.tuner.describe(key) for key in new]

    def summary(self) -> Dict[str, Any]:
        return {
            "depthwise": self.tuner.summary(),
            "freed_memory_kept": freed_memory_kept(),  # the process's state (an earlier run in it may have set it)
        }


def not_installed_summary() -> Dict[str, Any]:
    """The summary's CPU-tuning fields where none is installed (a GPU run)."""
    return {"depthwise": {"mode": "plain"}, "freed_memory_kept": freed_memory_kept()}
