"""The GPU's depthwise formulations (the config's ``gpu.depthwise``), installed by the training engine on GPU runs:

* ``measure`` (default): on first use of each (shape, kernel, dtype, layout) every candidate that runs on CUDA is
  timed (conv2former/depthwise.py's table: PyTorch's ``F.conv2d``, which sends channels_last bf16 to cuDNN, the
  channels_last copy, PyTorch's native NCHW kernel, the transposed forms, the batch-folded weight gradient and the
  Triton kernels of conv2former/triton_depthwise.py) and the fastest kept, PyTorch's own unless another is 10%
  faster, like cuDNN's benchmark mode; the choices go into each rank's checkpoint and a resumed run reuses them;
* ``plain``: PyTorch's own (cuDNN) for everything; what ``deterministic=true`` pins, so that fresh runs compute alike;
* ``triton``: the Triton kernels for all three parts.

In ``measure`` and ``triton`` a candidate must first pass the accuracy gate (conv2former/depthwise_gate.py) on the
first batch of its shape: a part whose Triton kernel (or, measuring, any candidate) is further from an fp32
``F.conv2d`` than the dtype's tolerance is computed PyTorch's way, and the rejection is logged and in the summary.
While torch.compile traces, ``triton`` gives the Triton kernels without reading its gated choices (the gate runs
on the shapes met outside tracing; the kernels accumulate in fp32 and passed it on CPU under Triton's interpreter).

The timing and the record are conv2former/cpu/depthwise_tuner.py's ``DepthwiseTuner`` (one chooser for both devices).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

from conv2former import depthwise, depthwise_gate
from conv2former.cpu.depthwise_tuner import DepthwiseTuner, _tracing_or_intercepted
from conv2former.errors import UserError

__all__ = ["GpuDepthwise", "MODES", "TRITON"]

log = logging.getLogger(__name__)

MODES = ("measure", "plain", "triton")
TRITON: depthwise.Formulation = ("triton", "triton", "triton")


class GpuDepthwise:
    """The process's depthwise chooser on a GPU run; a checkpointed component (its measured choices, per rank)."""

    def __init__(self, mode: str, deterministic: bool = False) -> None:
        if mode not in MODES:
            raise UserError(f"gpu.depthwise: unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = "plain" if deterministic and mode == "measure" else mode
        self.tuner = DepthwiseTuner("measure", device_type="cuda") if self.mode == "measure" else None
        self.gated: Dict[str, depthwise.Formulation] = {}  # mode "triton": the formulation per shape after the gate
        self.rejected: Dict[str, str] = {}
        self.reported = 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> Optional[depthwise.Formulation]:
        if self.tuner is not None:
            return self.tuner(x, weight)
        if self.mode != "triton" or x.device.type != "cuda":
            return None
        if _tracing_or_intercepted():  # no state read while torch.compile traces (a guard on it would recompile)
            return TRITON
        key = depthwise.shape_key(x, weight)
        if key not in self.gated:
            self.gated[key] = self._gated_triton(key, x, weight)
        return self.gated[key]

    def _gated_triton(self, key: str, x: torch.Tensor, weight: torch.Tensor) -> depthwise.Formulation:
        """The Triton kernels for the parts that pass the accuracy gate on this batch, PyTorch's own for the rest."""
        names = {part: ["triton"] for part, _ in depthwise.PARTS}
        eligible, found = depthwise_gate.gate(depthwise_gate.sample_inputs(x, weight), names)
        rejected = depthwise_gate.describe_rejected(found, x.dtype, eligible)
        if rejected:
            self.rejected[key] = rejected
            log.warning("depthwise %s: the accuracy gate rejected %s", key, rejected)
        parts = ((part, plain) for (part, _), plain in zip(depthwise.PARTS, depthwise.PLAIN))
        return depthwise.valid_formulation("triton" if "triton" in eligible[part] else plain for part, plain in parts)

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
        if self.tuner is not None:
            return {"depthwise": {**self.tuner.summary(), "mode": f"gpu {self.mode}"}}
        return {
            "depthwise": {
                "mode": f"gpu {self.mode}",
                "formulations": len(self.gated),
                "measured": 0,
                "measure_seconds": 0.0,
                "rejected": dict(self.rejected),
            }
        }
