"""The GPU's depthwise formulations (the config's ``gpu.depthwise``), installed by the training engine on GPU runs:

* ``measure`` (default): on first use of each (shape, kernel, dtype, layout) every candidate that runs on CUDA is
  timed (conv2former/depthwise.py's table: PyTorch's ``F.conv2d``, which sends channels_last bf16 to cuDNN, the
  channels_last copy, PyTorch's native NCHW kernel, the transposed forms, the batch-folded weight gradient and the
  Triton kernels of conv2former/triton_depthwise.py) and the fastest kept, PyTorch's own unless another is 10%
  faster, like cuDNN's benchmark mode; the choices go into each rank's checkpoint and a resumed run reuses them;
* ``plain``: PyTorch's own (cuDNN) for everything; what ``deterministic=true`` pins, so that fresh runs compute alike;
* ``triton``: the Triton kernels for all three parts.

The timing and the record are conv2former/cpu/depthwise_tuner.py's ``DepthwiseTuner`` (one chooser for both devices).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from conv2former import depthwise
from conv2former.cpu.depthwise_tuner import DepthwiseTuner
from conv2former.errors import UserError

__all__ = ["GpuDepthwise", "MODES", "TRITON"]

MODES = ("measure", "plain", "triton")
TRITON: depthwise.Formulation = ("triton", "triton", "triton")


class GpuDepthwise:
    """The process's depthwise chooser on a GPU run; a checkpointed component (its measured choices, per rank)."""

    def __init__(self, mode: str, deterministic: bool = False) -> None:
        if mode not in MODES:
            raise UserError(f"gpu.depthwise: unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = "plain" if deterministic and mode == "measure" else mode
        self.tuner = DepthwiseTuner("measure", device_type="cuda") if self.mode == "measure" else None
        self.reported = 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[depthwise.Formulation]:
        if self.tuner is not None:
            return self.tuner(x, weight)
        return TRITON if self.mode == "triton" and x.device.type == "cuda" else None

    @classmethod
    def install(cls, mode: str, deterministic: bool = False) -> "GpuDepthwise":
        chooser = cls(mode, deterministic)
        depthwise.use_chooser(chooser)
        return chooser

    def uninstall(self) -> None:
        if depthwise.use_chooser(None) is not self:
            raise RuntimeError("another depthwise chooser was installed after this one")

    def state_dict(self) -> Dict[str, List[str]]:
        return self.tuner.state_dict() if self.tuner is not None else {}

    def load_state_dict(self, state: Dict[str, List[str]]) -> None:
        if self.tuner is not None:
            self.tuner.load_state_dict(state)

    @property
    def loaded(self) -> int:
        return self.tuner.loaded if self.tuner is not None else 0

    def new_measurements(self) -> List[str]:
        """One line per formulation measured since the last call: shape, choice, each candidate's time."""
        if self.tuner is None:
            return []
        new = self.tuner.measured[self.reported :]
        self.reported += len(new)
        return [self.tuner.describe(key) for key in new]

    def summary(self) -> Dict[str, Any]:
        tuner = self.tuner
        return {
            "depthwise": {
                "mode": f"gpu {self.mode}",
                "formulations": len(tuner.choices) if tuner is not None else 0,
                "measured": len(tuner.measured) if tuner is not None else 0,
                "measure_seconds": round(tuner.measure_seconds, 2) if tuner is not None else 0.0,
            }
        }
