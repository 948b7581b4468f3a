"""The wheel (`pip install .`, and the one the offline bundle carries) is the library alone, and it works alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Import from the scratch folder only: drop the checkout and the editable install's finder from this interpreter.
CHECK = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != REPO and '__editable__' not in p]
import timm, torch, conv2former
from conv2former.config import DataConfig
from conv2former.data.loader import build_loader
from conv2former.engine import trainer
from conv2former.weights import load_checkpoint
assert conv2former.__file__.startswith(SITE), conv2former.__file__
model = timm.create_model('conv2former_demo', num_classes=3).eval()
print(tuple(model(torch.randn(1, 3, 64, 64)).shape))
for name in ('launch', 'pretrain', 'finetune', 'data_prep'):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(name + ' is importable: the wheel must not install it')
"""


def build_wheel(dest: Path) -> Path:
    """pip builds in the tree: setuptools' build/ would carry stale files into the wheel, so it goes first and after."""
    shutil.rmtree(REPO / "build", ignore_errors=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(REPO)],
            check=True,
            capture_output=True,
        )
    finally:
        shutil.rmtree(REPO / "build", ignore_errors=True)
    return next(dest.glob("conv2former_pretrain-*.whl"))


@pytest.mark.slow  # builds the wheel and installs it into a fresh environment
def test_wheel_holds_only_the_library_and_imports_without_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"conv2former", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = f"import os\nREPO = {str(REPO)!r}\nSITE = {str(site)!r}\n" + CHECK
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(site)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 3)"
