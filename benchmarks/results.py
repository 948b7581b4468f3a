"""Shared by the benchmarks: the machine's name, the versions in use, and recording result rows.

Each benchmark owns one data file, ``benchmarks/results/<script>.jsonl``: one JSON object per measured row, with the
columns of the script's table (date, machine, ..., versions) and the command that produced it. ``record`` appends to
it and never edits prose; docs/performance.md quotes the current numbers and links the files for the history.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

PACKAGES = {
    "torch": "torch",
    "timm": "timm",
    "deepspeed": "deepspeed",
    "webdataset": "webdataset",
    "dali": "nvidia-dali-cuda120",
    "pillow": "pillow",
}


def machine_info(threads: int | None = None) -> Dict[str, Any]:
    """What a benchmark row must say about where it ran: the GPU, or the processor (model, family/model numbers as
    the kernel reports them, cores, the widest vector ISA it has: AVX2 / AVX-512 / AMX), the CPU capability torch
    dispatches to, and the thread count. A CPU result holds for its processor only (docs/performance.md)."""
    import torch

    info: Dict[str, Any] = {"arch": platform.machine(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    isa = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    if isa in ("AMX", "AVX-512") and "avx512_bf16" in flags:
        isa += " + BF16"
    info.update(
        cpu=fields.get("model name", platform.processor() or "unknown CPU"),
        cpu_family=fields.get("cpu family"),
        cpu_model=fields.get("model"),
        isa=isa,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=threads if threads is not None else torch.get_num_threads(),
    )
    limits = {name: os.environ[name] for name in DISPATCH_LIMITS if os.environ.get(name)}
    if limits:  # benchmarks/avx2.sh: this processor's libraries held to a narrower ISA
        info["dispatch_limits"] = limits
    return info


DISPATCH_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""The environment variables that hold torch's kernels, oneDNN and MKL to a narrower vector ISA than the processor's."""


def machine(threads: int | None = None) -> str:
    """The machine column of a row: the GPU's name, or e.g. 'AMD EPYC (family 26 model 2), 2 cores, AVX-512 + BF16,
    torch AVX512, 2 threads'."""
    info = machine_info(threads)
    if "gpu" in info:
        return info["gpu"]
    numbers = f" (family {info['cpu_family']} model {info['cpu_model']})" if info["cpu_family"] else ""
    limits = info.get("dispatch_limits")
    held = ""
    if limits:
        how = "benchmarks/avx2.sh" if len(limits) == len(DISPATCH_LIMITS) else " ".join(limits)
        held = f" held to {'/'.join(sorted(set(v.upper() for v in limits.values())))} ({how})"
    return (
        f"{info['cpu']}{numbers}, {info['cores']} cores, {info['isa']}{held}, torch {info['torch_cpu_capability']}, "
        f"{info['threads']} threads"
    )


def versions(*names: str) -> str:
    """'torch 2.14.1, timm 1.0.31' for the named packages (keys of PACKAGES) that are installed."""
    parts = []
    for name in names:
        dist = PACKAGES.get(name, name)
        candidates = [dist, "nvidia-dali-cuda130"] if name == "dali" else [dist]
        for candidate in candidates:
            try:
                parts.append(f"{name} {metadata.version(candidate).split('+')[0]}")
                break
            except metadata.PackageNotFoundError:
                continue
    return ", ".join(parts)


def command_line() -> str:
    """How this benchmark was started, as a user would type it from the repository root."""
    script = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", script] + [shlex.quote(a) for a in sys.argv[1:]])


def results_file(script: str, folder: Path = RESULTS) -> Path:
    """``benchmarks/results/<script without its suffix>.jsonl``."""
    return folder / f"{script.rsplit('.', 1)[0]}.jsonl"


def read_results(script: str, folder: Path = RESULTS) -> List[Dict[str, str]]:
    path = results_file(script, folder)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(script: str, rows: Iterable[str], folder: Path = RESULTS, columns: List[str] | None = None) -> None:
    """Append ``rows`` ('| a | b |' strings, the cells of the script's table without the command) to the script's
    results file as JSON objects, each with the command that produced it. The column names are ``columns``, or those
    of the file's newest row; a row with another number of cells is refused (the table changed: pass ``columns``)."""
    previous = read_results(script, folder)
    if columns is None:
        if not previous:
            raise SystemExit(f"error: {results_file(script, folder)} is empty: give the column names (columns=...)")
        columns = [key for key in previous[-1] if key not in ("section", "command")]
    section = previous[-1].get("section") if previous else None
    records = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip().strip("|").split(" | ")]
        if len(cells) != len(columns):
            raise SystemExit(f"error: a row of {len(cells)} cells for the {len(columns)} columns {columns}: {row}")
        records.append({**({"section": section} if section else {}), **dict(zip(columns, cells)),
                        "command": f"`{command_line()}`"})  # fmt: skip
    path = results_file(script, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for item in records:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"recorded {len(records)} row(s) in {os.path.relpath(path)}")
