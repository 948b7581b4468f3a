"""How this process's depthwise convolutions choose their formulation, as the Trainer's component: on a CPU the
measured (or fixed) formulations and malloc policy of ``conv2former.cpu``, on a GPU the per-shape choice of
``conv2former.gpu_depthwise``. Checkpointed per rank (the same bits on resume), reported in the summary."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from conv2former.config import TrainConfig
from conv2former.cpu import CpuTuning, not_installed_summary
from conv2former.engine.component import Component
from conv2former.engine.state import CheckpointState
from conv2former.gpu_depthwise import GpuDepthwise


class DepthwiseChoice(Component):
    def __init__(self, cfg: TrainConfig, gpu: bool) -> None:
        self.cpu: Optional[CpuTuning] = None if gpu else CpuTuning.install(cfg.cpu)
        self.gpu: Optional[GpuDepthwise] = GpuDepthwise.install(cfg.gpu.depthwise, cfg.deterministic) if gpu else None

    @property
    def chooser(self) -> Any:
        return self.cpu if self.cpu is not None else self.gpu

    def register(self, state: CheckpointState) -> None:
        state.register("depthwise", self.chooser, per_rank=True, other_world="first")

    def due(self, step: int) -> bool:
        return False  # (reported with the training scalars: engine/training_log.py)

    def reused(self) -> int:
        """How many formulations the resumed checkpoint gave back (0 after a fresh start)."""
        return self.cpu.tuner.loaded if self.cpu is not None else self.gpu.loaded if self.gpu is not None else 0

    def new_measurements(self) -> List[str]:
        """One line per formulation measured since the last call."""
        return self.chooser.new_measurements() if self.chooser is not None else []

    def summary(self) -> Dict[str, Any]:
        return {
            **(self.cpu.summary() if self.cpu is not None else not_installed_summary()),
            **(self.gpu.summary() if self.gpu is not None else {}),
        }
