"""The loop's single-rank behaviours, tested inside the pytest process (tests/single_rank.py) on the real DeepSpeed
engine and loaders: cadence (scalars, evaluation, checkpoints), checkpoint contents and an exact resume, the guard,
preemption, the summary, the sinks and the profiler, each in seconds. What needs several ranks (dealing, BatchNorm
and the EMA across ranks, lost ranks, two nodes, world-size changes) stays in the launched tests
(tests/test_pretrain.py and friends)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from single_rank import pretrain_config, single_rank

from conv2former.engine.trainer import Trainer

# the demo at 32 px on one rank: 31 optimizer steps an epoch (16 x 4 micro-steps)
FLAGS = ["--set", "schedule.warmup_epochs=0.2", "--set", "data.eval_batch_size=50", "--set", "logging.print_every=5",
         "--set", "schedule.eval_every_epochs=1", "--epochs", "2", "--save-every", "10"]  # fmt: skip


def fit(data: str, out: Path, *flags: str) -> dict:
    """One stage run in this process; its summary."""
    cfg = pretrain_config(data, str(out), *FLAGS, *flags)
    with single_rank():
        return Trainer(cfg).fit()


def records(out: Path, kind: str) -> list:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def export_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    """An uninterrupted single-rank run: 2 epochs (62 steps), a checkpoint every 10 steps and at each epoch end."""
    out = tmp_path_factory.mktemp("single-rank-ref")
    return out, fit(demo_shards, out)


@pytest.mark.slow
def test_the_cadence_of_scalars_evaluation_and_checkpoints(reference):
    out, summary = reference
    assert summary["status"] == "finished" and (summary["step"], summary["epoch"]) == (62, 2)
    assert [r["step"] for r in records(out, "train")] == [1] + list(range(5, 61, 5))
    assert [r["step"] for r in records(out, "eval")] == [31, 62]  # each epoch end (the last one: no second eval)
    assert [r["step"] for r in records(out, "checkpoint")] == [10, 20, 30, 31, 40, 50, 60, 62]
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step000000060", "step000000062"]  # the demo recipe keeps the newest 2
    assert (out / "checkpoints" / "latest").read_text() == "step000000062"


@pytest.mark.slow
def test_the_summary_holds_every_parts_fields(reference):
    out, summary = reference
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    parts = {"precision": "fp32", "micro_batch": 16, "memory_plan": None, "skipped_shards": [], "data_fetch": {},
             "profile": None, "bad_steps": [], "overflow_skips": 0, "initialized_from": None, "resumed_from": None,
             "export": str(out / "export"), "output": str(out)}  # fmt: skip
    assert {k: summary[k] for k in parts} == parts
    assert summary["eval"]["num_samples"] == 400 and summary["best_eval"]["top1"] >= summary["eval"]["top1"]
    assert summary["checkpoint_bytes"]["written"] > 0 and summary["depthwise"]["mode"] == "fixed"
    assert summary["loss"] == pytest.approx(records(out, "train")[-1]["loss"], rel=0.5)


@pytest.mark.slow
def test_checkpoints_hold_every_registered_component(reference):
    out, _ = reference
    client = torch.load(out / "checkpoints" / "step000000062" / "mp_rank_00_model_states.pt", weights_only=False)
    for key in ("epoch", "step", "scheduler", "ema", "best", "guard", "data", "rng", "depthwise", "batchnorm",
                "config", "classes", "schedule", "universal_checkpoint_info"):  # fmt: skip
        assert key in client, key
    assert (client["epoch"], client["step"]) == (2, 62) and client["config"]["data"]["batch_size"] == 16


@pytest.mark.slow
def test_the_export_holds_exactly_what_zero_to_fp32_reads_from_the_final_checkpoint(reference):
    """The export gathers the fp32 weights in memory (no read of the checkpoint it follows); they are bit for bit
    what DeepSpeed's zero_to_fp32 consolidates from that checkpoint (tests/test_pretrain.py: ZeRO-1 and -3 on 2
    ranks, bf16)."""
    from conv2former.weights import read_weights

    out, _ = reference
    exported, consolidated = export_weights(out), read_weights(str(out / "checkpoints")).state_dict
    assert exported.keys() == consolidated.keys()
    assert all(torch.equal(exported[k], consolidated[k]) and exported[k].dtype == consolidated[k].dtype
               for k in exported)  # fmt: skip


@pytest.mark.slow
def test_a_stop_and_resume_in_process_ends_bitwise_equal(reference, demo_shards, tmp_path):
    ref, _ = reference
    first = fit(demo_shards, tmp_path, "--max-steps", "25")
    assert first["step"] == 25 and first["export"] is not None
    second = fit(demo_shards, tmp_path)
    assert second["resumed_from"]["tag"] == "step000000025" and second["step"] == 62
    a, b = export_weights(ref), export_weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_ends_the_run_with_the_last_good_checkpoint(demo_shards, tmp_path):
    summary = fit(demo_shards, tmp_path, "--max-steps", "20", "--save-every", "5", "--set", "guard.inject_nan_at=7")
    assert summary["status"].startswith("diverged at step 7") and summary["exit_code"] == 3
    assert [b["step"] for b in summary["bad_steps"]] == [7] and summary["export"] is None
    assert [r["step"] for r in records(tmp_path, "bad_step")] == [7]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step000000005"


def test_a_stop_request_checkpoints_and_ends_with_exit_0(demo_shards, tmp_path):
    """SIGTERM/SIGUSR1 set the request (tests/test_pretrain.py sends the signal); here it is set before the first
    step: the ranks' agreement is read one step late, so the run stops after step 2 with its checkpoint."""
    cfg = pretrain_config(demo_shards, str(tmp_path), *FLAGS, "--save-every", "1000")
    with single_rank():
        trainer = Trainer(cfg)
        trainer.parts.preemption.requested = True
        summary = trainer.fit()
    assert summary["status"].startswith("stopped by signal") and summary["exit_code"] == 0
    assert summary["step"] == 2 and (tmp_path / "checkpoints" / "step000000002" / "complete").exists()


@pytest.mark.slow
def test_a_profile_window_writes_its_trace(demo_shards, tmp_path):
    summary = fit(demo_shards, tmp_path, "--max-steps", "4", "--set", "profile.steps=2-3")
    trace = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"step 2", "step 3", "data_wait"} <= names and "step 4" not in names
    assert summary["profile"] == str(tmp_path / "profile" / "rank0.json")
