"""What a checkpoint holds beside DeepSpeed's model and optimizer: a registry of stateful components.

Each component implements ``state_dict()`` / ``load_state_dict(state)`` and is registered once, under the key its
state has in the checkpoint, with its scope:

    global     the same on every rank (step and epoch, scheduler, EMA, best evaluation, guard): saved as rank 0 has
               it, loaded as saved
    per rank   each rank's own (loader position, RNG streams, BatchNorm statistics, depthwise choices): gathered
               into a list indexed by rank, each rank loads its own entry. Resumed on another number of ranks, the
               entry is ``other_world="first"`` (rank 0's, where that is meaningful on any rank: the loader's
               position, which the loader re-splits, the depthwise choices) or ``"fresh"`` (the component keeps its
               new state: RNG streams, BatchNorm statistics, which the saved model holds averaged anyway)

``constant`` entries (the config, the class list, the schedule) are written for the readers of a checkpoint and
never loaded. A key a checkpoint lacks (written before its component existed) leaves the component fresh, unless
the entry is ``required``. The rules above live here and nowhere else: adding a piece of checkpointed state is one
``register`` call beside the component that owns it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Tuple

import numpy as np
import torch
from torch.utils._pytree import tree_map

from conv2former.engine.distributed import gather
from conv2former.errors import UserError

OTHER_WORLD = ("first", "fresh")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class _Entry:
    key: Optional[str]  # None: the component's state dict is spread over the checkpoint's top-level keys
    component: Stateful
    per_rank: bool
    other_world: str
    required: bool


def _on_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU: gathered as pickles, a CUDA tensor would be unpickled on the GPU it came from."""
    return tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, obj)


class CheckpointState:
    """The registry: ``state_dict()`` is the client state DeepSpeed saves with the model (one gather for every
    per-rank part), ``load_state_dict(state)`` hands each component its part under the rules above."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.entries: List[_Entry] = []
        self.constants: Dict[str, Any] = {}

    def register(
        self,
        key: Optional[str],
        component: Stateful,
        *,
        per_rank: bool = False,
        other_world: str = "fresh",
        required: bool = False,
    ) -> None:
        if other_world not in OTHER_WORLD:
            raise ValueError(f"other_world must be one of {OTHER_WORLD}, got {other_world!r}")
        if key is not None and (any(e.key == key for e in self.entries) or key in self.constants):
            raise ValueError(f"checkpoint state {key!r} is registered twice")
        self.entries.append(_Entry(key, component, per_rank, other_world, required))

    def constant(self, key: str, value: Any) -> None:
        self.constants[key] = value

    def keys(self) -> List[str]:
        return [e.key for e in self.entries if e.key is not None] + list(self.constants)

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {}
        own: Dict[str, Any] = {}
        for entry in self.entries:
            value = entry.component.state_dict()
            if entry.per_rank:
                own[entry.key] = _on_cpu(value)  # type: ignore[index]
            elif entry.key is None:
                state.update(value)
            else:
                state[entry.key] = value
        if own:
            every = gather(own)
            state.update({key: [rank_state[key] for rank_state in every] for key in own})
        state.update(self.constants)
        return state

    def load_state_dict(self, state: Dict[str, Any], where: str = "the checkpoint") -> None:
        for entry in self.entries:
            if entry.key is None:
                entry.component.load_state_dict(state)
                continue
            value = state.get(entry.key)
            if value is None:
                if entry.required:
                    raise UserError(
                        f"{where} has no {entry.key!r} state: it was not written by this pipeline; start a new "
                        "run in another --output"
                    )
                continue
            if entry.per_rank:
                value = self._own_entry(value, entry.other_world)
                if value is None:
                    continue
            entry.component.load_state_dict(value)

    def _own_entry(self, values: List[Any], other_world: str) -> Any:
        if len(values) == self.world_size:
            return values[self.rank]
        return values[0] if other_world == "first" and values else None


class RngState:
    """This rank's Python, NumPy, torch (and CUDA) random streams, as tensors and plain lists only (loadable with
    ``weights_only=True``)."""

    def state_dict(self) -> Dict[str, Any]:
        np_state: Tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
        version, values, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "python": [list(values), version, gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        values, version, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
