"""Faults of a long run, on real components: shards that become unreadable under the loaders (both backends), the
checkpoint size estimate and free-space check, and how a lost rank is named. The end-to-end faults (NaN, a full
disk, a dead or hung rank under the deepspeed launcher) are in tests/test_pretrain.py."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conv2former.config import DataConfig
from conv2former.data.loader import build_loader
from conv2former.data.shards import epoch_shard_order
from conv2former.engine import disk
from conv2former.engine.guard import DivergenceGuard
from conv2former.engine.lost_ranks import is_collective_failure
from conv2former.errors import DataFault, UserError

BACKENDS = ["torch", "dali-cpu"]


@pytest.fixture
def shards_copy(demo_shards, tmp_path) -> Path:
    """A private copy of the demo "22k" shards (8 train shards of 250 samples) that a test may damage."""
    out = tmp_path / "in22k"
    shutil.copytree(demo_shards, out)
    return out


def loader_for(root: Path, backend: str, skip: bool):
    cfg = DataConfig(
        root=str(root), backend=backend, image_size=32, batch_size=50, workers=1, shuffle_buffer=64,
        skip_bad_shards=skip,
    )  # fmt: skip
    return build_loader(cfg, "train")


def last_shard_of_epoch(loader, epoch: int) -> str:
    """The tar read last in ``epoch`` (untouched after the first batches even with read-ahead)."""
    order = epoch_shard_order(len(loader.shards.shards), loader.seed, epoch)
    return loader.shards.shards[order[-1]].tar


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_truncated_mid_epoch_stops_with_its_name_and_the_position(shards_copy, backend):
    loader = loader_for(shards_copy, backend, skip=False)
    batches = iter(loader)
    next(batches)
    victim = last_shard_of_epoch(loader, 0)
    truncate(victim)
    with pytest.raises(DataFault) as err:
        for _ in batches:
            pass
    message = str(err.value)
    assert "\n" not in message and victim in message and "epoch 0, step" in message
    assert "--set data.skip_bad_shards=true" in message and err.value.exit_code == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_skipping_keeps_the_step_count_and_counts_the_shards(shards_copy, backend, caplog):
    loader = loader_for(shards_copy, backend, skip=True)
    steps = len(loader)
    batches = iter(loader)
    next(batches)
    truncated = last_shard_of_epoch(loader, 0)
    truncate(truncated)
    with caplog.at_level(logging.WARNING, logger="conv2former"):
        labels = [y for _, y in batches]
    assert len(labels) + 1 == steps and all(bool((y >= 0).all()) for y in labels)  # full batches, real labels
    assert loader.skipped_shards == [truncated]
    assert any("skipping shard" in r.message and truncated in r.message for r in caplog.records)
    deleted = last_shard_of_epoch(loader, 1)
    if deleted == truncated:
        deleted = (
            loader.shards.shards[0].tar if loader.shards.shards[0].tar != truncated else loader.shards.shards[1].tar
        )
    os.remove(deleted)
    loader.set_epoch(1)
    assert sum(1 for _ in loader) == steps  # every rank keeps its step count: the epoch is exactly as long
    assert sorted(loader.skipped_shards) == sorted([truncated, deleted])
    assert loader.state_dict()["skipped_shards"] == loader.skipped_shards
    # a relaunch opens the split with the tar gone: its index keeps the place, so the schedule does not change
    assert len(loader_for(shards_copy, backend, skip=True)) == steps
    with pytest.raises(UserError, match="shard listed in _info.json is missing"):
        loader_for(shards_copy, backend, skip=False)


def test_a_deleted_shard_stops_the_next_epoch_when_not_skipping(shards_copy):
    loader = loader_for(shards_copy, "dali-cpu", skip=False)
    for _ in loader:
        pass
    gone = loader.shards.shards[3].tar
    os.remove(gone)
    with pytest.raises(DataFault, match=r"cannot be opened .* at epoch 1, step 0 of the train split"):
        next(iter(loader))


def test_evaluation_never_skips(shards_copy):
    cfg = DataConfig(
        root=str(shards_copy), backend="torch", image_size=32, batch_size=50, workers=0, skip_bad_shards=True
    )
    loader = build_loader(cfg, "val")
    os.remove(loader.shards.shards[0].tar)
    with pytest.raises(DataFault, match="of the val split"):
        next(iter(loader))


def test_checkpoint_estimate_and_free_space_warning(tmp_path):
    model = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters
    params = 1_001_000
    fp32 = disk.estimate_checkpoint(model, zero_stage=1, half=False, ema=True, world_size=2)
    assert (fp32.weights, fp32.optimizer, fp32.ema) == (4 * params, 12 * params, 4 * params)
    assert disk.estimate_checkpoint(model, 0, False, False, 2).total == 12 * params  # torch AdamW: no master copy
    zero3 = disk.estimate_checkpoint(model, 3, True, True, 4)
    assert zero3.weights == 0 and zero3.ema == 4 * 4 * params  # partitions only; the EMA in every rank's file
    assert disk.space_warning(str(tmp_path), fp32, keep_last=2, existing=0) is None
    huge = disk.CheckpointSize(weights=10**15, optimizer=0, ema=0, world_size=1)
    warning = disk.space_warning(str(tmp_path / "not" / "yet"), huge, keep_last=2, existing=0)
    assert "checkpoint.keep_last=2" in warning and "free but needs about" in warning
    assert disk.human(12_345_678) == "12.3 MB"


def test_collective_failures_are_told_from_bugs():
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:3492. This is ...")
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    assert is_collective_failure(closed) and is_collective_failure(timed_out)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("Connection closed by peer"))


def test_divergence_guard_reads_one_step_late_and_names_the_first_bad_step():
    """Without a process group: each step's flag is read at the next step; two bad steps in a row trip a guard that
    allows two, and the run it reports starts at the first of them."""
    guard = DivergenceGuard(max_bad_steps=2, device=torch.device("cpu"))
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    assert guard.observe(1, one, 0.5) is None
    assert guard.observe(2, nan, 0.5) is None  # step 1 read: finite
    assert guard.observe(3, one, float("inf"))["step"] == 2 and not guard.tripped
    assert guard.observe(4, one, 0.5)["step"] == 3 and guard.tripped
    assert [r["step"] for r in guard.last_run()] == [2, 3]
    assert guard.flush() is None and not guard.tripped  # step 4 was finite: the count starts over
    assert guard.observe(5, one, None) is None and guard.flush() is None  # no grad norm (ZeRO 3 before a step)
    assert [r["step"] for r in guard.bad_steps] == [2, 3]


def test_gloo_is_pinned_to_the_interface_that_reaches_the_rendezvous(monkeypatch):
    """Across nodes gloo must bind where MASTER_ADDR is reached (here the loopback), never where the host name
    resolves; an explicit GLOO_SOCKET_IFNAME, NCCL, or a single rank leave the environment alone."""
    from conv2former.engine.distributed import pin_gloo_interface, route_interface

    assert route_interface("127.0.0.1") == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")  # recorded, so the teardown removes what the test sets
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pin_gloo_interface("gloo") is None and "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert pin_gloo_interface("nccl") is None and "GLOO_SOCKET_IFNAME" not in os.environ
    assert pin_gloo_interface("gloo") == "lo" and os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert pin_gloo_interface("gloo") is None and os.environ["GLOO_SOCKET_IFNAME"] == "eth7"


@pytest.mark.slow
def test_the_deterministic_setting_asks_torch_and_cudnn_for_repeatable_kernels():
    """``deterministic: true`` (what tests/test_gpu.py's bitwise checks use on a GPU), in a process of its own."""
    script = (
        "import os, torch; from conv2former.engine.distributed import make_deterministic; make_deterministic(); "
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
        "torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ['CUBLAS_WORKSPACE_CONFIG'])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "True", "False", ":4096:8"]


def test_fp16_loss_scaler_skips_are_not_bad_steps_until_too_many_in_a_row():
    """Under fp16 an overflow skip (inf gradient norm, step not applied) is the loss scaler at work; a non-finite loss
    is still bad, and so is a run of skips longer than max_overflow_skips."""
    guard = DivergenceGuard(max_bad_steps=1, device=torch.device("cpu"), max_overflow_skips=3)
    finite, inf = torch.tensor(2.0), torch.tensor(float("inf"))
    for step in range(1, 4):  # three skips in a row: tolerated
        assert guard.observe(step, finite, inf, overflow_skipped=True) is None
    assert guard.flush() is None and guard.overflow_skips == 3
    guard.observe(4, finite, torch.tensor(1.0))  # an applied step ends the run of skips
    assert guard.flush() is None and guard.overflow_run == 0
    for step in range(5, 9):  # four in a row: the fourth is one too many
        guard.observe(step, finite, inf, overflow_skipped=True)
    assert guard.flush()["step"] == 8 and guard.tripped
    nan_loss = DivergenceGuard(max_bad_steps=1, device=torch.device("cpu"))
    nan_loss.observe(1, torch.tensor(float("nan")), inf, overflow_skipped=True)
    assert nan_loss.flush()["step"] == 1  # a non-finite loss is bad whatever the scaler did
    restored = DivergenceGuard(max_bad_steps=1, device=torch.device("cpu"))
    restored.load_state_dict(guard.state_dict())
    assert (restored.overflow_skips, restored.overflow_run) == (7, 4)


RANK0_WORK = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from conv2former.engine.rank0_work import on_rank0
dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # the collective timeout
rank = dist.get_rank()
if sys.argv[1] == "rank0_work":
    for round in range(2):
        result = on_rank0(lambda: time.sleep(5) or f"exported {round}", timeout_minutes=1)
        print(rank, result)
    dist.barrier()
else:  # a plain barrier while rank 0 works: bounded by the collective timeout
    if rank == 0:
        time.sleep(5)
    try:
        dist.barrier()
        print(rank, "passed")
    except RuntimeError:
        print(rank, "timed out")
        os._exit(0)
"""


@pytest.mark.parametrize("wait", ["rank0_work", "plain_barrier"])
@pytest.mark.slow
def test_the_ranks_wait_for_rank0s_long_work_past_the_collective_timeout(tmp_path, wait):
    """Rank 0 works 5 s (twice) under a 2 s collective timeout: the others wait for it through engine/rank0_work.py
    (the rendezvous store, a timeout of its own) and all go on; a plain barrier there times out."""
    from conftest import REPO, next_port

    from conv2former.engine.distributed import python_path

    port = str(next_port())
    procs = []
    for rank in range(2):  # (this checkout's code, whatever the environment has installed)
        environ = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       PYTHONPATH=python_path(str(REPO)))  # fmt: skip
        command = [sys.executable, "-c", RANK0_WORK, wait]
        procs.append(subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, text=True, cwd=tmp_path))
    outputs = [p.communicate(timeout=60)[0].splitlines() for p in procs]
    if wait == "rank0_work":
        assert outputs == [["0 exported 0", "0 exported 1"], ["1 None", "1 None"]]
    else:
        assert outputs[1] == ["1 timed out"]


def test_nccl_runs_keep_torchs_teardown_and_dump_the_flight_recorder_into_the_run(monkeypatch, tmp_path):
    """Before an NCCL group starts: torch's watchdog teardown, the flight recorder on, dumping each rank's last
    collectives into OUTPUT/nccl_trace/ on a timeout; a value the user set is kept."""
    from conv2former.engine.distributed import NCCL_FAULT_SETTINGS, nccl_fault_settings

    for key in (*NCCL_FAULT_SETTINGS, "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("TORCH_NCCL_TRACE_BUFFER_SIZE", raising=False)
    chosen = nccl_fault_settings(str(tmp_path / "nccl_trace"))
    assert chosen["TORCH_FR_BUFFER_SIZE"] == "2000" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ  # torch 2.14
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "nccl_trace" / "rank_")
    assert (tmp_path / "nccl_trace").is_dir()
    # a value the user set wins, under the current name or the deprecated one
    for key in (*NCCL_FAULT_SETTINGS, "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    chosen = nccl_fault_settings(str(tmp_path / "nccl_trace"))
    assert "TORCH_FR_BUFFER_SIZE" not in chosen and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in chosen
    assert os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def test_a_late_read_on_cpu_is_the_tensor_after_its_collective():
    """engine/late_read.py on CPU (gloo, one rank here): the value is the tensor itself once the work is done."""
    from conv2former.engine.late_read import LateRead

    flag = torch.tensor([3.0])
    late = LateRead(flag)
    assert late.ready() and late.value() is flag
