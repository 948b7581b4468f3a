"""BatchNorm running statistics across ranks: each rank's own, their average (what evaluation, checkpoints and the
export see), and each rank's own again afterwards, so that a resumed run stays bit for bit on course."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist


def batchnorm_stats(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of this rank's BatchNorm running statistics, by buffer name."""
    return {
        f"{name}.{stat}": getattr(module, stat).detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
        for stat in ("running_mean", "running_var")
    }


def load_batchnorm_stats(model: torch.nn.Module, stats: Dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    for name, value in stats.items():
        buffers[name].copy_(value)


@contextlib.contextmanager
def batchnorm_averaged(*models: torch.nn.Module) -> Iterator[None]:
    """Inside, every rank holds BatchNorm statistics averaged over ranks (what evaluation and checkpoints see);
    afterwards each rank has its own again. So a save or an evaluation that an uninterrupted run would not have
    made (at a stop, at a preemption) leaves the run unchanged, and a resumed run stays bit for bit on course."""
    own = [batchnorm_stats(model) for model in models]
    for model in models:
        sync_batchnorm_stats(model)
    try:
        yield
    finally:
        for model, stats in zip(models, own):
            load_batchnorm_stats(model, stats)


def sync_batchnorm_stats(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks so every rank holds the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for buf in (module.running_mean, module.running_var):
                assert buf is not None  # (running_var exists wherever running_mean does)
                dist.all_reduce(buf)
                buf /= dist.get_world_size()


class BatchNormStats:
    """The checkpointed part of BatchNorm: each rank's own running statistics of ``models`` (the model and the
    EMA), kept beside the saved model that holds their average, so a resumed rank continues from its own.
    ``averaged()`` is ``batchnorm_averaged`` over them; a ``state_dict()`` taken inside it is the statistics each
    rank had before averaging."""

    def __init__(self, models: List[torch.nn.Module]) -> None:
        self.models = models
        self._own: Optional[List[Dict[str, torch.Tensor]]] = None

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        self._own = [batchnorm_stats(model) for model in self.models]
        try:
            with batchnorm_averaged(*self.models):
                yield
        finally:
            self._own = None

    def state_dict(self) -> List[Dict[str, torch.Tensor]]:
        return self._own if self._own is not None else [batchnorm_stats(model) for model in self.models]

    def load_state_dict(self, state: List[Dict[str, torch.Tensor]]) -> None:
        for model, own in zip(self.models, state):
            load_batchnorm_stats(model, own)
