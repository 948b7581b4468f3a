"""A run's fixed cost: seconds from the command to the end of its first optimizer step, and from the end of its last
step to the process's exit, as a user pays them (the deepspeed launcher, imports, rendezvous, setup, the final
checkpoint, the export, teardown).

    python benchmarks/fixed_cost.py [--cases demo l] [--steps 3] [--repeat 3] [--repo DIR] [--timeline] [--record]

Cases: ``demo`` (the demo network on the demo "22k" shards, 2 CPU ranks, its own recipe and defaults) and ``l``
(Conv2Former-L at 224 px, 1 rank, micro-batch 1, on the same generated images). Each run trains ``--steps`` optimizer
steps (``--max-steps``; the run then checkpoints and exports as any run does at its end) with a log.jsonl record
every step; the script watches that file and notes when each step's record appears (polled every 10 ms), so:

* ``to first step``: the command's start to the appearance of step 1's record (includes step 1's own compute,
  shown apart as ``first step``: its step_time in the record);
* ``after last step``: the appearance of the last step's record to the command's exit.

``--repo DIR`` measures another checkout (e.g. a ``git worktree`` of an older commit) with this script; its median of
``--repeat`` runs is what a row records. ``--timeline`` prints each output line with the second it appeared at.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "l": (1, ["--variant", "l", "--image-size", "224", "--micro-batch", "1", "--global-batch", "1"]),
}


def demo_data(repo: Path, work: Path) -> str:
    """The demo "22k" shard root, generated once under ``work``."""
    root = work / "demo-data"
    if not (root / "in22k" / "_info.json").exists():
        env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
        command = [sys.executable, str(repo / "data_prep" / "shard.py"), "demo", "--out", str(root), "--quiet"]
        subprocess.run(command, check=True, env=env, cwd=repo, stdout=subprocess.DEVNULL)
    return str(root / "in22k")


def watch_log(log: Path, seen: Dict[int, float], stop: threading.Event, start: float) -> None:
    """Note the second each train record's step first appears in ``log`` (polled every 10 ms)."""
    while not stop.is_set():
        if log.exists():
            for line in log.read_text().splitlines():
                if line.endswith("}"):
                    item = json.loads(line)
                    if item.get("kind") == "train" and item["step"] not in seen:
                        seen[item["step"]] = time.perf_counter() - start
                        seen.setdefault(-item["step"], item["step_time"])  # (negative keys: the step's own time)
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
        seen: Dict[int, float] = {}
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
    if process.returncode != 0 or args.steps not in seen:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"error: the {case} run failed (exit {process.returncode}); its last lines:\n{tail}")
    if args.timeline:
        for second, text in lines:
            print(f"{second:7.2f}s  {text[:150]}")
    return {"to_first_step": seen[1], "first_step": seen[-1], "after_last_step": total - seen[args.steps],
            "total": total}  # fmt: skip


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
        data = demo_data(Path(args.repo).resolve(), Path(args.work))
        rows = []
        for case in args.cases:
            runs = [run_case(case, args, data) for _ in range(args.repeat)]
            m = {key: median(r[key] for r in runs) for key in runs[0]}
            print(f"{case}: to first step {m['to_first_step']:.1f} s (step 1 itself {m['first_step']:.1f} s), "
                  f"after last step {m['after_last_step']:.1f} s, whole run {m['total']:.1f} s "
                  f"(median of {len(runs)})")  # fmt: skip
            rows.append(
                f"| {time.strftime('%Y-%m-%d')} | {machine(args.threads)} | {case} | {CASES[case][0]} | {args.steps} "
                f"| {m['to_first_step']:.1f} | {m['first_step']:.1f} | {m['after_last_step']:.1f} | {m['total']:.1f} "
                f"| {len(runs)} | {args.label} | {versions('torch', 'deepspeed', 'timm')} |"
            )
    if args.record:
        columns = ["date", "machine", "case", "ranks", "steps", "to_first_step_s", "first_step_s",
                   "after_last_step_s", "total_s", "runs", "label", "versions"]  # fmt: skip
        record("fixed_cost.py", rows, columns=columns)


if __name__ == "__main__":
    main()
