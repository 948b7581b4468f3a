"""The Slurm templates on a real single-node Slurm cluster (munge + slurmctld + slurmd started by the fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import summary_from
from slurm_cluster import SlurmCluster, ensure_installed

from conv2former.engine.distributed import python_path

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "launch" / "slurm"
SMALL = ["--variant", "demo", "--image-size", "32", "--set", "logging.print_every=1"]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    c = SlurmCluster(root)
    c.start()
    c.env.update(C2F_PYTHON=sys.executable, C2F_REPO=str(REPO), PYTHONPATH=python_path(str(REPO)))
    yield c
    c.stop()


def sbatch(cluster: SlurmCluster, *args: str) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], env=cluster.env, cwd=REPO, capture_output=True, text=True, errors="replace"
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_pretrain_sbatch_two_tasks(cluster, demo_root, tmp_path):
    out = tmp_path / "run"
    job = sbatch(
        cluster,
        "--ntasks=2",
        f"--output={tmp_path}/slurm-%j.out",
        str(SLURM / "pretrain.sbatch"),
        *SMALL,
        "--data",
        str(demo_root / "in22k"),
        "--output",
        str(out),
        "--max-steps",
        "12",
        "--save-every",
        "6",
    )
    info = cluster.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")  # tasks interleave bytes
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 task(s)" in log
    summary = summary_from(log)
    assert summary["step"] == 12
    assert (out / "checkpoints" / "step000000012" / "complete").exists()
    assert json.loads((out / "checkpoints" / "step000000012" / "complete").read_text())["world_size"] == 2
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert (out / "export" / "model.safetensors").exists()


def test_submit_pipeline_runs_every_stage_in_order(cluster, demo_root, tmp_path):
    env = dict(
        cluster.env,
        DATA_22K=str(demo_root / "in22k"),
        DATA_1K=str(demo_root / "in1k"),
        RUN_DIR=str(tmp_path),
        VARIANT="demo",
        RES_LOW="32",
        RES_HIGH="48",
        PRETRAIN_SBATCH="--ntasks=2",
        FINETUNE_SBATCH="--ntasks=2",
        EVAL_SBATCH="--ntasks=2",
        PRETRAIN_ARGS="--image-size 32 --max-steps 10",
        FT224_ARGS="--max-steps 6",
        FT384_ARGS="--max-steps 6",
        EVAL_ARGS="--batch 50",
    )
    proc = subprocess.run(
        [str(REPO / "launch" / "submit_pipeline.sh")], env=env, capture_output=True, text=True, errors="replace"
    )
    assert proc.returncode == 0, proc.stderr
    jobs = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert list(jobs) == ["pretrain", "finetune_32", "finetune_48", "evaluate_32", "evaluate_48"]
    infos = {}
    for stage, job in jobs.items():
        infos[stage] = cluster.wait(job, timeout=900)
        logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"slurm-*-{job}.out"))
        assert infos[stage]["JobState"] == "COMPLETED", (stage, logs[-3000:])
    # the paper's chain: both fine-tunes after pretraining (from its export), each evaluation after its fine-tune
    for earlier, later in [("pretrain", "finetune_32"), ("pretrain", "finetune_48")] + [
        (f"finetune_{r}", f"evaluate_{r}") for r in (32, 48)
    ]:
        assert infos[earlier]["EndTime"] <= infos[later]["StartTime"]
    # (Slurm clears Dependency once it is met; that the chain is afterok is proven by the failing-chain test below)
    for res, mode in ((32, "center"), (48, "squash")):
        result = json.loads((tmp_path / f"eval_{res}.json").read_text())
        assert result["num_samples"] == 300 and result["ranks"] == 2 and result["resolution"] == res
        assert result["weights"] == str(tmp_path / f"finetune_{res}" / "export" / "best")  # the best-evaluated
        assert result["crop_mode"] == mode  # the 224 and 384 recipes' eval
        record = json.loads((tmp_path / f"finetune_{res}" / "export" / "best" / "evaluation.json").read_text())
        assert result["top1"] == pytest.approx(record["best"]["top1"], abs=1e-9)


def test_a_failed_stage_stops_the_chain(cluster, demo_root, tmp_path):
    """The first stage fails (an impossible schedule); the fine-tuning and evaluation jobs must never start."""
    env = dict(
        cluster.env,
        DATA_22K=str(demo_root / "in22k"),
        DATA_1K=str(demo_root / "in1k"),
        RUN_DIR=str(tmp_path),
        VARIANT="demo",
        PRETRAIN_SBATCH="--ntasks=1",
        FINETUNE_SBATCH="--ntasks=1",
        EVAL_SBATCH="--ntasks=1",
        PRETRAIN_ARGS="--set schedule.epochs=0",
    )
    proc = subprocess.run(
        [str(REPO / "launch" / "submit_pipeline.sh")], env=env, capture_output=True, text=True, errors="replace"
    )
    assert proc.returncode == 0, proc.stderr
    jobs = dict(line.split() for line in proc.stdout.strip().splitlines())
    try:
        first = cluster.wait(jobs["pretrain"], timeout=300)
        assert first["JobState"] == "FAILED"
        deadline = time.time() + 60  # give the controller time to evaluate the dependency
        while time.time() < deadline and "DependencyNeverSatisfied" not in cluster.job(jobs["finetune_224"]).get(
            "Reason", ""
        ):
            time.sleep(1)
        for stage in ("finetune_224", "finetune_384", "evaluate_224", "evaluate_384"):
            info = cluster.job(jobs[stage])
            assert info["JobState"] in ("PENDING", "CANCELLED"), info  # never RUNNING, never COMPLETED
        assert "DependencyNeverSatisfied" in cluster.job(jobs["finetune_224"])["Reason"]
        assert not (tmp_path / "finetune_224").exists()
    finally:
        subprocess.run(["scancel", *jobs.values()], env=cluster.env)


def test_usr1_checkpoints_requeues_and_resumes(cluster, demo_root, tmp_path):
    out = tmp_path / "run"
    job = sbatch(
        cluster,
        "--ntasks=2",
        f"--output={tmp_path}/slurm-%j.out",
        str(SLURM / "pretrain.sbatch"),
        *SMALL,
        "--data",
        str(demo_root / "in22k"),
        "--output",
        str(out),
        "--max-steps",
        "60",
        "--save-every",
        "1000",
    )
    log_path = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log_path.exists() and len(log_path.read_text().splitlines()) >= 8):
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)  # as --signal=B:USR1 does
    deadline = time.time() + 300
    while time.time() < deadline and cluster.job(job).get("Restarts", "0") == "0":
        time.sleep(0.5)
    info = cluster.wait(job, timeout=600)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")  # tasks interleave bytes
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    summaries = [json.loads(line[len("summary: ") :]) for line in log.splitlines() if line.startswith("summary: ")]
    assert summaries[0]["status"].startswith("stopped by signal") and summaries[-1]["step"] == 60
    stopped_at = summaries[0]["step"]
    assert 0 < stopped_at < 60
    assert f"resumed from step{stopped_at:09d}: epoch" in log  # the requeued job continued from that checkpoint
    steps = [
        json.loads(line)["step"] for line in log_path.read_text().splitlines() if json.loads(line)["kind"] == "train"
    ]
    assert steps == sorted(steps) and steps[-1] == 60  # the step count continues, never restarts


def test_deepspeed_launcher_mode_one_task_per_node(cluster, demo_root, tmp_path):
    out = tmp_path / "run"
    env = dict(cluster.env, C2F_LAUNCHER="deepspeed", GPUS_PER_NODE="2")
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=1",
            "--cpus-per-task=2",
            f"--output={tmp_path}/slurm-%j.out",
            str(SLURM / "pretrain.sbatch"),
            *SMALL,
            "--data",
            str(demo_root / "in22k"),
            "--output",
            str(out),
            "--max-steps",
            "6",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        errors="replace",
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    info = cluster.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")  # tasks interleave bytes
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert '"world_size": 2' in log  # the node's deepspeed launcher started 2 ranks
    assert (out / "export" / "model.safetensors").exists()
