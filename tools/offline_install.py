#!/usr/bin/env python3
"""Install an offline bundle made by ``tools/offline_bundle.py`` on a host without package access.

    launch/install_offline.sh dist/offline                # into the Python environment that runs it
    launch/install_offline.sh dist/offline --target DIR   # into DIR (then PYTHONPATH=DIR)

Steps: read ``manifest.json``; if the bundle came in parts, check that every part is there with its sha256 and
join them back into wheels; check every wheel's sha256; keep what the environment already has at a version that
every bundled package accepts (torch, numpy, pillow, ...); install the rest with ``pip --no-index --no-deps``;
import the project's runtime packages to prove it worked. A missing or corrupt part or wheel, a bundle made for
another Python, or a host without PyTorch is one line on stderr and exit status 2.

Standard library only (plus the ``packaging`` that every pip carries): it runs on a bare PyTorch image.
The bundle format is written down in docs/offline_install.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

MANIFEST = "manifest.json"
FORMAT = 1
WHEELS = "wheels"
PART_PREFIX = "bundle.tar.part"
# What the host's PyTorch image provides and the bundle never carries.
HOST_STACK = ("torch", "torchvision", "torchaudio", "triton")
# Imported after the install to prove it worked (module names).
SMOKE_IMPORTS = ("conv2former", "deepspeed", "webdataset", "nvidia.dali", "timm")


class BundleError(Exception):
    """A problem with the bundle or the host, said in one line."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: pass the folder that 'make offline-bundle' wrote (dist/offline)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is not readable JSON ({err}): copy the bundle again")
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{path} has bundle format {manifest.get('format')!r}; this installer reads format "
            f"{FORMAT}: use the installer from the checkout that made the bundle"
        )
    return manifest


class _Joined:
    """The parts read back to back as one stream (for ``tarfile`` in stream mode)."""

    def __init__(self, paths: list[Path]):
        self._paths, self._file = list(paths), None

    def read(self, size: int = -1) -> bytes:
        while self._paths or self._file:
            if self._file is None:
                self._file = open(self._paths.pop(0), "rb")
            chunk = self._file.read(size)
            if chunk or size == 0:
                return chunk
            self._file.close()
            self._file = None
        return b""


def check_parts(bundle: Path, parts: list[dict]) -> list[Path]:
    paths = []
    for part in parts:
        path = bundle / part["file"]
        if not path.is_file():
            raise BundleError(
                f"part {part['file']} is missing from {bundle} ({part['size']} bytes, "
                f"{len(parts)} parts in all): copy it there and run again"
            )
        if path.stat().st_size != part["size"] or sha256_file(path) != part["sha256"]:
            raise BundleError(
                f"part {part['file']} in {bundle} is corrupt (sha256 or size differs from "
                f"{MANIFEST}): copy it again and run again"
            )
        paths.append(path)
    return paths


def join_parts(bundle: Path, parts: list[dict], dest: Path) -> None:
    """Check every part, then unpack the joined tar of wheels into ``dest``."""
    paths = check_parts(bundle, parts)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_Joined(paths), mode="r|") as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if not member.isfile() or name != member.name or not name.endswith(".whl"):
                raise BundleError(
                    f"unexpected member {member.name!r} in the joined parts: not a bundle "
                    "made by tools/offline_bundle.py"
                )
            with tar.extractfile(member) as src, open(dest / name, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def wheel_folder(bundle: Path, manifest: dict) -> Path:
    """Where the wheels are: the bundle's wheels/ folder, or the parts joined into it."""
    folder = bundle / WHEELS
    if manifest.get("parts"):
        if not all((folder / w["file"]).is_file() for w in manifest["wheels"]):
            join_parts(bundle, manifest["parts"], folder)
    for wheel in manifest["wheels"]:
        path = folder / wheel["file"]
        if not path.is_file():
            raise BundleError(f"wheel {wheel['file']} is missing from {folder}: copy the bundle again")
        if sha256_file(path) != wheel["sha256"]:
            raise BundleError(f"wheel {path} is corrupt (sha256 differs from {MANIFEST}): copy the bundle again")
    return folder


def check_python(manifest: dict) -> None:
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python_version"] != here:
        raise BundleError(
            f"this bundle is for Python {manifest['python_version']} and {sys.executable} is "
            f"Python {here}: make one with 'make offline-bundle PYVER={here}' (or run the installer "
            f"with that Python: PYTHON=python{manifest['python_version']})"
        )


def installed_versions(target: Path | None) -> dict[str, Version]:
    """Distributions visible to this interpreter (and in ``target``), by canonical name."""
    paths = ([str(target)] if target else []) + sys.path
    found: dict[str, Version] = {}
    for dist in metadata.distributions(path=paths):
        name = dist.metadata.get("Name")
        if name and canonicalize_name(name) not in found:
            try:
                found[canonicalize_name(name)] = Version(dist.version)
            except ValueError:
                continue
    return found


def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = whl.read(meta).decode("utf-8", "replace")
    headers = text.split("\n\n", 1)[0].splitlines()
    return [h.split(":", 1)[1].strip() for h in headers if h.startswith("Requires-Dist:")]


@dataclass
class Plan:
    install: list[dict] = field(default_factory=list)
    kept: list[tuple[dict, Version]] = field(default_factory=list)
    replaced: list[tuple[dict, Version]] = field(default_factory=list)


def active(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def collect_specifiers(folder: Path, manifest: dict) -> dict[str, list[Requirement]]:
    """What every bundled wheel requires of each distribution, on this interpreter."""
    root_extras = {canonicalize_name(Requirement(r).name): set(Requirement(r).extras) for r in manifest["roots"]}
    wanted: dict[str, list[Requirement]] = {}
    for wheel in manifest["wheels"]:
        extras = root_extras.get(canonicalize_name(wheel["name"]), set())
        for line in wheel_requirements(folder / wheel["file"]):
            req = Requirement(line)
            if active(req, extras):
                wanted.setdefault(canonicalize_name(req.name), []).append(req)
    return wanted


def check_host_torch(have: dict[str, Version], wanted: dict[str, list[Requirement]]) -> None:
    torch = have.get("torch")
    if torch is None:
        raise BundleError(
            "no torch in this Python environment: the bundle leaves PyTorch to the host; "
            "install the PyTorch build for your CUDA first (or run with the image's python)"
        )
    for req in wanted.get("torch", []):
        if not req.specifier.contains(torch, prereleases=True):
            raise BundleError(
                f"this host has torch {torch} and the bundle needs torch{req.specifier} "
                f"({req}): use a PyTorch image inside that range"
            )


def plan_install(folder: Path, manifest: dict, have: dict[str, Version]) -> Plan:
    wanted = collect_specifiers(folder, manifest)
    check_host_torch(have, wanted)
    plan = Plan()
    for wheel in manifest["wheels"]:
        name = canonicalize_name(wheel["name"])
        present = have.get(name)
        bundled = Version(wheel["version"])
        fits = present is not None and all(
            r.specifier.contains(present, prereleases=True) for r in wanted.get(name, [])
        )
        if present is not None and (present == bundled or fits) and name not in manifest.get("always_install", []):
            plan.kept.append((wheel, present))
        else:
            plan.install.append(wheel)
            if present is not None:
                plan.replaced.append((wheel, present))
    return plan


def pip_install(folder: Path, wheels: list[dict], target: Path | None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--upgrade",
        "-q",
    ]
    if target:
        cmd += ["--target", str(target)]
    cmd += [str(folder / w["file"]) for w in wheels]
    if subprocess.run(cmd).returncode != 0:
        raise BundleError("pip could not install the bundle (its message is above)")


def smoke_test(target: Path | None, imports: tuple[str, ...] = SMOKE_IMPORTS) -> str:
    env = dict(os.environ)
    if target:
        env["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in [env.get("PYTHONPATH")] if p])
    code = (
        "import importlib, importlib.metadata as m\n"
        f"for mod in {tuple(imports)!r}: importlib.import_module(mod)\n"
        "names = ('torch', 'deepspeed', 'webdataset', 'timm', 'conv2former-pretrain')\n"
        "names += tuple(x.metadata['Name'] for x in m.distributions() if x.metadata['Name'].startswith('nvidia-dali'))\n"
        "def version(d):\n"
        "    try:\n"
        "        return m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        return None\n"
        "print(', '.join(f'{d} {version(d)}' for d in names if version(d)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.sep
    )  # not a checkout
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"installed, but importing the project failed: {last}")
    return done.stdout.strip().splitlines()[-1]  # the versions line (deepspeed may log before it)


def describe(plan: Plan, manifest: dict) -> str:
    size = sum(w["size"] for w in plan.install) / 2**20
    kept = ", ".join(f"{w['name']} {v}" for w, v in plan.kept) or "nothing"
    lines = [f"install {len(plan.install)} wheels ({size:.0f} MiB); keep from this environment: {kept}"]
    if plan.replaced:
        lines.append(
            "replace (the bundle needs another version): "
            + ", ".join(f"{w['name']} {v} -> {w['version']}" for w, v in plan.replaced)
        )
    lines.append("left to the host's PyTorch: " + ", ".join(manifest["host_provided"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install an offline bundle (see docs/offline_install.md).")
    parser.add_argument("bundle", type=Path, help="the folder made by 'make offline-bundle' (dist/offline)")
    parser.add_argument("--target", type=Path, help="install into this folder instead of the environment")
    parser.add_argument("--dry-run", action="store_true", help="check and plan, install nothing")
    args = parser.parse_args(argv)
    try:
        manifest = read_manifest(args.bundle)
        check_python(manifest)
        folder = wheel_folder(args.bundle, manifest)
        target = args.target.resolve() if args.target else None
        plan = plan_install(folder, manifest, installed_versions(target))
        print(describe(plan, manifest))
        if args.dry_run:
            return 0
        if plan.install:
            pip_install(folder, plan.install, target)
        print("import check: " + smoke_test(target, tuple(manifest.get("smoke_imports", SMOKE_IMPORTS))))
        if target:
            print(f"done: put it on the path with  export PYTHONPATH={target}:$PYTHONPATH")
        return 0
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
