"""The memory planner (conv2former/engine/memory_plan.py): activations measured on fake tensors against what the CPU
allocator holds for one real step, ZeRO's per-rank state, ``--plan-memory`` and ``data.batch_size=auto``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import REPO, real_processes
from single_rank import single_rank

from conv2former.config import ModelConfig
from conv2former.engine.distributed import python_path
from conv2former.engine.memory_plan import GiB, state_bytes, step_activation_bytes
from conv2former.units import parse_bytes

# One real step of a small variant in a fresh process: the peak resident memory above what the process held before
# it (the model, the batch, the kernels warmed up), with every allocation of 64 KiB or more mapped on its own (malloc
# then gives freed tensors back at once, so resident memory follows live tensors).
REAL_STEP = """
import sys, torch, timm, conv2former
torch.set_num_threads(1)
def kib(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
model = timm.create_model(sys.argv[1], num_classes=100)
x = torch.randn(int(sys.argv[2]), 3, int(sys.argv[3]), int(sys.argv[3]))
with torch.no_grad():
    model(x[:1])
base = kib("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
loss.backward()
print(kib("VmHWM:") - base)
"""


@pytest.mark.slow
def test_the_planned_step_is_within_15_percent_of_what_a_real_step_holds():
    """conv2former_n, batch 32 at 64 px, fp32: activations (fake tensors) + the gradients (4 bytes a parameter)
    against the resident memory one real step adds on this CPU."""
    import timm

    environ = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=python_path(str(REPO)), OMP_NUM_THREADS="1")
    environ = real_processes(environ)  # (the memory a fresh process adds, not one forked from a zygote)
    done = subprocess.run(
        [sys.executable, "-c", REAL_STEP, "conv2former_n", "32", "64"], env=environ, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    real = int(done.stdout.split()[-1])
    parameters = sum(p.numel() for p in timm.create_model("conv2former_n", num_classes=100).parameters())
    model = ModelConfig(variant="conv2former_n", drop_path_rate=0.0)  # (as the real step: timm's default)
    planned = step_activation_bytes(model, 100, 64, 32, "fp32", False) + 4 * parameters
    assert abs(planned - real) / real < 0.15, (planned / 2**20, real / 2**20)


def test_activations_grow_linearly_with_the_batch_and_shrink_with_checkpointing():
    """The planner measures two micro-batches and extrapolates: a third lands on the line; activation
    checkpointing keeps a fraction; bf16 about halves the fp32 figure."""
    measure = lambda batch, precision="bf16", ckpt=False: step_activation_bytes(  # noqa: E731
        ModelConfig(variant="conv2former_demo", drop_path_rate=0.0, grad_checkpointing=ckpt),
        40,
        64,
        batch,
        precision,
        True,
    )
    two, four, eight = measure(2), measure(4), measure(8)
    assert eight == pytest.approx(four + 2 * (four - two), rel=0.03)
    assert measure(8, ckpt=True) < 0.75 * eight  # the stem and the block being recomputed stay)
    assert measure(8, "fp32") == pytest.approx(2 * eight, rel=0.15)


def test_the_optimizer_state_follows_zeros_memory_model():
    """Per rank, bf16: 2 bytes of weights, 2 of gradients, 12 of fp32 master + AdamW moments per parameter; stage 1
    shards the 12, stage 2 the gradients too, stage 3 the weights and the fp32 EMA too."""
    n, world = 1_000_000, 8
    assert state_bytes(n, "bf16", 0, world, ema=True) == {"weights": 2 * n, "gradients": 2 * n,
                                                          "optimizer": 12 * n, "ema": 4 * n}  # fmt: skip
    assert state_bytes(n, "bf16", 1, world, ema=False)["optimizer"] == 12 * n // world
    assert state_bytes(n, "bf16", 2, world, ema=False)["gradients"] == 2 * n // world
    assert state_bytes(n, "bf16", 3, world, ema=False)["weights"] == 2 * n // world
    assert state_bytes(n, "bf16", 3, world, ema=True)["ema"] == 4 * n // world  # the sharded ZeRO-3 EMA
    assert sum(state_bytes(n, "fp32", 0, 1, ema=False).values()) == 16 * n
    # one size parser (conv2former/units.py): GB = 10^9, GiB = 2^30, the B optional, any case
    assert parse_bytes("80GiB", "k") == 80 * GiB == parse_bytes("80gi", "k") and parse_bytes("512m", "k") == 512 * 10**6
    assert parse_bytes("80GB", "k") == 80 * 10**9 == parse_bytes("8e10", "k")


def run_launcher(capsys: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``launch/pretrain.py ARGS`` in this process (tests/single_rank.py): its exit code and what it printed."""
    from launch.pretrain import main

    with single_rank():
        try:
            code = main(list(args))
        except SystemExit as exited:
            code = int(exited.code or 0)
    out = capsys.readouterr()
    assert not check or code == 0, out.out[-2000:] + out.err[-2000:]
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def test_plan_memory_prints_the_plan_for_a_gpu_without_one(capsys, demo_shards, tmp_path):
    """``--plan-memory --gpu-memory 80GB --ranks 8``: per-rank state under ZeRO, activations at the micro-batch,
    the largest micro-batch that fits and the one ``auto`` would pick (dividing the global batch)."""
    out = run_launcher(capsys, "--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--plan-memory",
                       "--gpu-memory", "80GiB", "--ranks", "8", "--zero-stage", "2").stdout  # fmt: skip
    plan = json.loads(out[out.index("{") :])
    assert plan["ranks"] == 8 and plan["zero_stage"] == 2 and plan["precision"] == "bf16"
    per_rank = plan["per_rank_gib"]
    assert per_rank["total"] == pytest.approx(sum(v for k, v in per_rank.items() if k != "total"), abs=0.02)
    assert plan["largest_micro_batch"] >= plan["auto_micro_batch"] > 0 and plan["gpu_memory_gib"] == 80
    assert not (tmp_path / "checkpoints").exists()


def test_auto_batch_size_keeps_the_global_batch_and_the_schedule(capsys, demo_shards, tmp_path):
    """``data.batch_size=auto`` with a memory budget: the micro-batch the plan picks, the same global batch, the
    accumulation following, and the same steps and lr as a fixed micro-batch; no budget on a CPU: one line."""
    common = ["--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--dry-run"]
    auto = _json(run_launcher(capsys, *common, "--set", "data.batch_size=auto", "--set", "data.memory_budget=3.5GiB"))
    micro = auto["schedule"]["micro_batch"]
    assert auto["memory_plan"]["micro_batch"] == micro and micro <= auto["memory_plan"]["largest_micro_batch"]
    # the demo's fixed micro-batch 16 on 1 rank (test_pretrain's dry-run test): global 64, 31 steps an epoch, 310 in
    # all, 31 of warmup, lr 2e-3; auto changes the micro-batch and the accumulation only
    assert auto["schedule"]["global_batch"] == 64 and auto["schedule"]["grad_accum"] * micro == 64
    assert (auto["schedule"]["total_steps"], auto["schedule"]["warmup_steps"]) == (310, 31)
    assert auto["schedule"]["lr"] == pytest.approx(2e-3)
    failed = run_launcher(capsys, *common, "--set", "data.batch_size=auto", check=False)
    assert failed.returncode == 2 and "data.memory_budget" in failed.stderr.strip().splitlines()[-1]


def _json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout[done.stdout.index("{") :])
