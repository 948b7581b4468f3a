"""Stage 1 of the GPU checklist: what this host has, as one JSON file and a few lines.

    python benchmarks/gpu_environment.py --out RESULTS/environment.json [--rehearse]

Versions (Python, torch + its CUDA and cuDNN, triton, timm, deepspeed, webdataset, DALI, pytest, pytest-timeout), the
GPU (name, compute capability, free and total memory), whether the environment's site-packages is writable (the kit
installs there), and whether NPP and nvJPEG are present (DALI's GPU decoding needs nvJPEG; its resize, NPP).
Exit status 1 when something the next stages need is missing (a CUDA GPU; deepspeed, webdataset, pytest,
pytest-timeout), each named in one line with the fix; DALI missing only skips the DALI stage. ``--rehearse`` (CPU):
no GPU is expected, the report is written all the same.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, List, Optional

NEEDED = ("deepspeed", "webdataset", "pytest", "pytest_timeout")  # stages 2-4; DALI: stage 5
OPTIONAL = ("nvidia.dali", "timm", "triton")
FIX = "install the GPU kit first: launch/install_gpu_kit.sh dist/gpu-kit (docs/performance.md)"


def version_of(module: str) -> Optional[str]:
    try:
        found = importlib.import_module(module)
    except Exception:  # any import failure means "not usable here", whatever its kind
        return None
    return str(getattr(found, "__version__", "present"))


def libraries(*names: str) -> Dict[str, List[str]]:
    """Where each shared library (by name prefix) is found: pip's nvidia-* packages, then the linker's cache."""
    roots = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))}
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    found: Dict[str, List[str]] = {}
    for name in names:
        hits = [
            p for root in roots for p in glob.glob(os.path.join(root, "nvidia", "**", f"{name}*.so*"), recursive=True)
        ]
        hits += [line.split("=>")[-1].strip() for line in cache.splitlines() if f"{name}" in line.split("=>")[0]]
        found[name] = sorted(set(hits))[:3]
    return found


def gpu_report() -> Dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    free, total = torch.cuda.mem_get_info()
    major, minor = torch.cuda.get_device_capability()
    return {
        "available": True,
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "capability": f"{major}.{minor}",
        "free_gib": round(free / 2**30, 1),
        "total_gib": round(total / 2**30, 1),
    }


def report() -> Dict[str, Any]:
    import torch

    site = sysconfig.get_paths()["purelib"]
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "versions": {m: version_of(m) for m in (*NEEDED, *OPTIONAL)},
        "gpu": gpu_report(),
        "site_packages": site,
        "site_packages_writable": os.access(site, os.W_OK),
        "libraries": libraries("libnvjpeg", "libnppc", "libnppig"),
    }


def problems(found: Dict[str, Any], rehearse: bool) -> List[str]:
    lines = [f"{m} is not importable: {FIX}" for m in NEEDED if found["versions"][m] is None]
    if not found["gpu"]["available"] and not rehearse:
        lines.append("no CUDA GPU is visible to this Python: run the checklist on the GPU host (--rehearse on CPU)")
    if not found["site_packages_writable"] and not rehearse:
        lines.append(f"{found['site_packages']} is not writable: install the kit with --target and PYTHONPATH")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    parser.add_argument("--rehearse", action="store_true", help="CPU: no GPU expected")
    args = parser.parse_args()
    found = report()
    found["problems"] = problems(found, args.rehearse)
    if args.out:
        args.out.write_text(json.dumps(found, indent=1) + "\n")
    gpu = found["gpu"]
    where = f"{gpu['name']} ({gpu['free_gib']} of {gpu['total_gib']} GiB free)" if gpu["available"] else "no GPU"
    print(f"python {found['python']}, torch {found['torch']} (CUDA {found['cuda']}, cuDNN {found['cudnn']}), {where}")
    print("versions: " + ", ".join(f"{m} {v or 'MISSING'}" for m, v in found["versions"].items()))
    print("nvJPEG/NPP: " + ", ".join(f"{n} {'found' if p else 'MISSING'}" for n, p in found["libraries"].items()))
    for line in found["problems"]:
        print(f"error: {line}", file=sys.stderr)
    return 1 if found["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
