"""Progressive resizing (data.size_schedule), measured two ways (docs/training.md "Spending fewer GPU-hours"):

    python benchmarks/progressive_resizing.py speed [--variant l] [--sizes 160,192,224] [--batch 4] [--record]
    python benchmarks/progressive_resizing.py accuracy [--seeds 0,1,2] [--epochs 10] [--record]

``speed``: images/s of one training step (forward, backward, AdamW; fp32 on CPU, bf16 autocast on a GPU) at each
size, and what the paper run's schedule (60% of 90 epochs at 160 px, 20% at 192, 20% at 224) costs relative to
224 px throughout: in pixels (the convolutions' FLOPs) and in measured step time, projected onto the fixed-224 run's
GPU-hours (``--fixed-hours``, default 300 H100-hours: the 90-epoch L run at ~27% MFU).

``accuracy``: the demo pretraining (40 classes, 2 CPU ranks, 64 px final) for ``--epochs``, at 64 px throughout and
with ``[[0.0, 32], [0.5, 64]]`` (5 of 10 epochs at 32 px: 62.5% of the pixels), for each seed: final top-1, training
wall time (the sum of the step times), and the training time at which each run first reaches the fixed run's mean
final top-1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from results import REPO, machine, record, versions

import conv2former  # noqa: F401
from conv2former.data.size_schedule import SizeSchedule
from conv2former.engine.distributed import deepspeed_command, python_path

PAPER_SCHEDULE = [[0.0, 160], [0.6, 192], [0.8, 224]]
DEMO_SCHEDULE = [[0.0, 32], [0.5, 64]]


def step_seconds(variant: str, size: int, batch: int, device: torch.device) -> float:
    """Median seconds of one training step (2 warm-up, 5 timed) of ``variant`` at ``size`` px."""
    import timm

    from conv2former.cpu import CpuTuning

    if device.type == "cpu":
        CpuTuning.install()
    model = timm.create_model(f"conv2former_{variant}", num_classes=1000).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(7):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [int(s) for s in args.sizes.split(",")]
    seconds = {size: step_seconds(args.variant, size, args.batch, device) for size in sizes}
    schedule = SizeSchedule.from_config(PAPER_SCHEDULE, "step", 90, 224)
    final = seconds[224]
    time_ratio = sum(seconds[s] / final for s in schedule.epoch_sizes()) / len(schedule.epoch_sizes())
    pixel_ratio = schedule.relative_cost()
    row = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "variant": args.variant,
        "batch": args.batch, **{f"img_s_{s}": round(args.batch / seconds[s], 3) for s in sizes},
        "pixels_vs_224": round(pixel_ratio, 3), "time_vs_224": round(time_ratio, 3),
        "gpu_hours_fixed": args.fixed_hours, "gpu_hours_schedule": round(args.fixed_hours * time_ratio, 1),
        "saving": f"{100 * (1 - time_ratio):.1f}%", "versions": versions("torch", "timm"),
    }  # fmt: skip
    print(json.dumps(row))
    return [row]


def demo_run(data: str, out: Path, seed: int, epochs: int, schedule: bool) -> Dict[str, Any]:
    args = [
        "--variant", "demo", "--data", data, "--output", str(out), "--epochs", str(epochs), "--image-size", "64",
        "--set", f"seed={seed}", "--set", "logging.print_every=1", "--set", "schedule.eval_every_epochs=1",
        "--save-every", "0",
    ]  # fmt: skip
    if schedule:
        args += ["--set", f"data.size_schedule={json.dumps(DEMO_SCHEDULE)}"]
    env = dict(
        os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=python_path(str(REPO))
    )
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # 2 CPU ranks, one thread each
    proc = subprocess.run(deepspeed_command(str(REPO / "launch" / "pretrain.py"), *args, ranks=2), env=env,
                          capture_output=True, text=True, errors="replace")  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = {r["step"]: r["step_time"] for r in records if r["kind"] == "train"}
    elapsed, curve = 0.0, []
    for r in (r for r in records if r["kind"] == "eval"):
        elapsed = sum(t for step, t in train.items() if step <= r["step"])
        curve.append((round(elapsed, 1), r["top1"]))
    return {"final_top1": curve[-1][1], "train_seconds": curve[-1][0], "curve": curve}


def accuracy(args: argparse.Namespace) -> List[Dict[str, Any]]:
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "demo", "--out", tmp, "--quiet"],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            data = str(Path(tmp) / "in22k")
        runs = {
            kind: [demo_run(data, Path(tmp) / f"{kind}{s}", s, args.epochs, kind == "schedule") for s in seeds]
            for kind in ("fixed", "schedule")
        }
    target = statistics.mean(r["final_top1"] for r in runs["fixed"])
    lines = []
    for kind, results in runs.items():
        tops = [r["final_top1"] for r in results]
        reach = [next((t for t, top1 in r["curve"] if top1 >= target), None) for r in results]
        row = {
            "date": datetime.date.today().isoformat(), "machine": machine(), "kind": kind, "epochs": args.epochs,
            "schedule": DEMO_SCHEDULE if kind == "schedule" else [[0.0, 64]], "seeds": seeds,
            "final_top1": tops, "top1_mean": round(statistics.mean(tops), 4),
            "top1_spread": round(max(tops) - min(tops), 4),
            "train_seconds": [r["train_seconds"] for r in results],
            "seconds_to_fixed_mean_top1": reach, "target_top1": round(target, 4),
            "versions": versions("torch", "timm", "deepspeed"),
        }  # fmt: skip
        print(json.dumps(row))
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["speed", "accuracy"])
    parser.add_argument("--variant", default="l")
    parser.add_argument("--sizes", default="160,192,224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--fixed-hours", type=float, default=300.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", help="demo 22k shard root (default: made in a temporary folder)")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/results/progressive_resizing.jsonl")
    args = parser.parse_args()
    rows = speed(args) if args.mode == "speed" else accuracy(args)
    if args.record:
        for row in rows:
            cells = "| " + " | ".join(str(value) for value in row.values()) + " |"
            record("progressive_resizing.py", [cells], columns=list(row))


if __name__ == "__main__":
    main()
