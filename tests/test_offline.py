"""The offline bundle (tools/offline_bundle.py) and its installer (launch/install_offline.sh).

Fast tests build small bundles of real wheel files and run the real installer on them; the slow test bundles
this project for this machine's Python from PyPI, installs it from the parts into a fresh virtual environment
that looks like a stock PyTorch image (pip --no-index), and runs the dali-cpu loader tests there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from stock_torch_env import make_stock_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import offline_bundle  # noqa: E402
import offline_install  # noqa: E402
from offline_install import Version  # noqa: E402

INSTALL = REPO / "launch" / "install_offline.sh"
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"


def fake_wheel(folder: Path, name: str, version: str, requires=(), filler: int = 0) -> Path:
    """A real, installable pure-Python wheel with one module and the given Requires-Dist lines."""
    dist = f"{name}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] + [f"Requires-Dist: {r}\n" for r in requires]
    )
    record = f"{name}/__init__.py,,\n{dist}.dist-info/METADATA,,\n{dist}.dist-info/WHEEL,,\n{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\nFILLER = {os.urandom(filler).hex()!r}\n")
        whl.writestr(f"{dist}.dist-info/METADATA", meta)
        whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def small_bundle(out: Path, part_mib: float = 0, python_version: str = PYVER) -> dict:
    """A bundle of three fake wheels written by the bundler's own manifest/parts code."""
    wheels = out / offline_install.WHEELS
    wheels.mkdir(parents=True)
    fake_wheel(wheels, "alpha_pkg", "1.0", ["beta-pkg>=2", "torch>=2.0"], filler=300_000)
    fake_wheel(wheels, "beta_pkg", "2.5", filler=300_000)
    fake_wheel(wheels, "gamma_pkg", "0.3", ["alpha-pkg==1.0", "beta-pkg<3"])
    args = argparse.Namespace(
        python_version=python_version, platform=["any"], cuda="13", host_torch="2.11.0", part_mib=part_mib
    )
    return offline_bundle.write_manifest(args, out, wheels, ["gamma-pkg"], ["torch"])


def install(bundle: Path, *extra: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=str(python), PIP_CONFIG_FILE=os.devnull)
    return subprocess.run(["bash", str(INSTALL), str(bundle), *extra], capture_output=True, text=True, env=env)


def test_parts_join_back_into_the_same_wheels(tmp_path):
    manifest = small_bundle(tmp_path / "b", part_mib=0.25)
    assert len(manifest["parts"]) >= 3 and all(p["size"] <= 0.25 * 2**20 for p in manifest["parts"])
    assert not (tmp_path / "b" / "wheels").exists()
    folder = offline_install.wheel_folder(tmp_path / "b", offline_install.read_manifest(tmp_path / "b"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(w["file"] for w in manifest["wheels"])
    for wheel in manifest["wheels"]:
        assert offline_install.sha256_file(folder / wheel["file"]) == wheel["sha256"]


def test_missing_or_corrupt_part_is_one_line_naming_it(tmp_path):
    small_bundle(tmp_path / "b", part_mib=0.25)
    (tmp_path / "b" / "bundle.tar.part001").unlink()
    done = install(tmp_path / "b", "--dry-run")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "part bundle.tar.part001 is missing" in done.stderr and "Traceback" not in done.stderr

    small_bundle(tmp_path / "c", part_mib=0.25)
    part = tmp_path / "c" / "bundle.tar.part002"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    done = install(tmp_path / "c", "--dry-run")
    assert done.returncode == 2 and "part bundle.tar.part002" in done.stderr and "corrupt" in done.stderr


def test_corrupt_wheel_wrong_python_and_no_bundle_are_one_line(tmp_path):
    small_bundle(tmp_path / "b")
    wheel = next((tmp_path / "b" / "wheels").glob("beta*"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    done = install(tmp_path / "b", "--dry-run")
    assert done.returncode == 2 and f"wheel {wheel} is corrupt" in done.stderr

    small_bundle(tmp_path / "c", python_version="3.99")
    done = install(tmp_path / "c", "--dry-run")
    assert done.returncode == 2 and "this bundle is for Python 3.99" in done.stderr
    assert f"PYVER={PYVER}" in done.stderr

    done = install(tmp_path / "nothing")
    assert done.returncode == 2 and "manifest.json not found" in done.stderr
    assert done.stderr.count("\n") == 1


def test_plan_keeps_what_fits_and_replaces_what_does_not(tmp_path):
    small_bundle(tmp_path / "b")
    manifest = offline_install.read_manifest(tmp_path / "b")
    folder = offline_install.wheel_folder(tmp_path / "b", manifest)
    have = {"torch": Version("2.11.0"), "beta-pkg": Version("2.1"), "alpha-pkg": Version("0.9")}
    plan = offline_install.plan_install(folder, manifest, have)
    assert [w["name"] for w, _ in plan.kept] == ["beta_pkg"]  # 2.1 satisfies >=2 and <3
    assert sorted(w["name"] for w in plan.install) == ["alpha_pkg", "gamma_pkg"]
    assert [(w["name"], str(v)) for w, v in plan.replaced] == [("alpha_pkg", "0.9")]  # gamma needs ==1.0

    have["beta-pkg"] = Version("3.0")  # gamma needs <3: the bundled 2.5 goes in
    plan = offline_install.plan_install(folder, manifest, have)
    assert "beta_pkg" in [w["name"] for w in plan.install]

    with pytest.raises(offline_install.BundleError, match="no torch in this Python environment"):
        offline_install.plan_install(folder, manifest, {})
    with pytest.raises(offline_install.BundleError, match=r"has torch 1.13.0 and the bundle needs torch>=2.0"):
        offline_install.plan_install(folder, manifest, {"torch": Version("1.13.0")})


def test_target_install_of_a_small_bundle(tmp_path):
    """The real installer's pip step, --no-index into --target, from parts: every wheel imports."""
    small_bundle(tmp_path / "b", part_mib=0.25)
    manifest = offline_install.read_manifest(tmp_path / "b")
    folder = offline_install.wheel_folder(tmp_path / "b", manifest)
    plan = offline_install.plan_install(folder, manifest, offline_install.installed_versions(None))
    offline_install.pip_install(folder, plan.install, tmp_path / "site")
    code = "import alpha_pkg, beta_pkg, gamma_pkg; print(alpha_pkg.VERSION, beta_pkg.VERSION, gamma_pkg.VERSION)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["1.0", "2.5", "0.3"]


def test_bundler_marker_walk_leaves_the_torch_stack_to_the_host():
    items = [
        {"metadata": {"name": n, "version": "1", "requires_dist": r}}
        for n, r in [
            ("app", ["lib>=1", "torch", "winonly; sys_platform == 'win32'", "extra-dep; extra == 'x'"]),
            ("lib", ["numpy"]),
            ("numpy", []),
            ("torch", ["sympy", "numpy"]),
            ("sympy", ["mpmath"]),
            ("mpmath", []),
            ("winonly", []),
            ("extra-dep", []),
        ]
    ]

    env = offline_bundle.target_environment(
        argparse.Namespace(python_version="3.12", platform=["manylinux_2_28_x86_64"])
    )
    assert env["platform_machine"] == "x86_64" and env["python_version"] == "3.12"
    assert offline_bundle.reachable(items, ["app"], env) == {"app", "lib", "numpy"}
    assert offline_bundle.reachable(items, ["app[x]"], env) == {"app", "lib", "numpy", "extra-dep"}
    assert offline_bundle.platforms("2.28", "x86_64")[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert "manylinux_2_18_x86_64" in offline_bundle.platforms("2.28", "x86_64")  # nccl ships only this tag


@pytest.mark.slow
def test_bundle_from_parts_into_a_fresh_stock_pytorch_env_runs_the_dali_cpu_loader(tmp_path):
    """PyPI -> bundle in parts -> fresh venv with only torch/torchvision/numpy/pillow -> pip --no-index -> tests."""
    bundle = tmp_path / "bundle"
    made = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "offline_bundle.py"),
            "--cuda",
            "12",
            "--python-version",
            PYVER,
            "--part-mib",
            "50",
            "--out",
            str(bundle),
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = {w["name"].replace("_", "-").lower() for w in manifest["wheels"]}
    assert {"deepspeed", "webdataset", "nvidia-dali-cuda120", "conv2former-pretrain", "timm"} <= names
    assert not names & {"torch", "torchvision", "triton", "sympy"}  # the host's PyTorch stack stays out
    assert len(manifest["parts"]) > 1 and all(p["size"] <= 50 * 2**20 for p in manifest["parts"])

    python = make_stock_env(tmp_path / "stock")
    done = install(bundle, python=str(python))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keep from this environment:" in done.stdout and "numpy" in done.stdout.split("keep from")[1]
    assert "import check: torch" in done.stdout and "deepspeed" in done.stdout

    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH="")
    env.pop("PYTEST_ADDOPTS", None)  # the outer session's options (e.g. its --basetemp, which the inner one would wipe)
    tests = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "inner-pytest"),
            "tests/test_loader.py",
            "-k",
            "dali-cpu and (shapes or resume or two_ranks)",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
