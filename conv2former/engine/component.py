"""The protocol the Trainer's components speak (as torchtitan's ``components/``): each owns its state (registered
once, by itself), its cadence (``due(step)``) and its part of the summary (``summary()``); the Trainer reads none of
their internals. A new piece of per-step behaviour is one ``Component`` and one entry in the Trainer's list
(docs/architecture.md shows the diff)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch

from conv2former.engine.state import CheckpointState

__all__ = ["Component", "Components"]


class Component:
    """Does nothing by default: no state, due at every step, no summary."""

    def register(self, state: CheckpointState) -> None:
        """Put what a checkpoint must hold of this component into ``state`` (once, before the resume)."""

    def due(self, step: int) -> bool:
        """Whether ``after_step`` runs after optimizer step ``step``."""
        return True

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step`` (``loss``: its mean loss, on the device; reading it waits for the device).
        May raise a stop (``Preempted``, a ``RunFault``)."""

    def summary(self) -> Dict[str, Any]:
        """Its fields of the run summary."""
        return {}


class Components:
    """The components in the order their ``after_step`` runs."""

    def __init__(self, items: Iterable[Component]) -> None:
        self.items: List[Component] = list(items)

    def register(self, state: CheckpointState) -> None:
        for item in self.items:
            item.register(state)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        for item in self.items:
            if item.due(step):
                item.after_step(step, loss)

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for item in self.items:
            out.update(item.summary())
        return out
