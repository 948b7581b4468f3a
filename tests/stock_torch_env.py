"""A fresh virtual environment that looks like a stock PyTorch image: it sees torch (with everything torch needs),
torchvision, numpy and pillow, linked file by file from the environment running the tests, and nothing else."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

STOCK = ("torch", "torchvision", "numpy", "pillow")


def closure(names) -> set[str]:
    """The distributions ``names`` need here, extras followed (torch asks for ``cuda-toolkit[cufile,...]``)."""
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = sorted(req.extras) or [""]
        if all((name, e) in seen for e in extras):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.update((name, e) for e in extras)
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return {name for name, _ in seen}


def link_distribution(name: str, host: Path) -> None:
    dist = metadata.distribution(name)
    base = Path(dist.locate_file(""))
    for rel in dist.files or []:
        if rel.parts[0] == ".." or "__pycache__" in rel.parts:
            continue  # scripts outside site-packages, byte code
        src, dest = base / rel, host / rel
        if src.exists() and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, dest)


def make_stock_env(root: Path) -> Path:
    """Create ``root/venv`` whose site-packages sees ``root/host`` (the stock packages); return its python."""
    host = root / "host"
    for name in sorted(closure(STOCK)):
        link_distribution(name, host)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "stock_pytorch_image.pth").write_text(f"{host}\n")
    return python
