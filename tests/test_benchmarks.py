"""The benchmark tooling: real runs at tiny sizes (speed itself is measured by `make bench`, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import results  # noqa: E402  (benchmarks/results.py)
import suite_report  # noqa: E402

from conv2former.engine.distributed import python_path  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=python_path(str(REPO)), OMP_NUM_THREADS="2")


def run(*args: str, check: bool = True, env: dict = ENV) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def test_every_row_names_the_processor_its_isa_torch_dispatch_and_threads():
    info = results.machine_info(threads=3)
    assert info["cores"] == os.cpu_count() and info["threads"] == 3
    assert info["isa"].split()[0] in ("SSE", "AVX2", "AVX-512", "AMX") and info["torch_cpu_capability"]
    row = results.machine(threads=3)
    assert f"{os.cpu_count()} cores" in row and info["isa"] in row and "3 threads" in row
    assert f"torch {info['torch_cpu_capability']}" in row


def test_record_appends_rows_to_the_scripts_own_results_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"section": "A", "x": "1", "y": "p", "command": "`old`"}) + "\n")
    results.record("a.py", ["| 2 | q |", "| 3 | r |"], folder=tmp_path)
    results.record("b.py", ["| 4 |"], folder=tmp_path, columns=["z"])
    rows = results.read_results("a.py", folder=tmp_path)
    assert [(r["section"], r["x"], r["y"]) for r in rows] == [("A", "1", "p"), ("A", "2", "q"), ("A", "3", "r")]
    assert rows[-1]["command"].startswith("`python ")
    assert [r["z"] for r in results.read_results("b.py", folder=tmp_path)] == ["4"]
    with pytest.raises(SystemExit):  # another number of cells than the table's columns
        results.record("a.py", ["| 5 |"], folder=tmp_path)
    with pytest.raises(SystemExit):  # a new benchmark names its columns
        results.record("c.py", ["| 5 |"], folder=tmp_path)
    assert len(results.read_results("a.py", folder=tmp_path)) == 3


def test_every_results_file_parses_and_its_newest_row_names_the_columns_record_uses():
    files = sorted(results.RESULTS.glob("*.jsonl"))
    assert {p.stem for p in files} >= {"model_speed", "profile_step", "loader_speed", "train_speed", "shard_speed"}
    for path in files:
        rows = results.read_results(path.name)
        assert rows and all(isinstance(row, dict) for row in rows), path
        assert {"date", "versions"} & set(rows[-1]) or "machine" in rows[-1], path


@pytest.mark.slow  # runs a benchmark script end to end (seconds of measuring)
def test_model_speed_json_feeds_the_suite_report(tmp_path):
    done = run(
        sys.executable,
        "benchmarks/model_speed.py",
        "--variant",
        "conv2former_demo",
        "--baseline",
        "convnext_atto",
        "--resolution",
        "64",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--rounds",
        "1",
        "--memory-format",
        "nchw",
        "--gpu-depthwise",  # the GPU rows' bf16 weights (the stem BatchNorm kept fp32), rehearsed on CPU
        "--json",
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in lines] == [
        "conv2former_demo",
        "conv2former_demo, plain depthwise",
        "conv2former_demo, bf16 weights",
        "conv2former_demo, bf16 weights, depthwise measured",
    ]
    assert all(r["images_per_s"] > 0 and r["ratio"] > 0 and r["mfu"] is None for r in lines)  # no MFU on CPU
    assert all(r["machine"]["isa"] and r["machine"]["threads"] >= 1 for r in lines)  # where the number holds
    # a train_speed-shaped line at 224 makes the projection: 90 x 14.2M images at 100 img/s per GPU on 8 GPUs
    lines.append(
        dict(
            stage=1,
            variant="l",
            image_size=224,
            ranks=2,
            images_per_s=200.0,
            data_wait=0.01,
            memory_mb=1000.0,
            mfu=0.41,
        )
    )
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = run(sys.executable, "benchmarks/suite_report.py", str(path), "--output", str(tmp_path / "r.md")).stdout
    assert "| conv2former_demo, plain depthwise | convnext_atto | 64 |" in report
    hours_8 = 90 * suite_report.IMAGENET_22K_IMAGES / (100 * 8) / 3600  # linear scaling: 100 img/s per GPU
    assert f"| 8 | 512 | 5,120.0 | 2.3 | {hours_8:,.1f} |" in report and "41.0%" in report
    # the all-reduce of Conv2Former-L's bf16 gradients across 256 GPUs at 400 Gb/s each: 2 x 255/256 x 398 MB / 50 GB/s
    assert suite_report.allreduce_seconds(198.89e6 * 2, 256, suite_report.Network()) == pytest.approx(0.01585, rel=1e-3)
    assert "| 256 | 16 | 160.0 | 15.8 |" in report
    assert (tmp_path / "r.md").read_text().strip() == report.strip()


def test_suite_report_bad_input_is_one_line(tmp_path):
    done = run(sys.executable, "benchmarks/suite_report.py", str(tmp_path / "missing.jsonl"), check=False)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "gpu_suite.sh" in done.stderr
    (tmp_path / "cut.jsonl").write_text('{"model": "x", "images_')
    done = run(sys.executable, "benchmarks/suite_report.py", str(tmp_path / "cut.jsonl"), check=False)
    assert done.returncode != 0 and "cut.jsonl:1 is not a JSON line" in done.stderr


def test_gpu_suite_lists_its_commands_and_refuses_to_run_without_a_gpu(tmp_path):
    env = dict(ENV, OUT=str(tmp_path / "suite"), PYTHON=sys.executable)
    plan = run("bash", "benchmarks/gpu_suite.sh", env=dict(env, DRY_RUN="1", NGPU="8")).stdout
    commands = [line for line in plan.splitlines() if line.startswith("== ")]
    speed = [c for c in commands if "model_speed.py" in c]
    assert sum("--gpu-depthwise" not in c for c in speed) == 8  # 224/384 x checkpointing off/on x compile off/on
    assert sum("--gpu-depthwise" in c for c in speed) == 1  # L with bf16 weights: PyTorch's depthwise vs the chosen
    depthwise = [c for c in commands if "depthwise_formulations.py" in c]
    assert len(depthwise) == 2 and all("--device cuda --dtype bf16" in c for c in depthwise)  # at 224 and 384
    assert sum("progressive_resizing.py speed" in c for c in commands) == 1
    assert sum("loader_speed.py" in c for c in commands) == 2
    assert any("profile_step.py --variant conv2former_l" in c for c in commands)
    assert any("--stages 1 2 3" in c and "--global-batch 1024" in c and "dali-gpu" in c for c in commands)
    assert not (tmp_path / "suite").exists()
    quick = run("bash", "benchmarks/gpu_suite.sh", env=dict(env, DRY_RUN="1", QUICK="1")).stdout
    assert "--resolution 384" not in quick and "--compile" not in quick
    if not _cuda():
        done = run("bash", "benchmarks/gpu_suite.sh", env=env, check=False)
        assert done.returncode == 2 and done.stderr.strip().startswith("error: gpu_suite.sh needs a CUDA GPU")


def profile_step(variant: str, *extra: str) -> str:
    small = ["--resolution", "64", "--batch", "2", "--warmup", "1"]
    return run(sys.executable, "benchmarks/profile_step.py", "--variant", variant, *small, *extra).stdout


@pytest.mark.slow  # runs a benchmark script end to end (seconds of measuring)
def test_profile_step_names_the_depthwise_kernels():
    out = profile_step(
        "conv2former_demo", "--top", "400", "--plain-depthwise"
    )  # every op listed: which are in the top 40 depends on the load
    assert "ms of self CPU time in one step" in out
    assert "aten::convolution_backward depthwise 7x7 on 16x16x16" in out
    assert "by kind:" in out and "depthwise conv (k x k, incl. their gradients)" in out
    assert "1x1 conv / matmul" in profile_step("convnext_atto", "--top", "0")  # any timm model, totals only


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow  # runs a benchmark script end to end (seconds of measuring)
def test_loader_breakdown_measures_every_stage_of_the_dali_cpu_graph(tmp_path):
    done = run(
        sys.executable,
        "benchmarks/loader_breakdown.py",
        "--seconds",
        "0.2",
        "--batch",
        "8",
        "--images",
        "200",
        env=dict(ENV, C2F_BENCH_DIR=str(tmp_path / "bench")),
    )
    rates = [line for line in done.stdout.splitlines() if "images/s" in line]
    assert len(rates) == 8 and "RandAugment n=2 m=9 (full graph)" in done.stdout
    stages = [line for line in done.stdout.splitlines() if line.startswith("torch ") and "ms per image" in line]
    names = " ".join(stages)
    assert len(stages) == 9 and all(s in names for s in ("read + decode", "random-resized-crop", "RandAugment"))
    assert "normalize into the batch (CPU form)" in names and "stack the float images (baseline" in names


@pytest.mark.slow  # runs three loaders end to end
def test_loader_speed_measures_each_backend_in_its_own_process(tmp_path):
    done = run(
        sys.executable,
        "benchmarks/loader_speed.py",
        "--backend",
        "all",
        "--seconds",
        "1",
        "--batch",
        "8",
        "--images",
        "200",
        env=dict(ENV, C2F_BENCH_DIR=str(tmp_path / "bench")),
    )
    lines = [line.split()[0] for line in done.stdout.splitlines() if "images/s" in line]
    assert lines == ["dali-cpu", "torch", "imagefolder"] or lines == ["dali-gpu", "dali-cpu", "torch", "imagefolder"]


def test_rows_say_when_the_libraries_were_held_to_avx2():
    held = run(
        "benchmarks/avx2.sh",
        sys.executable,
        "-c",
        "import sys; sys.path.insert(0, 'benchmarks'); "
        "from results import machine, machine_info; print(machine()); print(machine_info()['dispatch_limits'])",
    )
    row, limits = held.stdout.splitlines()
    assert "held to AVX2 (benchmarks/avx2.sh)" in row and "torch AVX2" in row
    assert "ONEDNN_MAX_CPU_ISA" in limits and "MKL_ENABLE_INSTRUCTIONS" in limits


@pytest.mark.slow  # times every candidate on the demo model's shapes
def test_depthwise_formulations_times_every_candidate_and_names_the_choice():
    done = run(
        sys.executable,
        "benchmarks/depthwise_formulations.py",
        "--variant",
        "conv2former_demo",
        "--baseline",
        "convnext_atto",
        "--batch",
        "2",
        "--resolution",
        "64",
        "--rounds",
        "1",
        "--dtype",
        "bf16",  # the GPU suite's dtype: the model cast as the engine casts it (the stem BatchNorm stays fp32)
        env=dict(ENV, C2F_DEPTHWISE=""),
    )
    layers = [line for line in done.stdout.splitlines() if " on " in line and "images)" in line]
    assert "rejected by the accuracy gate: batch_groups (grad_weight" in done.stdout  # bf16: fast and wrong
    assert any(line.startswith("conv2former_demo 7x7") for line in layers)
    assert any(line.startswith("conv2former_demo 3x3") for line in layers)
    assert any(line.startswith("convnext_atto 7x7") for line in layers)
    for name in ("transposed", "conv2d_backward", "batch_groups"):
        assert name in done.stdout
    assert done.stdout.count("chosen ") == len(layers)


@pytest.mark.slow  # one demo run of 2 steps through the deepspeed launcher
def test_fixed_cost_times_the_start_and_the_end_of_a_demo_run(demo_root, tmp_path):
    """benchmarks/fixed_cost.py's smallest case, on the session's demo shards: the seconds to the first step (step 1
    itself among them) and after the last one, each a part of the run's whole time. (Its launcher and ranks are forked
    by the session's zygote: the seconds are not a user's, the script's measuring is what this tests.)"""
    import re

    (tmp_path / "demo-data").symlink_to(demo_root)  # (the script generates the demo data where it finds none)
    done = run(sys.executable, "benchmarks/fixed_cost.py", "--cases", "demo", "--steps", "2", "--repeat", "1",
               "--work", str(tmp_path))  # fmt: skip
    line = next(line for line in done.stdout.splitlines() if line.startswith("demo: "))
    first, step1, after, checkpoint, evaluation, total = (float(x) for x in re.findall(r"(\d+\.\d) s", line))
    assert 0 < step1 < first and 0 <= checkpoint < after and evaluation >= 0
    assert first + after + evaluation <= total + 0.1, line  # (rounded to tenths)
