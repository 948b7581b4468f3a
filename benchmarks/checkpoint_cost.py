"""What a checkpoint costs as the model grows: size, how long a save blocks training, resume and export.

    python benchmarks/checkpoint_cost.py [--variants demo conv2former_t conv2former_b conv2former_l] [--stages 1 3]
                                         [--data data/demo/in22k] [--record]

For each variant and ZeRO stage: ``launch/pretrain.py`` on 2 CPU ranks (DeepSpeed, gloo) trains one step at 32 px and
saves a checkpoint (the engine records the save's seconds and bytes in log.jsonl, kind "checkpoint"); the same
command with one more step resumes from it (the "loaded in" time the engine logs); ``launch/export.py`` then
consolidates it with DeepSpeed's zero_to_fp32 into export/ (wall time and peak RSS of that process). The data are the
demo shards with the class list widened to ImageNet-22k's 21,841 classes, so the head has its real size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)
from results import machine, record, versions  # noqa: E402  (benchmarks/results.py)

from conv2former.engine.distributed import python_path  # noqa: E402


def widened_copy(data: str, dest: Path) -> str:
    """The demo shards with classes.txt and _info.json saying 21,841 classes (labels stay the demo's)."""
    shutil.copytree(data, dest, ignore=shutil.ignore_patterns("val"))
    shutil.copytree(os.path.join(data, "val"), dest / "val")
    classes = (dest / "classes.txt").read_text().split()
    classes += [f"n9{i:07d}" for i in range(21841 - len(classes))]
    (dest / "classes.txt").write_text("\n".join(classes) + "\n")
    info = json.loads((dest / "_info.json").read_text())
    info["num_classes"] = 21841
    (dest / "_info.json").write_text(json.dumps(info))
    return str(dest)


def pretrain(data: str, out: Path, variant: str, stage: int, steps: int) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=python_path(str(REPO)))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    from conv2former.engine.distributed import deepspeed_command

    command = deepspeed_command(
        str(REPO / "launch" / "pretrain.py"),
        "--variant",
        variant,
        "--data",
        data,
        "--output",
        str(out),
        "--image-size",
        "32",
        "--max-steps",
        str(steps),
        "--save-every",
        "1",
        "--global-batch",
        "4",
        "--set",
        f"deepspeed.zero_stage={stage}",
        "--set",
        "data.batch_size=2",
        "--set",
        "data.eval_batch_size=2",
        "--set",
        "schedule.eval_every_epochs=1000",
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise SystemExit(f"error: {variant} ZeRO {stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def export(out: Path) -> Dict[str, float]:
    """launch/export.py under GNU time: wall seconds and the process's peak RSS."""
    shutil.rmtree(out / "export", ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, str(REPO / "launch" / "export.py"), str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=python_path(str(REPO))),
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: export of {out} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"export_s": seconds, "export_peak_mb": peak_kb / 1024}


def measure(data: str, work: Path, variant: str, stage: int) -> Dict[str, float]:
    out = work / f"{variant}-zero{stage}"
    pretrain(data, out, variant, stage, steps=1)
    saves = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    save = [r for r in saves if r["kind"] == "checkpoint"][0]
    resumed = pretrain(data, out, variant, stage, steps=2)
    loaded = float(re.search(r"resumed from step000000001: .* \(loaded in ([\d.]+) s\)", resumed).group(1))
    row = {"save_s": save["seconds"], "bytes": save["bytes"], "load_s": loaded, **export(out)}
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["demo", "t", "b", "l"])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--data", default=str(REPO / "data" / "demo" / "in22k"), help="a shard root (the demo's)")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "_info.json")):
        raise SystemExit(f"error: no shards at {args.data}: run `python data_prep/shard.py` (the demo) or pass --data")
    rows: List[str] = []
    with tempfile.TemporaryDirectory(prefix="c2f-ckpt-") as tmp:
        data = widened_copy(args.data, Path(tmp) / "data")
        for variant in args.variants:
            for stage in args.stages:
                r = measure(data, Path(tmp), variant, stage)
                print(
                    f"{variant} ZeRO {stage}: checkpoint {r['bytes'] / 1e9:.2f} GB, save {r['save_s']:.1f} s, "
                    f"resume {r['load_s']:.1f} s, export {r['export_s']:.1f} s (peak {r['export_peak_mb']:,.0f} MB)"
                )
                rows.append(
                    f"| {datetime.date.today().isoformat()} | {machine()} | {variant} | {stage} | "
                    f"{r['bytes'] / 1e9:.3f} | {r['save_s']:.1f} | {r['load_s']:.1f} | {r['export_s']:.1f} | "
                    f"{r['export_peak_mb']:,.0f} | {versions('torch', 'deepspeed')} |"
                )
    if args.record:
        record("checkpoint_cost.py", rows)


if __name__ == "__main__":
    main()
