#!/usr/bin/env python3
"""Make an offline bundle: every wheel a stock PyTorch GPU image lacks to run this project, for a GPU host
without package access.

    make offline-bundle                                   # CUDA 13, Python 3.12, x86_64 with glibc >= 2.28
    python tools/offline_bundle.py --cuda 12 --python-version 3.11 --part-mib 60 --out dist/offline

What it does, on a machine that reaches PyPI:
1. builds two wheels here: this project's, and DeepSpeed's (PyPI has only its source; built with DS_BUILD_OPS=0,
   a pure-Python wheel whose ops compile on first use, so one wheel serves every accelerator);
2. asks pip to resolve the project's dependencies plus ``nvidia-dali-cuda{120,130}``, pytest and the host's
   ``torch==--host-torch`` for the target Python and platform (``pip install --dry-run --report``), pinned by
   constraints.txt where it pins;
3. keeps what is reachable from the roots without passing through the host's PyTorch stack (torch, torchvision,
   triton and what only they need: the CUDA libraries, sympy, ...) and downloads those wheels;
4. writes ``manifest.json`` (name, version, sha256, size of every wheel; the parts with their sha256) and, with
   ``--part-mib N``, joins the wheels into one tar cut into parts of at most N MiB.
``launch/install_offline.sh`` installs it. The format is in docs/offline_install.md.
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
import tarfile
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_install import (  # noqa: E402
    FORMAT,
    HOST_STACK,
    MANIFEST,
    PART_PREFIX,
    SMOKE_IMPORTS,
    WHEELS,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[1]
PROJECT = "conv2former-pretrain"
TEST_TOOLS = ["pytest", "pytest-timeout"]


class BundleBuildError(Exception):
    """Said in one line."""


def run(cmd: list[str], what: str, env: dict | None = None) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BundleBuildError(f"{what} failed:\n{tail}\ncommand: {' '.join(cmd)}")


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonicalize_name(name)] = version.strip()
    return found


def pip_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check"]


def platforms(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a host with this glibc accepts, most specific first (pip matches tags exactly)."""
    minor = int(glibc.split(".")[1])
    return [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)] + [
        f"manylinux2014_{arch}",
        f"manylinux_2_5_{arch}",
        f"manylinux1_{arch}",
    ]


def target_flags(args) -> list[str]:
    flags = ["--python-version", args.python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in args.platform:
        flags += ["--platform", platform]
    return flags


def build_local_wheels(dest: Path, deepspeed_version: str) -> None:
    """This project's wheel and DeepSpeed's (pure Python, no precompiled ops)."""
    shutil.rmtree(REPO / "build", ignore_errors=True)  # stale files there would end up in the wheel
    run(pip_cmd("wheel", "--no-deps", "-q", "-w", str(dest), str(REPO)), "building this project's wheel")
    env = dict(os.environ, DS_BUILD_OPS="0")
    run(
        pip_cmd("wheel", "--no-deps", "-q", "-w", str(dest), f"deepspeed=={deepspeed_version}"),
        f"building the deepspeed {deepspeed_version} wheel",
        env=env,
    )
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' leftovers from the project wheel


def roots(args, pinned: dict[str, str], local: Path) -> list[str]:
    dali = [f"nvidia-dali-cuda{args.cuda}0=={pinned['nvidia-dali-cuda120']}"]
    if args.dali_only:
        return dali
    version = wheel_name_version(next(local.glob("conv2former_pretrain-*.whl")))[1]
    extras = f"[{','.join(args.extras)}]" if args.extras else ""
    found = [f"{PROJECT}{extras}=={version}", *([] if args.no_dali else dali)]
    if not args.no_tests:
        found += [f"{t}=={pinned[t]}" if t in pinned else t for t in TEST_TOOLS]
    return found


def resolve(args, roots_: list[str], local: Path, work: Path, pinned: dict[str, str]) -> list[dict]:
    """pip's resolution for the target (metadata, nothing installed): the report's install items."""
    skip = {"torch", "torchvision", "nvidia-dali-cuda120", "nvidia-dali-cuda130"}
    constraints = work / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pinned.items() if n not in skip))
    report = work / "report.json"
    cmd = pip_cmd(
        "install",
        "--dry-run",
        "--ignore-installed",
        "-q",
        "--report",
        str(report),
        "--target",
        str(work / "unused"),
        "--find-links",
        str(local),
        "-c",
        str(constraints),
        *target_flags(args),
        *roots_,
        f"torch=={args.host_torch}",
    )
    run(cmd, f"resolving the dependencies for Python {args.python_version} on {args.platform[0]}")
    return json.loads(report.read_text())["install"]


def target_environment(args) -> dict[str, str]:
    env = default_environment()
    machine = re.sub(r"^(manylinux|musllinux)[_0-9]*_", "", args.platform[0])
    env.update(
        python_version=args.python_version,
        python_full_version=f"{args.python_version}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        platform_machine=machine,
    )
    return env


def reachable(items: list[dict], roots_: list[str], env: dict[str, str], host_has: tuple[str, ...] = ()) -> set[str]:
    """Names reachable from the roots without passing through the host's PyTorch stack (or ``host_has``)."""
    by_name = {canonicalize_name(i["metadata"]["name"]): i for i in items}
    todo = [Requirement(r) for r in roots_]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in HOST_STACK or name in host_has or name not in by_name:
            continue
        extras = set(req.extras)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in by_name[name]["metadata"].get("requires_dist", []):
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate(dict(env, extra=e)) for e in (extras or {""})):
                todo.append(dep)
    return {k.split("[")[0] for k in seen}


def download(args, items: list[dict], dest: Path) -> None:
    specs = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items]
    if specs:
        run(
            pip_cmd("download", "--no-deps", "-q", "-d", str(dest), *target_flags(args), *specs),
            "downloading the wheels",
        )


def write_parts(wheels: list[Path], out: Path, part_bytes: int) -> list[dict]:
    """One uncompressed tar of the wheels, cut into parts of at most ``part_bytes``."""
    joined = out / "bundle.tar"
    with tarfile.open(joined, "w", format=tarfile.GNU_FORMAT) as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    parts = cut_file(joined, out, PART_PREFIX, part_bytes)
    joined.unlink()
    return parts


def cut_file(joined: Path, out: Path, prefix: str, part_bytes: int) -> list[dict]:
    """``joined`` cut into ``out/<prefix>000``, ``001``, ... of at most ``part_bytes``: each part's file, size, sha256."""
    parts = []
    with open(joined, "rb") as src:
        for index in range(10**4):
            data = src.read(part_bytes)
            if not data:
                break
            path = out / f"{prefix}{index:03d}"
            path.write_bytes(data)
            parts.append({"file": path.name, "size": len(data), "sha256": sha256_file(path)})
    return parts


def build(args) -> dict:
    pinned = pins()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    wheels_dir = out / WHEELS
    wheels_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="offline-bundle-") as tmp:
        work = Path(tmp)
        local = work / "local"
        if not args.dali_only:  # DALI alone needs neither this project's wheel nor DeepSpeed's
            build_local_wheels(local, pinned["deepspeed"])
        roots_ = roots(args, pinned, local)
        items = resolve(args, roots_, local, work, pinned)
        keep = reachable(items, roots_, target_environment(args), tuple(args.leave_out))
        kept = [i for i in items if canonicalize_name(i["metadata"]["name"]) in keep]
        host = sorted(i["metadata"]["name"] for i in items if i not in kept)
        local_files = {canonicalize_name(p.name.split("-")[0]): p for p in local.glob("*.whl")}
        for item in kept:
            name = canonicalize_name(item["metadata"]["name"])
            if name in local_files:
                shutil.copy2(local_files[name], wheels_dir)
        download(args, [i for i in kept if canonicalize_name(i["metadata"]["name"]) not in local_files], wheels_dir)
    return write_manifest(args, out, wheels_dir, roots_, host)


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name, version


def write_manifest(args, out: Path, wheels_dir: Path, roots_: list[str], host: list[str]) -> dict:
    files = sorted(wheels_dir.glob("*.whl"))
    wheels = [
        {
            "file": p.name,
            "name": wheel_name_version(p)[0],
            "version": wheel_name_version(p)[1],
            "sha256": sha256_file(p),
            "size": p.stat().st_size,
        }
        for p in files
    ]
    parts = None
    if args.part_mib:
        parts = write_parts(files, out, int(args.part_mib * 2**20))
        shutil.rmtree(wheels_dir)
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python_version": args.python_version,
        "platforms": args.platform,
        "cuda": args.cuda,
        "host_torch": args.host_torch,
        "roots": roots_,
        # this project (its version string does not change with every commit), and the two libraries whose exact
        # release the bf16 path was tested with (a GPU image's older copy may satisfy the range and still differ)
        "always_install": [] if getattr(args, "dali_only", False) else [PROJECT, "deepspeed", "timm"],
        # what the installer imports to prove the install worked
        "smoke_imports": smoke_imports(args),
        "host_provided": host,
        "wheels": wheels,
        "parts": parts,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def smoke_imports(args) -> list[str]:
    if getattr(args, "dali_only", False):
        return ["nvidia.dali"]
    return [m for m in SMOKE_IMPORTS if not (m == "nvidia.dali" and getattr(args, "no_dali", False))]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", choices=["12", "13"], default="13", help="DALI build: nvidia-dali-cuda120/130")
    parser.add_argument("--python-version", default="3.12", help="the GPU host's Python, e.g. 3.12")
    parser.add_argument(
        "--glibc", default="2.28", help="the oldest glibc among the GPU hosts (ldd --version); picks the manylinux tags"
    )
    parser.add_argument("--arch", choices=["x86_64", "aarch64"], default="x86_64", help="the GPU hosts' CPU")
    parser.add_argument(
        "--platform",
        action="append",
        default=None,
        help="exact wheel platform tag(s) instead of --glibc/--arch, most specific first",
    )
    parser.add_argument(
        "--host-torch",
        default="2.11.0",
        help="the torch version the host image has; resolution checks every package against it",
    )
    parser.add_argument("--extras", default="s3", help="project extras to include, comma-separated ('' for none)")
    parser.add_argument("--no-tests", action="store_true", help="leave out pytest (needed to run tests/ there)")
    parser.add_argument("--no-dali", action="store_true", help="leave out DALI (and its CUDA libraries)")
    parser.add_argument("--dali-only", action="store_true", help="DALI and its CUDA libraries alone")
    parser.add_argument(
        "--leave-out",
        default="",
        help="comma-separated packages to leave out with what only they need (the host has them, or nothing run there "
        "needs them), e.g. tensorboard",
    )
    parser.add_argument("--part-mib", type=float, default=0, help="cut the bundle into parts of at most N MiB")
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "offline", help="output folder (replaced)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"2\.\d+", args.glibc) or int(args.glibc.split(".")[1]) < 17:
        parser.error(f"--glibc {args.glibc!r}: give the version ldd --version prints, 2.17 or newer (e.g. 2.35)")
    args.platform = args.platform or platforms(args.glibc, args.arch)
    args.extras = [e for e in args.extras.split(",") if e]
    args.leave_out = [canonicalize_name(p) for p in args.leave_out.split(",") if p]
    if args.no_dali and args.dali_only:
        parser.error("--no-dali and --dali-only exclude each other")
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12")
    if args.part_mib < 0 or 0 < args.part_mib < 1:
        parser.error("--part-mib must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = build(args)
    except BundleBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(w["size"] for w in manifest["wheels"]) / 2**20
    parts = f" in {len(manifest['parts'])} parts" if manifest["parts"] else ""
    print(
        f"{len(manifest['wheels'])} wheels, {size:.0f} MiB{parts}, for Python {args.python_version} "
        f"({args.platform[0]}), DALI for CUDA {args.cuda}, in {args.out}"
    )
    print("left to the host's PyTorch: " + ", ".join(manifest["host_provided"]))
    print(f"install there with: launch/install_offline.sh {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
