"""Training images/s and peak memory per rank for ZeRO stages 0/1/2/3: same model, same batch, same data.

    python benchmarks/train_speed.py [--stages 0 1 2 3] [--variant demo] [--image-size 64] [--steps 60] [--record]

Runs ``launch/pretrain.py`` under the deepspeed launcher (2 ranks on CPU; one per GPU on a GPU machine) on the demo
shards for each stage and reads the steady-state rate and memory from the run's log.jsonl (first 10 steps skipped).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = REPO / "docs" / "PERFORMANCE.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variant", default="demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", default=str(REPO / "data" / "demo" / "in22k"))
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if not Path(args.data, "_info.json").exists():
        subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "demo", "--quiet"], check=True)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    rows = []
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as out:
            cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(29800 + stage),
                   str(REPO / "launch" / "pretrain.py"), "--variant", args.variant, "--data", args.data,
                   "--output", out, "--image-size", str(args.image_size), "--max-steps", str(args.steps),
                   "--zero-stage", str(stage), "--save-every", "0", "--set", "ema=false",
                   "--set", "logging.print_every=1", "--set", "schedule.eval_every_epochs=1000"]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
            train = [r for r in log if r["kind"] == "train"][10:]
            ips = median(r["images_per_s"] for r in train)
            mem = max(r["memory_mb"] for r in train)
        rows.append((stage, ips, mem))
        print(f"ZeRO-{stage}: {ips:.0f} images/s, peak memory {mem:.0f} MB per rank")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if args.record:
        command = "python benchmarks/train_speed.py " + " ".join(sys.argv[1:])
        with open(PERFORMANCE_MD, "a") as f:
            for stage, ips, mem in rows:
                f.write(f"| {datetime.date.today()} | {device} | {args.ranks} | conv2former_{args.variant} | "
                        f"{args.image_size} | {stage} | {ips:.0f} | {mem:.0f} | `{command}` |\n")


if __name__ == "__main__":
    main()
