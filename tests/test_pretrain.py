"""launch/pretrain.py on 2 CPU ranks on the demo shards: as the deepspeed launcher starts them (tests/ranks.py), and under
the real deepspeed launcher and torchrun where the test is about the launcher."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import BIN, REPO, deepspeed_launch, next_port, ranks_launch, real_processes, stage_env, summary_from

import conv2former  # noqa: F401
from conv2former.config import DataConfig
from conv2former.cpu import malloc as host_memory
from conv2former.data.loader import build_loader
from conv2former.engine import disk
from conv2former.engine.evaluator import Evaluator
from conv2former.weights import load_checkpoint, read_weights

PRETRAIN = str(REPO / "launch" / "pretrain.py")
FAST = [
    "--variant",
    "demo",
    "--image-size",
    "32",
    "--set",
    "schedule.warmup_epochs=0.2",
    "--set",
    "logging.print_every=1",
    "--set",
    "schedule.eval_every_epochs=1",
    "--set",
    "data.eval_batch_size=50",
]
env = stage_env


def deepspeed_cmd(*args: str, ranks: int = 2, launcher: str = "ranks") -> list:
    """launch/pretrain.py on ``ranks`` CPU ranks: as the deepspeed launcher starts them (tests/ranks.py), or through
    the deepspeed launcher itself (``launcher="deepspeed"``: the tests of signals and faults that pass through it)."""
    return (deepspeed_launch if launcher == "deepspeed" else ranks_launch)(PRETRAIN, *args, ranks=ranks)


def start(command: list, stderr=subprocess.STDOUT, environ: dict | None = None) -> subprocess.Popen:
    """``command`` started in a session of its own (a test can signal the launcher and every rank), output piped."""
    return subprocess.Popen(
        command, env=environ or env(), stdout=subprocess.PIPE, stderr=stderr, text=True, errors="replace",
        start_new_session=True,
    )  # fmt: skip


def run_pretrain(*args: str, launcher: str = "ranks", ranks: int = 2, environ: dict | None = None) -> dict:
    """Run launch/pretrain.py (2 CPU ranks unless told) and return its summary line."""
    if launcher != "torchrun":
        cmd = deepspeed_cmd(*args, ranks=ranks, launcher=launcher)
    else:
        cmd = [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(next_port()),
            PRETRAIN,
            *args,
        ]
    proc = subprocess.run(cmd, env=environ or env(), capture_output=True, text=True, errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return summary_from(proc.stdout)


def read_log(run: Path, kind: str = "train"):
    return [
        json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if json.loads(line)["kind"] == kind
    ]


def exports_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "export" / "model.safetensors"), load_file(b / "export" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def relaunch_from(run: Path, step: int, output: Path, *args: str, environ: dict | None = None) -> dict:
    """``run``'s checkpoint at ``step`` copied into ``output`` and the stage relaunched there: it resumes from that
    checkpoint as after a kill (a relaunch after a stop at a step is test_stop_and_relaunch_resumes_exactly's)."""
    tag = f"step{step:09d}"
    shutil.copytree(run / "checkpoints" / tag, output / "checkpoints" / tag)
    (output / "checkpoints" / "latest").write_text(tag)
    return run_pretrain(*args, "--output", str(output), environ=environ)


@pytest.fixture
def reference_run(demo_shards, reference_runs):
    """The session's uninterrupted 2-rank run: 2 epochs (62 steps), checkpoint every 10 steps."""
    return reference_runs.get(PRETRAIN, *FAST, "--data", demo_shards, "--epochs", "2", "--save-every", "10")


@pytest.mark.slow
def test_loss_decreases_and_outputs_are_complete(reference_run, demo_shards):
    out, summary = reference_run
    assert summary["status"] == "finished" and summary["step"] == 62 and summary["epoch"] == 2
    losses = [r["loss"] for r in read_log(out)]
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.2
    assert summary["eval"]["top1"] > 3 / 40  # well above chance (1/40) after 2 epochs
    # checkpoints: the newest K complete tags and a 'latest' pointing at the newest
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step000000060", "step000000062"] and (out / "checkpoints" / "latest").read_text() == tags[-1]
    assert all((out / "checkpoints" / t / "complete").exists() for t in tags)
    for name in ("model.safetensors", "model_ema.safetensors", "classes.txt", "config.yaml"):
        assert (out / "export" / name).exists()
    # TensorBoard holds the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "images_per_s", "step_time", "data_time", "memory_mb", "epoch"):
        assert f"train/{name}" in tags
    for name in ("top1", "top5", "ema_top1"):
        assert f"eval/{name}" in tags
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert max(lrs) == pytest.approx(2e-3, rel=0.05) and lrs[-1] < lrs[len(lrs) // 2]  # warmup, then cosine down


@pytest.mark.slow
def test_export_loads_strictly_and_reproduces_eval_accuracy(reference_run, demo_shards):
    out, summary = reference_run
    classes = (out / "export" / "classes.txt").read_text().split()
    model = timm.create_model("conv2former_demo", num_classes=len(classes))
    load_checkpoint(model, str(out / "export" / "model.safetensors"))
    cfg = DataConfig(root=demo_shards, backend="dali-cpu", image_size=32, batch_size=50, workers=2)
    result = Evaluator(len(classes), torch.device("cpu")).run(model, build_loader(cfg, "val"))
    assert result.num_samples == 400
    assert result.top1 == pytest.approx(summary["eval"]["top1"], abs=1e-9)
    assert result.top5 == pytest.approx(summary["eval"]["top5"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_on_cpu_trains_resumes_bitwise_and_exports_fp32(reference_run, demo_shards, tmp_path, stage):
    """deepspeed.precision=bf16 on 2 CPU ranks (DeepSpeed's CPU accelerator has bf16): 12 steps whole, and its
    checkpoint 6 relaunched to 12 in a folder of its own, export the same fp32 weights; the EMA and the stem BatchNorm statistics are fp32 and updated; the
    checkpoint size estimate is within 30% of what was written; at ZeRO-1 the loss stays within 0.25 of fp32's."""
    from safetensors.torch import load_file

    args = [*FAST, "--data", demo_shards, "--zero-stage", str(stage), "--save-every", "6", "--epochs", "2"]
    bf16 = [*args, "--set", "deepspeed.precision=bf16", "--max-steps", "12"]  # (the reference run's schedule)
    whole = run_pretrain(*bf16, "--output", str(tmp_path / "whole"))
    resumed = relaunch_from(tmp_path / "whole", 6, tmp_path / "parts", *bf16)
    assert whole["precision"] == resumed["precision"] == "bf16" and whole["bad_steps"] == []
    assert resumed["resumed_from"]["step"] == 6 and resumed["step"] == 12
    sizes = whole["checkpoint_bytes"]  # the disk-space estimate holds at every stage (ZeRO-3 partitions included)
    assert 0.7 < sizes["estimated"] / sizes["written"] < 1.3, sizes
    assert exports_equal(tmp_path / "whole", tmp_path / "parts")
    export = tmp_path / "whole" / "export"
    weights, ema = load_file(export / "model.safetensors"), load_file(export / "model_ema.safetensors")
    for tensors in (weights, ema):
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float32}
    # the export (gathered in memory from the partitions) is what zero_to_fp32 reads from the final checkpoint
    consolidated = read_weights(str(tmp_path / "whole" / "checkpoints")).state_dict
    assert weights.keys() == consolidated.keys() and all(torch.equal(weights[k], consolidated[k]) for k in weights)
    stem_mean = "downsample_layers.0.2.running_mean"  # the stem BatchNorm (initialised at 0)
    assert weights[stem_mean].abs().sum() > 0 and ema[stem_mean].abs().sum() > 0
    assert not torch.equal(ema["pred.weight"], weights["pred.weight"])  # the EMA moved, lagging the weights
    if stage == 1:  # the fp32 reference run (same schedule, ZeRO-1) at the same step
        fp32_loss = next(r["loss"] for r in read_log(reference_run[0]) if r["step"] == 12)
        assert abs(whole["loss"] - fp32_loss) < 0.25, (whole["loss"], fp32_loss)


def fp16_env() -> dict:
    """The stage environment with tests/fp16_cpu first on PYTHONPATH: DeepSpeed's CPU accelerator then accepts fp16
    on this CPU (it reports fp16 only with oneDNN's AVX-512 FP16 / AMX kernels; PyTorch computes fp16 on any CPU)."""
    environ = env()
    environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "fp16_cpu"), environ["PYTHONPATH"]])
    return environ


@pytest.mark.slow
def test_fp16_on_cpu_trains_resumes_bitwise_and_exports_fp32(reference_run, demo_shards, tmp_path):
    """deepspeed.precision=fp16 at ZeRO-1 on 2 CPU ranks: 12 steps whole, and its checkpoint 6 relaunched to 12 in a
    folder of its own, export the same fp32 weights; the EMA and the stem BatchNorm statistics are fp32 and updated; the loss stays within 0.25 of
    fp32's (a loss scale of 2**12: no overflow on these steps, so both runs take the same optimizer steps)."""
    from safetensors.torch import load_file

    args = [*FAST, "--data", demo_shards, "--save-every", "6", "--epochs", "2", "--set", "deepspeed.precision=fp16"]
    args += ["--set", "deepspeed.fp16_initial_scale_power=12"]
    args += ["--max-steps", "12"]
    whole = run_pretrain(*args, "--output", str(tmp_path / "whole"), environ=fp16_env())
    resumed = relaunch_from(tmp_path / "whole", 6, tmp_path / "parts", *args, environ=fp16_env())
    assert whole["precision"] == resumed["precision"] == "fp16" and whole["bad_steps"] == []
    assert whole["overflow_skips"] == 0 and resumed["resumed_from"]["step"] == 6 and resumed["step"] == 12
    assert exports_equal(tmp_path / "whole", tmp_path / "parts")
    export = tmp_path / "whole" / "export"
    weights, ema = load_file(export / "model.safetensors"), load_file(export / "model_ema.safetensors")
    for tensors in (weights, ema):
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float32}
    stem_mean = "downsample_layers.0.2.running_mean"
    assert weights[stem_mean].abs().sum() > 0 and ema[stem_mean].abs().sum() > 0
    assert not torch.equal(ema["pred.weight"], weights["pred.weight"])
    fp32_loss = next(r["loss"] for r in read_log(reference_run[0]) if r["step"] == 12)
    assert abs(whole["loss"] - fp32_loss) < 0.25, (whole["loss"], fp32_loss)
    assert {r["loss_scale"] for r in read_log(tmp_path / "whole")} == {2.0**12}


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_the_scale_halved_and_the_run_goes_on(demo_shards, tmp_path):
    """A loss scale of 2**20 overflows fp16 gradients: DeepSpeed skips those steps and halves the scale (after its
    hysteresis of 2) until the gradients fit; the guard does not count the skips as bad steps and the run finishes."""
    args = [*FAST, "--data", demo_shards, "--epochs", "2", "--max-steps", "9", "--output", str(tmp_path)]
    args += ["--set", "deepspeed.precision=fp16", "--set", "deepspeed.fp16_initial_scale_power=20"]
    summary = run_pretrain(*args, environ=fp16_env())
    assert summary["status"] == "finished" and summary["step"] == 9 and summary["bad_steps"] == []
    records = read_log(tmp_path)
    skipped = [r for r in records if not math.isfinite(r["grad_norm"])]
    assert summary["overflow_skips"] == len(skipped) >= 3
    scales = [r["loss_scale"] for r in records]
    assert scales[0] == 2.0**20 and scales == sorted(scales, reverse=True) and scales[-1] <= 2.0**17
    for before, after in zip(skipped, skipped[1:]):  # each skip after the first halves the scale
        assert after["loss_scale"] == before["loss_scale"] / 2
    assert math.isfinite(records[-1]["grad_norm"])  # the scale came down far enough: steps are applied again


@pytest.mark.slow
def test_stop_and_relaunch_resumes_exactly(reference_run, demo_shards, tmp_path):
    ref, _ = reference_run
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--save-every", "10"]
    # the interrupted part runs with glibc's default malloc: where freed memory lives changes no result
    first = run_pretrain(*args, "--max-steps", "25", "--set", "cpu.keep_freed_memory=false")
    assert first["step"] == 25 and first["freed_memory_kept"] is False
    second = run_pretrain(*args)
    assert second["step"] == 62 and second["freed_memory_kept"] is (host_memory._glibc() is not None)
    assert exports_equal(ref, tmp_path)


# The client state as checkpoints were written before the guard's bad steps were kept (the pinned older layout):
# such a checkpoint must still resume exactly.
OLDER_LAYOUT = {
    "epoch", "step", "scheduler", "ema", "best", "data", "rng", "depthwise", "batchnorm", "config", "classes",
    "schedule", "universal_checkpoint_info",
}  # fmt: skip


@pytest.mark.slow
def test_a_checkpoint_in_the_older_layout_resumes_exactly(reference_run, demo_shards, tmp_path):
    """The reference run's checkpoint 60 rewritten without the newer "guard" state: the relaunch resumes from it
    and ends bit for bit like the uninterrupted run."""
    ref, _ = reference_run
    tag = "step000000060"
    shutil.copytree(ref / "checkpoints" / tag, tmp_path / "checkpoints" / tag)
    (tmp_path / "checkpoints" / "latest").write_text(tag)
    states = tmp_path / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)
    assert OLDER_LAYOUT | {"guard"} <= saved.keys()
    assert len(saved["data"]) == len(saved["rng"]) == len(saved["batchnorm"]) == 2  # per rank
    del saved["guard"]
    torch.save(saved, states)
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--save-every", "10"]
    command = deepspeed_cmd(*args)
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert shared_memory_left(command) == []
    assert summary_from(proc.stdout)["resumed_from"] == {
        "tag": tag, "epoch": 1, "step": 60, "passed_over": [], "depthwise_reused": 0
    }  # fmt: skip
    assert exports_equal(ref, tmp_path)


@pytest.mark.slow
def test_kill_minus_9_then_a_corrupt_newest_checkpoint_falls_back(reference_run, demo_shards, tmp_path):
    """Every rank and the launcher killed mid-epoch after checkpoint 20; checkpoint 20's model files then corrupted:
    the relaunch warns, resumes from checkpoint 10 and still ends bit for bit like the uninterrupted run."""
    ref, _ = reference_run
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--save-every", "10"]
    proc = subprocess.Popen(
        deepspeed_cmd(*args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    ckpts = tmp_path / "checkpoints"
    while time.time() < deadline and not (ckpts / "step000000020" / "complete").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, mid-epoch
    proc.wait()
    assert (ckpts / "step000000020" / "complete").exists() and not (tmp_path / "export").exists()
    for f in (ckpts / "step000000020").glob("*model_states.pt"):
        f.write_bytes(b"corrupt")
    proc = subprocess.run(
        deepspeed_cmd(*args), env=env(), capture_output=True, text=True, errors="replace", timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = summary_from(proc.stdout)["resumed_from"]
    assert resumed["tag"] == "step000000010" and resumed["passed_over"] == [
        {"tag": "step000000020", "reason": "unloadable"}
    ]
    assert "could not be loaded" in proc.stderr  # the warning (its wording: the one test of that message)
    assert exports_equal(ref, tmp_path)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_zero(demo_shards, tmp_path):
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "20", "--save-every", "1000"]
    command = deepspeed_cmd(*args, launcher="deepspeed")
    proc = start(command, stderr=subprocess.DEVNULL)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 5):
        time.sleep(0.2)
    for child in subprocess.run(
        ["pgrep", "-f", "--", f"{PRETRAIN}"], capture_output=True, text=True, errors="replace"
    ).stdout.split():
        if int(child) != proc.pid:
            os.kill(int(child), signal.SIGUSR1)  # the training ranks, as Slurm's --signal does
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    summary = summary_from(out)
    assert summary["status"].startswith("stopped by signal")
    tag = f"step{summary['step']:09d}"
    assert (tmp_path / "checkpoints" / tag / "complete").exists()
    assert shared_memory_left(command) == []  # (under the deepspeed launcher too)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])  # (3: the sharded EMA test below)
def test_zero_stages_follow_the_same_loss_trajectory(reference_run, demo_shards, tmp_path, stage):
    ref, _ = reference_run
    summary = run_pretrain(
        *FAST,
        "--data",
        demo_shards,
        "--output",
        str(tmp_path),
        "--epochs",
        "2",
        "--zero-stage",
        str(stage),
        "--max-steps",
        "15",
    )
    ref_losses = [r["loss"] for r in read_log(ref)][:15]
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert summary["step"] == 15 and "ema_top1" in summary["eval"]  # EMA works under every stage
    assert len(ref_losses) == len(losses) == 15
    for a, b in zip(ref_losses, losses):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_the_sharded_zero3_ema_equals_the_full_copy_of_zero1(reference_run, demo_shards, tmp_path):
    """At ZeRO-3 each rank averages only its own partition (no gather per step); after 15 steps its exported EMA
    (gathered for the save) equals the full-copy EMA of a ZeRO-1 run of the same steps, and evaluating it works."""
    from safetensors.torch import load_file

    args = [*FAST, "--data", demo_shards, "--epochs", "2", "--max-steps", "15"]
    zero1 = run_pretrain(*args, "--zero-stage", "1", "--output", str(tmp_path / "z1"))
    zero3 = run_pretrain(*args, "--zero-stage", "3", "--output", str(tmp_path / "z3"))
    assert zero1["step"] == zero3["step"] == 15 and "ema_top1" in zero3["eval"]
    assert zero3["eval"]["ema_top1"] == pytest.approx(zero1["eval"]["ema_top1"], abs=0.02)
    sharded, full = (load_file(tmp_path / run / "export" / "model_ema.safetensors") for run in ("z3", "z1"))
    assert sharded.keys() == full.keys()
    for name in full:
        assert sharded[name].dtype == full[name].dtype
        assert torch.allclose(sharded[name].float(), full[name].float(), rtol=1e-3, atol=1e-4), name


@pytest.mark.slow
def test_channels_last_batches_train_like_nchw(reference_run, demo_shards, tmp_path):
    """What GPU runs use by default (channels_last batches, contiguous parameters under DeepSpeed), here on CPU."""
    ref, _ = reference_run
    summary = run_pretrain(
        *FAST,
        "--data",
        demo_shards,
        "--output",
        str(tmp_path),
        "--epochs",
        "2",
        "--max-steps",
        "15",
        "--set",
        "data.channels_last=true",
    )
    ref_losses = [r["loss"] for r in read_log(ref)][:15]
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert summary["step"] == 15 and len(ref_losses) == len(losses) == 15
    for a, b in zip(ref_losses, losses):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["model.grad_checkpointing=true", "model.compile=true"])
def test_grad_checkpointing_and_compile_through_the_engine(reference_run, demo_shards, tmp_path, option):
    """Activation checkpointing and DeepSpeed's engine.compile() (torch.compile) train like the plain engine."""
    ref, _ = reference_run
    summary = run_pretrain(
        *FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--max-steps", "10", "--set", option
    )
    ref_losses = [r["loss"] for r in read_log(ref)][:10]
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert summary["step"] == 10 and len(ref_losses) == len(losses) == 10 and summary["export"]
    for a, b in zip(ref_losses, losses):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_torchrun_launch(demo_shards, tmp_path):
    summary = run_pretrain(
        *FAST,
        "--data",
        demo_shards,
        "--output",
        str(tmp_path),
        "--epochs",
        "1",
        "--max-steps",
        "5",
        launcher="torchrun",
    )
    assert summary["status"] == "finished" and summary["step"] == 5


@pytest.mark.slow
def test_a_profile_window_traces_those_steps_of_the_real_run_per_rank(demo_shards, tmp_path):
    """profile.steps=3-4: each rank writes a Chrome trace of optimizer steps 3 and 4 (labelled, with the loader waits
    labelled data_wait) into OUTPUT/profile/, and nothing of the other steps."""
    summary = run_pretrain(*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "1", "--max-steps", "6",
                           "--set", "profile.steps=3-4", "--set", "profile.memory=true")  # fmt: skip
    assert summary["status"] == "finished" and summary["profile"] == str(tmp_path / "profile" / "rank0.json")
    for rank in (0, 1):
        events = json.loads((tmp_path / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {event.get("name") for event in events}
        assert {"step 3", "step 4", "data_wait"} <= names and not {"step 2", "step 5"} & names
        assert any(event.get("name") == "[memory]" for event in events)  # profile.memory: the allocations


def wandb_history(run_dir: Path) -> list:
    """The history rows ({key: value}, with "_step") an offline W&B run wrote to its ``run-<id>.wandb`` file: a
    LevelDB-style log (after a 7-byte W&B header, 32 KiB blocks of records, each with a 7-byte header: checksum, length,
    type full/first/middle/last) of wandb's ``Record`` protobufs. wandb 0.31 has no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, block, pieces, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # (a block's tail too short for a header is padding)
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
    return rows


@pytest.mark.slow
def test_wandb_and_mlflow_get_the_scalars_and_a_resume_continues_the_same_runs(demo_shards, tmp_path, monkeypatch):
    """logging.backends with wandb (offline) and mlflow (a file store): the train and eval scalars at their steps and
    the config as the run's parameters; stopped at step 6 and relaunched to 9, the same W&B and MLflow runs go on."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 keeps its file store behind this switch)
    store = (tmp_path / "mlruns").as_uri()
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path / "run"), "--epochs", "1", "--save-every", "3",
            "--set", "logging.backends=[tensorboard,jsonl,wandb,mlflow]", "--set", f"logging.mlflow_tracking_uri={store}"]  # fmt: skip
    environ = dict(env(), WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")
    run_pretrain(*args, "--max-steps", "6", environ=environ)
    ids = {b: (tmp_path / "run" / f"{b}_run_id").read_text().strip() for b in ("wandb", "mlflow")}
    resumed = run_pretrain(*args, "--max-steps", "9", environ=environ)
    assert resumed["resumed_from"]["step"] == 6 and resumed["step"] == 9
    assert {b: (tmp_path / "run" / f"{b}_run_id").read_text().strip() for b in ids} == ids
    client = MlflowClient(tracking_uri=store)
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")] == list(range(1, 10))
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "eval/top1")] == [6, 9]  # (each run ends with one)
    assert client.get_run(ids["mlflow"]).data.params["schedule.global_batch"] == "64"
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(ids["wandb"]) for r in runs)  # one W&B run, continued
    history = [wandb_history(run) for run in runs]
    assert [row["_step"] for row in history[0] + history[1] if "train/loss" in row] == list(range(1, 10))
    assert [row["_step"] for row in history[0] + history[1] if "eval/top1" in row] == [6, 9]


def one_line_error(capsys, *argv) -> str:
    from launch.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    return err


def test_bad_configs_are_one_line_errors(capsys, demo_shards, tmp_path):
    out = ["--output", str(tmp_path)]
    assert "unknown variant 'xl'" in one_line_error(capsys, "--variant", "xl", "--data", demo_shards, *out)
    assert "unknown config key 'optim.lr'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "optim.lr=1", *out
    )
    assert "no data given" in one_line_error(capsys, "--variant", "demo", *out)
    assert "data root not found" in one_line_error(capsys, "--variant", "demo", "--data", str(tmp_path / "x"), *out)
    assert "not divisible" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--global-batch", "100", *out, "--dry-run"
    )
    assert "expected int" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "schedule.epochs=lots", *out
    )
    assert "cpu.depthwise: unknown depthwise mode 'fastest'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "cpu.depthwise=fastest", *out
    )
    assert "'model.depthwise' is now 'cpu.depthwise'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "model.depthwise=fixed", *out
    )
    assert "use --set deepspeed.precision=bf16" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "deepspeed.bf16=true", *out
    )
    assert "logging.backends: unknown 'neptune'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "logging.backends=[jsonl,neptune]", *out
    )
    assert "profile.steps: '5-2' is not a range" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "profile.steps=5-2", *out
    )
    assert "deepspeed.precision: unknown 'fp8'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "deepspeed.precision=fp8", *out
    )
    assert "deepspeed.grad_accum_dtype: unknown 'fp16'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "deepspeed.grad_accum_dtype=fp16", *out
    )
    assert "deepspeed.communication_data_type: unknown 'fp8'" in one_line_error(
        capsys, "--variant", "demo", "--data", demo_shards, "--set", "deepspeed.communication_data_type=fp8", *out
    )
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():  # (this CPU: no AVX-512 FP16 / AMX-FP16)
        assert "does not support fp16 on this machine" in one_line_error(
            capsys, "--variant", "demo", "--data", demo_shards, "--set", "deepspeed.precision=fp16", *out
        )
    (tmp_path / "file").write_text("")
    assert "cpu.depthwise_cache: cannot write the depthwise cache" in one_line_error(
        capsys,
        "--variant",
        "demo",
        "--data",
        demo_shards,
        "--set",
        f"cpu.depthwise_cache={tmp_path}/file/d.json",
        *out,
    )


def test_dry_run_prints_the_schedule(capsys, demo_shards, tmp_path):
    from launch.pretrain import main

    assert main(["--variant", "demo", "--data", demo_shards, "--output", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    schedule = result["schedule"]
    # 2000 train samples, micro-batch 16 on 1 rank: 125 batches; global 64 -> 4 per step, 31 steps per epoch
    assert schedule["grad_accum"] == 4 and schedule["steps_per_epoch"] == 31 and schedule["total_steps"] == 310
    assert schedule["warmup_steps"] == 31 and schedule["lr"] == pytest.approx(2e-3)
    assert result["classes"] == 40 and not (tmp_path / "checkpoints").exists()
    assert result["measured_step_seconds"] > 0
    assert result["projected_hours"] == pytest.approx(result["measured_step_seconds"] * 310 / 3600, abs=0.01)


@pytest.mark.slow
def test_export_script_rebuilds_the_export(reference_run, tmp_path):
    ref, _ = reference_run
    copy = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", copy / "checkpoints")
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), str(copy)],
        env=env(),
        capture_output=True,
        text=True,
        errors="replace",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert exports_equal(ref, copy)
    for name in ("model_ema.safetensors", "classes.txt", "config.yaml"):
        assert (copy / "export" / name).read_bytes() == (ref / "export" / name).read_bytes()


@pytest.mark.slow
def test_resume_on_one_rank_from_a_two_rank_checkpoint(demo_shards, tmp_path):
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--save-every", "10"]
    two = run_pretrain(*args, "--max-steps", "20")
    command = deepspeed_cmd(*args, "--max-steps", "30", ranks=1)
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = summary_from(proc.stdout)
    assert shared_memory_left(command) == []  # (one rank's DeepSpeed makes its buffer too)
    assert one["resumed_from"]["tag"] == "step000000020_universal"  # converted for the other world size
    assert (one["resumed_from"]["epoch"], one["resumed_from"]["step"]) == (0, 20)
    assert one["step"] == 30 and math.isfinite(one["loss"])
    assert one["eval"]["top1"] >= two["eval"]["top1"] - 0.05  # the weights came across, not a fresh model


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of training rank ``rank`` started by the deepspeed launcher ``launcher_pid``."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        if f"--local_rank={rank}" in child.cmdline():
            return child.pid
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def shared_memory_left(command: list) -> list:
    """DeepSpeed's shared-memory allreduce buffers still named in /dev/shm for the rendezvous port of the launch
    ``command`` (each rank removes its own once all have mapped them: conv2former.engine.distributed)."""
    flag = "--port" if "--port" in command else "--master_port"
    port = command[command.index(flag) + 1]
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.parametrize("bad_step", [7, 10])
def test_injected_nan_stops_at_once_and_keeps_the_last_good_checkpoint(demo_shards, tmp_path, bad_step):
    """guard.inject_nan_at (the test aid): rank 0's loss is NaN at step 7 (read one step late) or at step 10, a
    checkpoint step (read before saving); every rank stops (exit 3), checkpoint 5 stays the newest, no export."""
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--max-steps", "20", "--save-every", "5"]
    proc = subprocess.run(
        deepspeed_cmd(*args, "--set", f"guard.inject_nan_at={bad_step}"),
        env=env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    [line] = error_lines(proc.stdout + proc.stderr)
    assert f"training diverged at step {bad_step}: loss nan" in line, line
    assert "step000000005" in line and "optim.base_lr" in line, line
    summary = summary_from(proc.stdout)
    assert summary["status"].startswith(f"diverged at step {bad_step}") and summary["exit_code"] == 3
    assert [b["step"] for b in summary["bad_steps"]] == [bad_step] and summary["export"] is None
    assert [r["step"] for r in read_log(tmp_path, "bad_step")] == [bad_step]  # log.jsonl records the bad step
    tags = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == ["step000000005"] and not (tmp_path / "export").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step000000005"


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()}); needs root"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI runs as root: the test must run there
        pytest.skip(reason)


@pytest.mark.slow
def test_a_full_disk_ends_with_one_line_and_the_relaunch_resumes_exactly(reference_run, demo_shards, tmp_path):
    """Checkpoints on a tmpfs with room for two: the third save fails (ENOSPC) on the ranks, the run ends with exit
    code 4 and one line (path, bytes needed and free, the newest complete checkpoint), no traceback from any rank;
    with more room the same command resumes from step 20 and ends bit for bit like an uninterrupted run."""
    ref, _ = reference_run
    size = disk.tree_bytes(str(ref / "checkpoints" / "step000000060"))
    out = tmp_path / "out"
    mount_tmpfs(out, int(2.5 * size))
    try:
        args = [*FAST, "--data", demo_shards, "--output", str(out), "--epochs", "2", "--save-every", "10"]
        proc = subprocess.run(deepspeed_cmd(*args), env=env(), capture_output=True, text=True, errors="replace")
        text = proc.stdout + proc.stderr
        assert proc.returncode == 4, text[-3000:]
        [line] = error_lines(text)
        assert "the disk is full: saving checkpoint" in line and "step000000030" in line, line
        assert "is free there" in line and str(out / "checkpoints" / "step000000020") in line
        assert "Traceback" not in text
        estimate = re.search(r"checkpoints: about ([\d.]+) MB per checkpoint", proc.stdout)
        assert 0.7 * size < float(estimate.group(1)) * 1e6 < 1.3 * size, (estimate.group(0), size)
        assert not (out / "checkpoints" / "step000000030").exists()  # the incomplete one was removed
        subprocess.run(["mount", "-o", f"remount,size={10 * size}", str(out)], check=True)
        summary = run_pretrain(*args)
        assert summary["step"] == 62 and exports_equal(ref, out)
    finally:
        subprocess.run(["umount", "-l", str(out)])


def start_and_wait_for_checkpoint(tmp_path: Path, demo_shards: str, *extra: str, environ: dict | None = None):
    """A 2-rank run under the deepspeed launcher (these tests are about faults that pass through it), once its
    checkpoint 5 is complete."""
    args = [*FAST, "--data", demo_shards, "--output", str(tmp_path), "--epochs", "2", "--save-every", "5", *extra]
    proc = start(deepspeed_cmd(*args, launcher="deepspeed"), environ=environ)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "checkpoints" / "step000000005" / "complete").exists():
        time.sleep(0.2)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_run_naming_it(demo_shards, tmp_path, fault):
    """Rank 1 killed (or stopped: hung) mid-run: rank 0 leaves its collective (at once for a dead peer, after the
    15 s collective timeout for a hung one), names rank 1 in one line and exits non-zero; so does the launcher."""
    import psutil

    proc = start_and_wait_for_checkpoint(  # (fresh interpreters: the rank stopped is the one under the launcher)
        tmp_path, demo_shards, "--set", "deepspeed.timeout_minutes=0.25", environ=real_processes(env())
    )
    survivor, victim = psutil.Process(rank_pid(proc.pid, 0)), rank_pid(proc.pid, 1)
    start = time.time()
    os.kill(victim, getattr(signal, fault))
    try:
        survivor.wait(timeout=120)
        elapsed = time.time() - start
        with contextlib.suppress(ProcessLookupError):  # the launcher would, after its 30 s grace for a stopped one
            os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in error_lines(out) if "rank 1 stopped answering" in line]
    assert len(lines) == 1 and "at step" in lines[0] and "deepspeed.timeout_minutes" in lines[0], out[-3000:]
    assert "Traceback" not in out
    # a dead peer at once, a hung one after the timeout (15 s); then the roll call (5 s)
    assert elapsed < (20 if fault == "SIGKILL" else 40), elapsed


@pytest.mark.slow
def test_a_shard_removed_mid_run_stops_it_and_skipping_finishes(demo_shards, tmp_path):
    """A train shard deleted during epoch 0: the run stops (exit 6) naming it and the data position; relaunched with
    data.skip_bad_shards=true it resumes, skips it with a warning and finishes: every rank ran the same steps."""
    data = tmp_path / "data"
    shutil.copytree(demo_shards, data)
    out = tmp_path / "out"
    proc = start_and_wait_for_checkpoint(out, str(data))
    gone = data / "train" / "train-000005.tar"
    gone.unlink()
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 6, text[-3000:]
    lines = error_lines(text)
    assert str(gone) in lines[0] and "cannot be opened" in lines[0] and "Traceback" not in text, lines
    assert re.search(r"at epoch [01], step \d+ of the train split", lines[0])
    # a rank whose share did not hold the shard is left waiting in a collective: it names the rank that left, unless
    # that rank announced its own fault through the store (rank 0's process is the store: then it says so)
    for line in lines[1:]:
        assert str(gone) in line or "rank 0 (which hosts the rendezvous store) is gone" in line, line
    args = [*FAST, "--data", str(data), "--output", str(out), "--epochs", "2", "--save-every", "5"]
    summary = run_pretrain(*args, "--set", "data.skip_bad_shards=true")
    assert summary["status"] == "finished" and summary["step"] == 62 and summary["skipped_shards"] == [str(gone)]


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair, each with its own address: two "nodes" on this machine.
    Yields [(namespace, address), ...]; node 0's address is the rendezvous address."""
    tag = f"c2f{os.getpid() % 100000}"
    nodes = [(f"{tag}n{i}", f"10.213.{os.getpid() % 250}.{i + 1}") for i in range(2)]
    veths = [f"{tag}v{i}" for i in range(2)]
    commands = [
        ["ip", "netns", "add", nodes[0][0]],
        ["ip", "netns", "add", nodes[1][0]],
        ["ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1]],
    ]
    for (ns, address), veth in zip(nodes, veths):
        commands += [
            ["ip", "link", "set", veth, "netns", ns],
            ["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", veth],
            ["ip", "-n", ns, "link", "set", veth, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
    try:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                reason = f"cannot make network namespaces here ({' '.join(command)}: {done.stderr.strip()}); needs root"
                if os.environ.get("CI"):
                    pytest.fail(reason)  # CI runs as root: the test must run there
                pytest.skip(reason)
        yield nodes
    finally:
        for ns, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def start_nodes(nodes, hostfile: Path, port: int, *args: str) -> list:
    """One deepspeed launcher per node (1 CPU rank each), started the way launch/slurm/common.sh starts them."""
    procs = []
    for node_rank, (ns, _) in enumerate(nodes):
        command = ["ip", "netns", "exec", ns, str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh"]
        command += ["--num_nodes", "2", "--node_rank", str(node_rank), "--num_gpus", "1"]
        command += ["--master_addr", nodes[0][1], "--master_port", str(port), PRETRAIN, *args]
        procs.append(start(command))
    return procs


@pytest.mark.slow
def test_two_nodes_train_and_resume_exactly_after_both_are_killed(two_nodes, reference_run, demo_shards, tmp_path):
    """Two "nodes" (network namespaces with their own addresses), one rank each, gloo across the veth pair and the
    rendezvous at node 0's address, one output path for both: killed after checkpoint 20, relaunched, the run ends
    bit for bit like the one-node two-rank reference (the same ranks, data and seed)."""
    ref, _ = reference_run
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "out"
    args = [*FAST, "--data", demo_shards, "--output", str(out), "--epochs", "2", "--save-every", "10"]
    procs = start_nodes(two_nodes, hostfile, next_port(), *args)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step000000020" / "complete").exists():
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    procs = start_nodes(two_nodes, hostfile, next_port(), *args)
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, text in zip(procs, outputs):
        assert proc.returncode == 0, text[-3000:]
    assert '"world_size": 2' in outputs[0] and "resumed from step0000000" in outputs[0], outputs[0][-3000:]
    summary = summary_from(outputs[0])
    assert summary["step"] == 62 and exports_equal(ref, out)


@pytest.mark.slow
def test_measured_depthwise_choices_are_recorded_and_reused_on_resume(demo_shards, tmp_path):
    """cpu.depthwise=measure (the default; the test session otherwise forces "fixed"): the ranks share one disk
    cache, the checkpoint records each rank's choices, a relaunch reuses them without measuring, and a fresh run
    given the same cache ends bit for bit where the interrupted-and-resumed one does."""
    environ = dict(env(), C2F_DEPTHWISE="")
    cache = tmp_path / "depthwise.json"
    args = [*FAST, "--data", demo_shards, "--epochs", "1", "--save-every", "10"]
    with_cache = ["--set", f"cpu.depthwise_cache={cache}"]
    first = run_pretrain(*args, *with_cache, "--output", str(tmp_path / "a"), "--max-steps", "12", environ=environ)
    assert first["depthwise"]["mode"] == "measure"
    entries = json.loads(cache.read_text())
    (shapes,) = entries.values()
    assert {key.rsplit(" ", 1)[1] for key in shapes} == {"k3", "k7"}  # the demo's 7x7 modulation, the MLP's 3x3
    state = torch.load(
        tmp_path / "a" / "checkpoints" / "step000000012" / "mp_rank_00_model_states.pt", weights_only=False
    )
    recorded = state["depthwise"]
    assert len(recorded) == 2 and recorded[0] and recorded[0] == recorded[1]  # one shared choice per shape
    assert all(shapes[key] == choice for key, choice in recorded[0].items())
    # the relaunch has no cache: the train shapes come from the checkpoint, only eval shapes may be new
    proc = subprocess.run(
        deepspeed_cmd(*args, "--output", str(tmp_path / "a")), env=environ, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    resumed = summary_from(proc.stdout)
    assert resumed["resumed_from"]["depthwise_reused"] == len(recorded[0])
    assert resumed["step"] == 31
    fresh = run_pretrain(*args, *with_cache, "--output", str(tmp_path / "c"), environ=environ)
    assert fresh["depthwise"]["measured"] == 0 and fresh["step"] == 31
    assert exports_equal(tmp_path / "a", tmp_path / "c")
