"""End-to-end training images/s, data wait and peak memory per rank of launch/pretrain.py, one run per ZeRO stage.

    python benchmarks/train_speed.py [--stages 0 1 2 3] [--variant demo] [--image-size 64] [--steps 60]
        [--data SHARD_ROOT] [--ranks N] [--micro-batch M] [--global-batch G] [--backend auto] [--set key=value] [--record]

Runs ``launch/pretrain.py`` under the deepspeed launcher (2 ranks on CPU; one per GPU on a GPU machine) with the real
loader feeding the engine, and reads the steady-state rate from the run's log.jsonl (records every 5 steps, each
the average of its 5 steps; the first 10 steps skipped):
images/s (median), the share of step time spent waiting for the next batch ("data wait"; near 0 means the loader
keeps up), peak memory per rank, and on a GPU the MFU (images/s per GPU x 6 x MACs / bf16 dense peak). ZeRO-0 (plain
data parallel, what DDP does) is the baseline each stage's ratio is taken against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch
import yaml
from results import REPO, machine, machine_info, record, versions

from conv2former.engine.distributed import deepspeed_command, python_path


def run_stage(stage: int, args: argparse.Namespace, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = deepspeed_command(
            str(REPO / "launch" / "pretrain.py"),
            "--variant",
            args.variant,
            "--data",
            args.data,
            "--output",
            out,
            "--image-size",
            str(args.image_size),
            "--max-steps",
            str(args.steps),
            "--zero-stage",
            str(stage),
            "--save-every",
            "0",
            "--backend",
            args.backend,
            "--set",
            "ema=false",
            "--set",
            "logging.print_every=5",
            "--set",
            "schedule.eval_every_epochs=1000",
            ranks=args.ranks,
            port=29800 + stage,
        )
        if args.micro_batch:
            cmd += ["--micro-batch", str(args.micro_batch)]
        if args.global_batch:
            cmd += ["--global-batch", str(args.global_batch)]
        for item in args.set:
            cmd += ["--set", item]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"error: ZeRO-{stage} run failed (exit {done.returncode}); its output is above")
        log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
        config = yaml.safe_load(Path(out, "export", "config.yaml").read_text())  # the resolved config of the run
    train = [r for r in log if r["kind"] == "train" and r["step"] > 10]  # each record averages 5 steps
    if not train:
        raise SystemExit(f"error: no steps after the 10th with --steps {args.steps}; give --steps 20 or more")
    return dict(
        images_per_s=median(r["images_per_s"] for r in train),
        data_wait=median(r["data_time"] / r["step_time"] for r in train),
        memory_mb=max(r["memory_mb"] for r in train),
        micro_batch=config["data"]["batch_size"],
        global_batch=config["schedule"]["global_batch"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--variant", default="demo")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", default=str(REPO / "data" / "demo" / "in22k"))
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to pretrain.py")
    parser.add_argument("--json", action="store_true", help="print one JSON line per stage")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    if not Path(args.data, "_info.json").exists():
        if Path(args.data).resolve() != (REPO / "data" / "demo" / "in22k").resolve():
            raise SystemExit(f"error: {args.data} holds no shards (_info.json); make them with data_prep/shard.py")
        subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "demo", "--quiet"], check=True)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=python_path(str(REPO)))
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")

    gmacs = peak = None
    if torch.cuda.is_available():
        import timm
        from model_speed import bf16_peak

        import conv2former  # noqa: F401
        from conv2former.complexity import count_gmacs

        with torch.device("meta"):
            gmacs = count_gmacs(timm.create_model(f"conv2former_{args.variant}"), args.image_size)
        peak = bf16_peak(torch.device("cuda"))

    results = {}
    for stage in args.stages:
        results[stage] = r = run_stage(stage, args, env)
        r["mfu"] = r["images_per_s"] / args.ranks * 6 * gmacs * 1e9 / peak if gmacs and peak else None
        print(
            f"ZeRO-{stage}: {r['images_per_s']:.0f} images/s, data wait {r['data_wait']:.1%} of step time, "
            f"peak memory {r['memory_mb']:.0f} MB per rank" + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "")
        )
        if args.json:
            print(
                json.dumps(
                    dict(
                        stage=stage,
                        variant=args.variant,
                        image_size=args.image_size,
                        ranks=args.ranks,
                        machine=machine_info(),
                        **r,
                    )
                )
            )
    base = results.get(0)
    if args.record:
        rows = []
        for stage, r in results.items():
            batch = f"{r['micro_batch']} / {r['global_batch']}"
            ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}×" if base else "—"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "—"
            rows.append(
                f"| {datetime.date.today()} | {machine()} | {args.ranks} | conv2former_{args.variant} | "
                f"{args.image_size} | {batch} | {stage} | {r['images_per_s']:.0f} | {ratio} | "
                f"{r['data_wait']:.1%} | {mfu} | {r['memory_mb']:.0f} | {versions('torch', 'deepspeed', 'dali')} |"
            )
        record("train_speed.py", rows)


if __name__ == "__main__":
    main()
