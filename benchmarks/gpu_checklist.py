"""The GPU checklist: what a short GPU reservation runs, as prioritized stages that resume where the last one stopped.

    python benchmarks/gpu_checklist.py [--out DIR] [--deadline 560] [--from N | --only N] [--record]
    python benchmarks/gpu_checklist.py --list                  # the stages, their budgets, where the next run starts
    python benchmarks/gpu_checklist.py --rehearse --out DIR [--kit dist/gpu-kit]   # CPU: the stages' CPU forms
    python benchmarks/gpu_checklist.py record DIR              # add a reservation's stages.json to the record

Stages, by value per minute of GPU time (docs/performance.md says what each proves):

  1 environment  versions, the GPU and its free memory, a writable environment, nvJPEG/NPP present
  2 gpu-tests    tests/test_gpu.py's cheap tests: the late read, every depthwise candidate against fp32 F.conv2d on
                 Conv2Former-L's shapes, the Triton kernels' compile time, the chooser on the demo model
  3 engine-l     the engine on the GPU (torch loader): Conv2Former-L bf16, ZeRO-1 and ZeRO-3, gpu.depthwise=measure:
                 images/s, MFU, peak memory next to the memory planner's prediction
  4 resume       stop at 15 + relaunch == 30 uninterrupted steps, bit for bit (deterministic=true, demo, torch loader)
  5 dali         DALI `mixed` decoding: the dali-gpu loader tests, a DALI-fed training step, img/s on full-size JPEGs
  6 gpu-suite    the rest of tests/test_gpu.py and benchmarks/gpu_suite.sh QUICK=1

Each stage runs under its own budget (its process group gets SIGABRT at the budget, so every Python process in it
prints its traceback, then SIGKILL); a stage starts only if its budget fits in what is left of ``--deadline``. Stage 1
always runs and stops the checklist if it fails; the other stages start at the first one the record
(benchmarks/results/gpu_checklist.jsonl) does not show as passed on a GPU, unless --from/--only say otherwise.
The results folder holds at most 8 files: checklist.md (a verdict line per stage), stages.json (what `record`
adds), environment.json, log.txt (every command's output), junit.xml (every pytest stage), measurements.jsonl.
Exit status: 0 when every stage run passed, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "benchmarks" / "results" / "gpu_checklist.jsonl"
MAX_RESULT_FILES = 8
KILL_GRACE_S = 10
PY = sys.executable
PYTEST = [
    PY,
    "-m",
    "pytest",
    "-q",
    "-ra",
    "-p",
    "no:cacheprovider",
    "-o",
    "addopts=",
    "--capture=sys",
]  # fd 2 stays the log


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    budget_s: int
    commands: List[List[str]]  # on a GPU; "{work}", "{out}" and "{junit}" are filled in
    rehearsal: Optional[List[List[str]]] = None  # its CPU form (None: it has none)
    proves: str = ""


def pytest(*args: str, timeout: int) -> List[str]:
    """pytest with a per-test timeout that fails the test with its traceback and JUnit XML for the results."""
    return [*PYTEST, f"--timeout={timeout}", "--junitxml={junit}", *args]


DEMO_DATA = [PY, "data_prep/shard.py", "demo", "--out", "{work}/demo", "--quiet"]
L_SPEED = [PY, "benchmarks/train_speed.py", "--variant", "l", "--image-size", "224", "--ranks", "1", "--steps", "30",
           "--micro-batch", "64", "--global-batch", "64", "--backend", "torch", "--data", "{work}/demo/in22k",
           "--json"]  # fmt: skip
L_PLAN = [PY, "launch/pretrain.py", "--variant", "l", "--image-size", "224", "--micro-batch", "64", "--global-batch",
          "64", "--data", "{work}/demo/in22k", "--output", "{work}/plan", "--plan-memory"]  # fmt: skip
CHEAP_GPU_TESTS = "late_read or depthwise_candidate or triton_kernels_compile or chooser"

STAGES = [
    Stage(1, "environment", 30, [[PY, "benchmarks/gpu_environment.py", "--out", "{out}/environment.json"]],
          [[PY, "benchmarks/gpu_environment.py", "--out", "{out}/environment.json", "--rehearse"]],
          "the kit is installed and the GPU is what the budgets assume"),
    Stage(2, "gpu-tests", 120, [pytest("tests/test_gpu.py", "-k", CHEAP_GPU_TESTS, timeout=90)],
          [pytest("tests/test_gpu.py", "tests/test_cpu_tuning.py", "-k", f"{CHEAP_GPU_TESTS} or accuracy_gate",
                  timeout=90)],
          "the late read, the depthwise candidates and their gate, Triton compile times, the chooser"),
    Stage(3, "engine-l", 180, [DEMO_DATA, [*L_SPEED, "--stages", "1", "3"], [*L_PLAN, "--zero-stage", "1"],
                               [*L_PLAN, "--zero-stage", "3"]],
          None, "Conv2Former-L trains in bf16 at ZeRO 1 and 3 through the measured depthwise path; MFU; memory"),
    Stage(4, "resume", 120, [pytest("-x", "tests/test_gpu.py", "-k", "stops_resumes and demo-1-torch", timeout=110)],
          None, "stop + relaunch is bitwise equal to the uninterrupted run on a GPU"),
    Stage(5, "dali", 150, [pytest("tests/test_loader.py", "tests/test_dali_randaugment.py", "tests/test_gpu.py", "-k",
                                  "dali-gpu or demo-1-dali", timeout=120),
                           [PY, "benchmarks/loader_speed.py", "--backend", "dali-gpu", "--mode", "train", "--images",
                            "2000", "--batch", "128", "--seconds", "10", "--json"]],
          None, "DALI's mixed decoding on the GPU: exact, resumable, fast enough to feed L"),
    Stage(6, "gpu-suite", 540, [pytest("tests/test_gpu.py", "-k", f"not ({CHEAP_GPU_TESTS} or demo-1-torch or "
                                       "demo-1-dali)", timeout=300),  # stages 2, 4 and 5 ran those
                                ["env", "QUICK=1", "BENCH_IMAGES=4000", "RECORD=0", "OUT={work}/suite", f"PYTHON={PY}",
                                 "bash", "benchmarks/gpu_suite.sh"]],
          None, "every GPU test and the quick benchmark suite (MFU, ZeRO 1/2/3, the 90-epoch projection)"),
]  # fmt: skip


@dataclass
class Result:
    number: int
    name: str
    status: str  # passed | failed | out of time | not started | rehearsed | no CPU form
    seconds: float
    budget_s: int
    verdict: str
    device: str = ""
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    commit: str = ""


def fill(command: Sequence[str], out: Path, work: Path, junit: Path) -> List[str]:
    return [a.format(out=out, work=work, junit=junit) for a in command]


def run_command(command: List[str], deadline: float, log, out: Path) -> str:
    """Run one command in its own process group until ``deadline`` (monotonic); its output goes to ``log``.
    Returns "passed", "failed" or "out of time" (SIGABRT: faulthandler prints each Python process's traceback)."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    env = dict(
        os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1", C2F_MEASUREMENTS=str(out / "measurements.jsonl")
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return "passed" if proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) == 0 else "failed"
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGABRT, KILL_GRACE_S), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        log.write(f"\n!! out of time: killed at the stage's budget ({' '.join(command[:4])} ...)\n")
        return "out of time"


def merge_junit(part: Path, into: Path) -> None:
    """Append the test suites of ``part`` (one pytest run) to ``into`` (all pytest runs of the checklist)."""
    if not part.exists():
        return
    suites = ET.parse(into).getroot() if into.exists() else ET.Element("testsuites")
    found = ET.parse(part).getroot()
    for suite in found.iter("testsuite") if found.tag == "testsuites" else [found]:
        suites.append(suite)
    ET.ElementTree(suites).write(into, encoding="unicode")
    part.unlink()


def run_stage(stage: Stage, commands: List[List[str]], out: Path, work: Path, overall_deadline: float) -> Result:
    start = time.monotonic()
    deadline = min(start + stage.budget_s, overall_deadline)
    status = "passed"
    junit = work / "junit-part.xml"
    with open(out / "log.txt", "a") as log:
        log.write(f"\n==== stage {stage.number} {stage.name} (budget {stage.budget_s} s) ====\n")
        for command in commands:
            status = run_command(fill(command, out, work, junit), deadline, log, out)
            merge_junit(junit, out / "junit.xml")
            if status != "passed":
                break
    seconds = round(time.monotonic() - start, 1)
    return Result(stage.number, stage.name, status, seconds, stage.budget_s, verdict_line(stage, status, seconds, out))


def verdict_line(stage: Stage, status: str, seconds: float, out: Path) -> str:
    tests = junit_counts(out / "junit.xml")
    shown = f" ({tests})" if tests and stage.commands and "pytest" in " ".join(stage.commands[-1]) else ""
    if status == "passed":
        return (
            f"stage {stage.number} {stage.name}: passed in {seconds:.0f} s of {stage.budget_s}{shown}: {stage.proves}"
        )
    if status == "out of time":
        return f"stage {stage.number} {stage.name}: OUT OF TIME at {stage.budget_s} s (tracebacks in log.txt){shown}"
    return f"stage {stage.number} {stage.name}: FAILED after {seconds:.0f} s (log.txt, junit.xml){shown}"


def junit_counts(path: Path) -> str:
    if not path.exists():
        return ""
    root = ET.parse(path).getroot()
    suites = list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return ", ".join(f"{v} {k}" for k, v in total.items())


def json_objects(text: str) -> List[dict]:
    """The JSON objects a command printed: one-line objects, and pretty-printed ones from a "{" line to a "}" line."""
    found, block = [], []
    for line in text.splitlines():
        if block or line == "{":
            block.append(line)
            if line == "}":
                found.append("\n".join(block))
                block = []
        elif line.startswith("{") and line.endswith("}"):
            found.append(line)
    objects = []
    for item in found:
        try:
            value = json.loads(item)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def memory_against_plan(measured: List[dict]) -> List[str]:
    """'ZeRO-1 30.2 GiB measured / 28.0 planned (1.08x)' for each ZeRO stage with both a train_speed.py row and a
    --plan-memory report among ``measured``."""
    planned = {m["zero_stage"]: m["per_rank_gib"]["total"] for m in measured if "per_rank_gib" in m}
    lines = []
    for m in measured:
        if "memory_mb" in m and m.get("stage") in planned and planned[m["stage"]]:
            got, plan = m["memory_mb"] / 1024, planned[m["stage"]]
            lines.append(f"ZeRO-{m['stage']} {got:.1f} GiB measured / {plan:.1f} planned ({got / plan:.2f}x)")
    return lines


def read_record(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first_not_passed(record: List[dict]) -> int:
    """The first stage after the environment that no GPU run in the record has passed (rehearsals do not count)."""
    passed = {r["number"] for r in record if r["status"] == "passed" and r.get("device", "").lower() != "cpu"}
    return next((s.number for s in STAGES[1:] if s.number not in passed), len(STAGES) + 1)


def commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def device_name(out: Path, rehearse: bool) -> str:
    try:
        gpu = json.loads((out / "environment.json").read_text())["gpu"]
    except (OSError, ValueError, KeyError):
        return "cpu" if rehearse else "unknown"
    return gpu["name"] if gpu.get("available") else "cpu"


def chosen_stages(args: argparse.Namespace) -> List[Stage]:
    if args.only:
        return [STAGES[0], *[s for s in STAGES[1:] if s.number == args.only]]
    start = args.start if args.start else first_not_passed(read_record(args.record_file))
    return [STAGES[0], *[s for s in STAGES[1:] if s.number >= start]]


def run_checklist(args: argparse.Namespace) -> List[Result]:
    out, work = args.out, args.out.parent / f"{args.out.name}-work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    overall = time.monotonic() + args.deadline
    results: List[Result] = []
    for stage in chosen_stages(args):
        budget = args.budget.get(stage.number, stage.budget_s)
        stage = Stage(stage.number, stage.name, budget, stage.commands, stage.rehearsal, stage.proves)
        commands = stage.rehearsal if args.rehearse else stage.commands
        left = overall - time.monotonic()
        if commands is None:
            shown = "; ".join(" ".join(fill(c, out, work, work / "junit.xml")) for c in stage.commands)
            results.append(Result(stage.number, stage.name, "no CPU form", 0.0, budget,
                                  f"stage {stage.number} {stage.name}: no CPU form; on a GPU it runs: {shown}"))  # fmt: skip
            continue
        if budget > left:
            results.append(Result(stage.number, stage.name, "not started", 0.0, budget,
                                  f"stage {stage.number} {stage.name}: not started: {left:.0f} s left of the "
                                  f"deadline, its budget is {budget} s (the next reservation starts here)"))  # fmt: skip
            break
        size_before = (out / "log.txt").stat().st_size if (out / "log.txt").exists() else 0
        result = run_stage(stage, commands, out, work, overall)
        with open(out / "log.txt", errors="replace") as log:
            log.seek(size_before)
            measured = json_objects(log.read())
        with open(out / "measurements.jsonl", "a") as f:
            f.writelines(json.dumps({"checklist_stage": stage.name, **m}) + "\n" for m in measured)
        compared = memory_against_plan(measured)
        if compared:
            result.verdict += "; peak memory vs plan: " + ", ".join(compared)
        if args.rehearse and result.status == "passed":
            result.status, result.verdict = "rehearsed", result.verdict.replace(": passed", ": rehearsed on CPU", 1)
        results.append(result)
        print(result.verdict, flush=True)
        if stage.number == 1 and result.status not in ("passed", "rehearsed"):
            break  # without the environment the rest cannot mean anything
    return results


def write_results(results: List[Result], out: Path, rehearse: bool) -> None:
    device, sha = device_name(out, rehearse), commit()
    for r in results:
        r.device, r.commit = device, sha
    (out / "stages.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    lines = [f"# GPU checklist on {device}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    lines += [f"- {r.verdict}" for r in results]
    (out / "checklist.md").write_text("\n".join(lines) + "\n")


def check_result_folder(out: Path) -> List[str]:
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_RESULT_FILES:
        return [f"{out} holds {len(files)} files; a reservation brings back {MAX_RESULT_FILES}"]
    return []


def kit_problems(kit: Optional[Path]) -> List[str]:
    """The GPU kit's files over their limits (tools/gpu_kit.py), where a kit is given."""
    if kit is None:
        return []
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_kit

    return list(gpu_kit.kit_problems(kit))


def record(stages_json: Path, record_file: Path) -> int:
    """Append a reservation's stages (its stages.json) to the record, skipping rows already there."""
    rows = json.loads(stages_json.read_text())
    have = read_record(record_file)
    new = [r for r in rows if r not in have and r["status"] not in ("no CPU form",)]
    with open(record_file, "a") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in new)
    print(f"{len(new)} stage rows added to {record_file}; the next reservation starts at stage "
          f"{first_not_passed(read_record(record_file))}")  # fmt: skip
    return 0


def list_stages(record_file: Path) -> int:
    start = first_not_passed(read_record(record_file))
    for s in STAGES:
        mark = ">" if s.number == start else " "
        cpu = "CPU form" if s.rehearsal else "GPU only"
        print(f"{mark} {s.number} {s.name:<12} {s.budget_s:>4} s  {cpu:<8}  {s.proves}")
    return 0


def budgets(items: List[str]) -> Dict[int, int]:
    out = {}
    for item in items:
        number, _, seconds = item.partition("=")
        if not (number.isdigit() and seconds.isdigit()):
            raise SystemExit(f"error: --budget {item!r}: give STAGE=SECONDS, e.g. 3=240")
        out[int(number)] = int(seconds)
    return out


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", nargs="?", choices=["run", "record"], default="run")
    parser.add_argument("results", nargs="?", type=Path, help="record: the results folder of a reservation")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default runs/gpu_checklist/<time>)")
    parser.add_argument("--deadline", type=int, default=560, help="seconds for the whole checklist (default 560)")
    parser.add_argument("--from", dest="start", type=int, help="start at this stage (default: the record's first "
                        "stage not yet passed)")  # fmt: skip
    parser.add_argument("--only", type=int, help="run this stage only (after the environment)")
    parser.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="override a budget")
    parser.add_argument("--rehearse", action="store_true", help="CPU: run the stages that have a CPU form")
    parser.add_argument("--record", action="store_true", help="append the stages run to the record")
    parser.add_argument("--record-file", type=Path, default=RECORD, help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="print the stages and where the next run starts")
    parser.add_argument("--kit", type=Path, help="also check that this GPU kit's files are under their limits")
    args = parser.parse_args(argv)
    args.budget = budgets(args.budget)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or REPO / "runs" / "gpu_checklist" / stamp
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list:
        return list_stages(args.record_file)
    if args.action == "record":
        if args.results is None or not (args.results / "stages.json").exists():
            print("error: record needs a results folder holding stages.json (the checklist's --out)", file=sys.stderr)
            return 2
        return record(args.results / "stages.json", args.record_file)
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            print("error: the GPU checklist needs a CUDA GPU visible to this Python (--rehearse runs its CPU forms)",
                  file=sys.stderr)  # fmt: skip
            return 2
    results = run_checklist(args)
    write_results(results, args.out, args.rehearse)
    problems = check_result_folder(args.out) + kit_problems(args.kit)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if args.record:
        record(args.out / "stages.json", args.record_file)
    print(f"results: {args.out} (checklist.md)")
    bad = [r for r in results if r.status not in ("passed", "rehearsed", "no CPU form", "not started")]
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
