"""Shared by the benchmarks: the machine's name, the versions in use, and writing rows into docs/performance.md.

Each benchmark owns one table in docs/performance.md, found by the heading that names the script
(e.g. ``## Model training throughput (`benchmarks/model_speed.py`)``). ``record`` inserts the new rows after the
last row of that table, each ending with the command that produced it, so the document stays in sections.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List

REPO = Path(__file__).resolve().parent.parent
PERFORMANCE_MD = REPO / "docs" / "performance.md"

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


def record(script: str, rows: Iterable[str], path: Path = PERFORMANCE_MD) -> None:
    """Insert ``rows`` ('| a | b |' strings without the command cell) into the table of ``script``'s section."""
    rows = [row.rstrip().rstrip("|").rstrip() + f" | `{command_line()}` |" for row in rows]
    lines = path.read_text().splitlines()
    marker = f"`benchmarks/{script}`"
    heading = next((i for i, line in enumerate(lines) if line.startswith("#") and marker in line), None)
    if heading is None:
        raise SystemExit(f"error: {path} has no section heading naming {marker}; add one with a table header")
    last_row = None
    for i in range(heading + 1, len(lines)):
        if lines[i].startswith("#"):
            break
        if lines[i].startswith("|"):
            last_row = i
        elif last_row is not None and lines[i].strip() == "":
            break
    if last_row is None:
        raise SystemExit(f"error: the section naming {marker} in {path} has no table header to add rows to")
    new: List[str] = lines[: last_row + 1] + rows + lines[last_row + 1 :]
    path.write_text("\n".join(new) + "\n")
    print(f"recorded {len(rows)} row(s) in {os.path.relpath(path)}")
