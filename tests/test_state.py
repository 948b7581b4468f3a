"""The checkpoint-state registry (conv2former/engine/state.py): scopes, the other-world-size rules, older
checkpoints that lack a key, and the RNG component. The trainer's own registry on a real run, and a checkpoint
rewritten into the older layout resuming bit for bit, are in tests/test_pretrain.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conv2former.engine.state import CheckpointState, RngState
from conv2former.errors import UserError


class Box:
    """A component whose state is one value."""

    def __init__(self, value=None) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state) -> None:
        self.value = state["value"]


class Progress:
    def __init__(self) -> None:
        self.epoch, self.step = 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state) -> None:
        self.epoch, self.step = state["epoch"], state["step"]


def registry(rank: int, world_size: int):
    parts = {"progress": Progress(), "sched": Box(), "data": Box(), "rng": Box(), "choices": Box()}
    state = CheckpointState(rank, world_size)
    state.register(None, parts["progress"], required=True)
    state.register("scheduler", parts["sched"], required=True)
    state.register("data", parts["data"], per_rank=True, other_world="first")
    state.register("rng", parts["rng"], per_rank=True)
    state.register("depthwise", parts["choices"], per_rank=True, other_world="first")
    state.constant("classes", ["a", "b"])
    return state, parts


def saved_by_two_ranks():
    return {
        "epoch": 3,
        "step": 120,
        "scheduler": {"value": "s"},
        "data": [{"value": "data0"}, {"value": "data1"}],
        "rng": [{"value": "rng0"}, {"value": "rng1"}],
        "depthwise": [{"value": "dw0"}, {"value": "dw1"}],
        "classes": ["a", "b"],
    }


def test_the_client_state_holds_globals_per_rank_lists_and_constants():
    state, parts = registry(0, 1)
    parts["progress"].epoch, parts["progress"].step = 1, 7
    parts["sched"].value, parts["data"].value, parts["rng"].value = "s", "d", "r"
    saved = state.state_dict()
    assert saved == {
        "epoch": 1,
        "step": 7,
        "scheduler": {"value": "s"},
        "data": [{"value": "d"}],  # no process group: this rank's alone
        "rng": [{"value": "r"}],
        "depthwise": [{"value": None}],
        "classes": ["a", "b"],
    }
    assert state.keys() == ["scheduler", "data", "rng", "depthwise", "classes"]


def test_each_rank_loads_its_own_entry_on_the_same_world_size():
    state, parts = registry(1, 2)
    state.load_state_dict(saved_by_two_ranks())
    assert (parts["progress"].epoch, parts["progress"].step) == (3, 120)
    assert [parts[k].value for k in ("sched", "data", "rng", "choices")] == ["s", "data1", "rng1", "dw1"]


@pytest.mark.parametrize("world_size", [1, 3])
def test_another_world_size_takes_rank_0s_entry_or_keeps_the_fresh_state(world_size):
    state, parts = registry(world_size - 1, world_size)
    parts["rng"].value = "fresh"
    state.load_state_dict(saved_by_two_ranks())
    assert parts["data"].value == "data0" and parts["choices"].value == "dw0"  # other_world="first"
    assert parts["rng"].value == "fresh"  # other_world="fresh": a stream of another rank would be a wrong one


def test_a_checkpoint_without_a_newer_component_leaves_it_fresh():
    older = saved_by_two_ranks()
    del older["depthwise"]
    state, parts = registry(0, 2)
    parts["choices"].value = "untouched"
    state.load_state_dict(older)
    assert parts["choices"].value == "untouched" and parts["data"].value == "data0"


def test_a_checkpoint_missing_required_state_is_a_user_error():
    older = saved_by_two_ranks()
    del older["scheduler"]
    state, _ = registry(0, 2)
    with pytest.raises(UserError):
        state.load_state_dict(older, where="runs/x/checkpoints/step000000120")


def test_a_key_is_registered_once():
    state, _ = registry(0, 1)
    with pytest.raises(ValueError):
        state.register("data", Box())
    with pytest.raises(ValueError):
        state.register("classes", Box())
    with pytest.raises(ValueError):
        state.register("other", Box(), per_rank=True, other_world="average")


def test_the_rng_component_restores_every_stream():
    rng = RngState()
    saved = rng.state_dict()
    drawn = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(5), np.random.seed(7)
    rng.load_state_dict(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
    # plain types and tensors only: loadable by torch.load(weights_only=True)
    assert all(isinstance(v, (torch.Tensor, list, type(None))) for v in saved.values())
