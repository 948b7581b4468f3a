"""Progressive resizing keeps the exact resume: 2 CPU ranks, epoch 0 at 32 px and epoch 1 at 64 px; killed with
SIGKILL in the low-resolution epoch, relaunched, stopped right at the size change (checkpoint 31, the epoch end),
relaunched: the export equals the uninterrupted run's bit for bit, on both backends (dali-cpu with the micro-batch
scaled with the area, torch with progressive regularization)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, ranks_launch, stage_env, summary_from
from safetensors.torch import load_file

PRETRAIN = str(REPO / "launch" / "pretrain.py")
STEPS_PER_EPOCH = 31


def _args(shards: str, out: Path, backend: str, regularization: bool) -> list:
    grow = ["--set", "data.size_schedule_regularization=0.5"] if regularization else []
    if backend == "dali-cpu":  # micro-batch 32 (accumulation 1) at 32 px, 16 (accumulation 2) at 64: global 64
        grow += ["--set", "data.size_schedule_scale_batch=true"]
    return [*grow,
        "--variant", "demo", "--image-size", "64", "--set", "data.size_schedule=[[0.0, 32], [0.5, 64]]",
        "--backend", backend, "--set", "schedule.warmup_epochs=0.2", "--set", "logging.print_every=1",
        "--set", "data.eval_batch_size=50", "--data", shards, "--output", str(out), "--epochs", "2",
        "--save-every", "10",
    ]  # fmt: skip


def _run(args: list) -> dict:
    proc = subprocess.run(
        ranks_launch(PRETRAIN, *args), env=stage_env(), capture_output=True, text=True, errors="replace",
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return summary_from(proc.stdout)


def _data_positions(run: Path, step: int) -> list:
    states = torch.load(run / "checkpoints" / f"step{step:09d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["data"]


@pytest.mark.slow
@pytest.mark.parametrize("backend, regularization", [("dali-cpu", False), ("torch", True)])
def test_kill_in_the_low_resolution_epoch_and_a_stop_at_the_size_change_resume_bitwise(
    demo_shards, tmp_path, backend, regularization
):
    """(torch: with progressive regularization too, RandAugment m and Mixup/CutMix at half strength at 32 px)"""
    reference = tmp_path / "reference"
    _run(_args(demo_shards, reference, backend, regularization))
    records = [r for r in map(json.loads, (reference / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert {(r["epoch"], r["image_size"]) for r in records} == {(0, 32), (1, 64)}
    if regularization:
        assert {(r["epoch"], r["augment_strength"]) for r in records} == {(0, 0.5), (1, 1.0)}
    if backend == "dali-cpu":
        assert {(r["epoch"], r["micro_batch"]) for r in records} == {(0, 32), (1, 16)}
        assert [r["step"] for r in records] == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # 31 optimizer steps each

    run = tmp_path / "interrupted"
    args = _args(demo_shards, run, backend, regularization)
    proc = subprocess.Popen(
        ranks_launch(PRETRAIN, *args), env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step000000020" / "complete").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, in the 32-px epoch
    proc.wait()
    assert [p["image_size"] for p in _data_positions(run, 20)] == [32, 32]
    resumed = _run([*args, "--max-steps", str(STEPS_PER_EPOCH)])["resumed_from"]
    assert resumed["epoch"] == 0 and resumed["step"] in (20, 30)  # the newest checkpoint the kill left
    # checkpoint 31 ends epoch 0: its data position is epoch 1's start, at the new size
    assert [(p["epoch"], p["step"], p["image_size"]) for p in _data_positions(run, 31)] == [(1, 0, 64)] * 2
    final = _run(args)
    assert final["resumed_from"]["step"] == STEPS_PER_EPOCH and final["step"] == 2 * STEPS_PER_EPOCH
    a, b = load_file(reference / "export" / "model.safetensors"), load_file(run / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
