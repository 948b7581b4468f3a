"""A run's fixed cost: seconds from the command to the end of its first optimizer step, and from the end of its last
step to the process's exit, as a user pays them (the deepspeed launcher, imports, rendezvous, setup, the final
checkpoint, the export, teardown).

    python benchmarks/fixed_cost.py [--cases demo l] [--steps 3] [--repeat 3] [--repo DIR] [--timeline] [--record]

Cases: ``demo`` (the demo network on the demo "22k" shards, 2 CPU ranks, its own recipe and defaults) and ``l``
(Conv2Former-L at 224 px, 1 rank, micro-batch 2 (Mixup pairs), on 100 of the same generated images sharded
with ImageNet-1k's 1000 classes, val 4 images). Each run trains ``--steps`` optimizer
steps (``--max-steps``; the run then checkpoints and exports as any run does at its end) with a log.jsonl record
every step; the script watches that file and notes when each step's record appears (polled every 10 ms), so:

* ``to first step``: the command's start to the appearance of step 1's record (includes step 1's own compute,
  shown apart as ``first step``: its step_time in the record);
* ``after last step``: the appearance of the last step's record to the command's exit, less the final evaluation
  (work that grows with the val split, shown apart: from the final checkpoint's record, or the last step's, to the
  evaluation's record): the final checkpoint (also shown apart: the seconds its record holds), the export, the
  summary, teardown.

``--repo DIR`` measures another checkout (e.g. a ``git worktree`` of an older commit) with this script; its median of
``--repeat`` runs is what a row records. ``--timeline`` prints each output line with the second it appeared at.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median
from typing import Dict, List, Tuple

from results import REPO, machine, record, versions

from conv2former.engine.distributed import deepspeed_command, python_path

CASES: Dict[str, Tuple[int, List[str]]] = {  # name: (ranks, pretrain.py arguments besides --data/--output)
    "demo": (2, ["--variant", "demo"]),
    "l": (1, ["--variant", "l", "--image-size", "224", "--micro-batch", "2", "--global-batch", "2"]),
}


def demo_data(repo: Path, work: Path) -> Path:
    """The demo dataset (shards and the raw images they came from), generated once under ``work``."""
    root = work / "demo-data"
    if not (root / "in22k" / "_info.json").exists():
        env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
        command = [sys.executable, str(repo / "data_prep" / "shard.py"), "demo", "--out", str(root), "--quiet"]
        subprocess.run(command, check=True, env=env, cwd=repo, stdout=subprocess.DEVNULL)
    return root


def l_data(repo: Path, demo: Path, work: Path) -> Path:
    """Shards for the L case: ImageNet-1k's 1000-class label space, 10 of the demo's generated images per class of
    its 10 classes, and a val split of 4 images (the evaluation at the end of training is work, not a fixed cost, and
    400 images at 224 px through L take minutes on a CPU)."""
    root, raw = work / "l-data", work / "l-raw"
    if not (root / "_info.json").exists():
        shutil.rmtree(raw, ignore_errors=True)
        for folder in sorted((demo / "raw" / "in1k" / "train").iterdir()):
            (raw / "train" / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:10]:
                shutil.copy(image, raw / "train" / folder.name)
        (raw / "val").mkdir()
        lines = (demo / "raw" / "in1k" / "LOC_val_solution.csv").read_text().splitlines()[:5]
        (raw / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            shutil.copy(demo / "raw" / "in1k" / "val" / f"{line.split(',')[0]}.JPEG", raw / "val")
        env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
        command = [sys.executable, str(repo / "data_prep" / "shard.py"), "imagenet1k", str(raw), str(root), "--quiet"]
        subprocess.run(command, check=True, env=env, cwd=repo, stdout=subprocess.DEVNULL)
    return root


def watch_log(log: Path, seen: Dict[str, float], stop: threading.Event, start: float) -> None:
    """Note the second each record of ``log`` first appears (polled every 10 ms): ``train 3``, ``eval 3``, ...; and
    each train step's own step_time (``step_time 3``)."""
    while not stop.is_set():
        if log.exists():
            for line in log.read_text().splitlines():
                if line.endswith("}"):
                    item = json.loads(line)
                    key = f"{item.get('kind')} {item.get('step')}"
                    if key not in seen:
                        seen[key] = time.perf_counter() - start
                        if item.get("kind") == "train":
                            seen[f"step_time {item['step']}"] = item["step_time"]
                        if item.get("kind") == "checkpoint":
                            seen[f"checkpoint_seconds {item['step']}"] = item["seconds"]
        stop.wait(0.01)


def run_case(case: str, args: argparse.Namespace, data: str) -> Dict[str, float]:
    ranks, extra = CASES[case]
    repo = Path(args.repo).resolve()
    with tempfile.TemporaryDirectory(dir=args.work) as out:
        script = str(repo / "launch" / "pretrain.py")
        command = deepspeed_command(script, "--data", data, "--output", out, *extra, "--max-steps", str(args.steps),
                                    "--set", "logging.print_every=1", ranks=ranks)  # fmt: skip
        env = dict(
            os.environ,
            PYTHONPATH=python_path(str(repo)),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS=str(args.threads),
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        )
        seen: Dict[str, float] = {}
        stop = threading.Event()
        start = time.perf_counter()
        watcher = threading.Thread(target=watch_log, args=(Path(out, "log.jsonl"), seen, stop, start), daemon=True)
        watcher.start()
        process = subprocess.Popen(command, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace")  # fmt: skip
        lines = []
        for line in process.stdout or []:
            lines.append((time.perf_counter() - start, line.rstrip()))
        process.wait()
        total = time.perf_counter() - start
        stop.set()
        watcher.join()
    last = f"train {args.steps}"
    if process.returncode != 0 or last not in seen:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"error: the {case} run failed (exit {process.returncode}); its last lines:\n{tail}")
    if args.timeline:
        for second, text in lines:
            print(f"{second:7.2f}s  {text[:150]}")
    # the evaluation at the end of training (after the final checkpoint) is work that grows with the val split, not a
    # fixed cost: from the checkpoint's record (or the last step's) to the evaluation's
    saved = seen.get(f"checkpoint {args.steps}", seen[last])
    evaluation = seen[f"eval {args.steps}"] - max(saved, seen[last]) if f"eval {args.steps}" in seen else 0.0
    return {"to_first_step": seen["train 1"], "first_step": seen["step_time 1"], "evaluation": evaluation,
            "after_last_step": total - seen[last] - evaluation,
            "final_checkpoint": seen.get(f"checkpoint_seconds {args.steps}", 0.0), "total": total}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the row is their median")
    parser.add_argument("--repo", default=str(REPO), help="the checkout to measure (default: this one)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--work", help="where the data and runs go (default: a temporary folder)")
    parser.add_argument("--timeline", action="store_true", help="print each output line with its second")
    parser.add_argument("--label", default="", help="what the row measured (e.g. the commit)")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        args.work = args.work or scratch
        repo, work = Path(args.repo).resolve(), Path(args.work)
        demo = demo_data(repo, work)
        data = {"demo": str(demo / "in22k"), "l": str(l_data(repo, demo, work)) if "l" in args.cases else ""}
        rows = []
        for case in args.cases:
            runs = [run_case(case, args, data[case]) for _ in range(args.repeat)]
            m = {key: median(r[key] for r in runs) for key in runs[0]}
            print(f"{case}: to first step {m['to_first_step']:.1f} s (step 1 itself {m['first_step']:.1f} s), "
                  f"after last step {m['after_last_step']:.1f} s (the final checkpoint {m['final_checkpoint']:.1f} s of it; "
                  f"besides, the final evaluation {m['evaluation']:.1f} s), "
                  f"whole run {m['total']:.1f} s "
                  f"(median of {len(runs)})")  # fmt: skip
            rows.append(
                f"| {time.strftime('%Y-%m-%d')} | {machine(args.threads)} | {case} | {CASES[case][0]} | {args.steps} "
                f"| {m['to_first_step']:.1f} | {m['first_step']:.1f} | {m['after_last_step']:.1f} "
                f"| {m['final_checkpoint']:.1f} | {m['evaluation']:.1f} "
                f"| {m['total']:.1f} "
                f"| {len(runs)} | {args.label} | {versions('torch', 'deepspeed', 'timm')} |"
            )
    if args.record:
        columns = ["date", "machine", "case", "ranks", "steps", "to_first_step_s", "first_step_s",
                   "after_last_step_s", "final_checkpoint_s", "final_eval_s", "total_s", "runs", "label", "versions"]  # fmt: skip
        record("fixed_cost.py", rows, columns=columns)


if __name__ == "__main__":
    main()
