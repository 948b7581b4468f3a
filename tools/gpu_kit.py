#!/usr/bin/env python3
"""The GPU kit: the smallest set of files a GPU reservation's host needs to run the checklist, cut to its limits.

    make gpu-kit                                   # dist/gpu-kit for Python 3.12, CUDA 13 (the lent GPU hosts)
    python tools/gpu_kit.py build --out dist/gpu-kit [--python-version 3.12] [--cuda 13] [--no-dali-part]
    python tools/gpu_kit.py check dist/gpu-kit     # every file under its limit (the checklist's rehearsal runs it)
    launch/install_gpu_kit.sh dist/gpu-kit         # on the host: install what is there, say what is missing

A reservation carries at most 64 MiB per command (the working tree included), so the kit has two parts:

* ``core/`` (at most 16 MiB, one command with the checklist's stages 1-4): an offline bundle (tools/offline_bundle.py)
  without DALI of what the host lacks: this project, DeepSpeed (built here, no ops), webdataset, pydantic, pytest,
  pytest-timeout, ...; what the host image already has (torch, triton, timm's dependencies, tensorboard, numpy, pillow,
  fsspec) is left out (``LEFT_OUT``), and so is scipy (only data_prep's devkit reader needs it);
* ``dali/`` (stage 5): DALI and its CUDA libraries (nvImageCodec, nvJPEG), the DALI wheel cut to the host's Python
  (its other Pythons' extension modules dropped), stored uncompressed inside one tar compressed with xz, cut into
  chunks of at most 62 MiB, each with its sha256 in ``dali/manifest.json``: carried by consecutive commands while the
  machine stays warm, installed once all are there.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_bundle  # noqa: E402
import offline_install  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
CORE_LIMIT = 16 * MiB
CHUNK_LIMIT = 62 * MiB
# Left out of the core part: what the GPU images carry beside torch (timm's own dependencies among them; timm itself
# is carried, the exact release tested), and scipy, which only data_prep's ImageNet devkit reader imports.
LEFT_OUT = ("tensorboard", "numpy", "pillow", "fsspec", "onnxruntime", "protobuf", "grpcio", "huggingface-hub",
            "safetensors", "pyyaml", "scipy")  # fmt: skip
# Left out of the DALI part: what the host has, and nvImageCodec's JPEG 2000, TIFF and nvCOMP back-ends (the
# shards hold JPEGs: nvImageCodec's nvJPEG back-end and DALI's own decoders are what the loaders use).
DALI_LEFT_OUT = ("numpy", "pyyaml", "packaging", "typing-extensions", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13",
                 "nvidia-libnvcomp-cu13", "nvidia-nvjpeg2k-cu12", "nvidia-nvtiff-cu12", "nvidia-libnvcomp-cu12")  # fmt: skip
DALI_MANIFEST = "manifest.json"
CHUNK_PREFIX = "dali.tar.xz.part"


def sha256(path: Path) -> str:
    return offline_install.sha256_file(path)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_core(args: argparse.Namespace, out: Path) -> None:
    argv = ["--cuda", args.cuda, "--python-version", args.python_version, "--extras", "", "--no-dali",
            "--leave-out", ",".join(LEFT_OUT), "--out", str(out)]  # fmt: skip
    if offline_bundle.main(argv) != 0:
        raise SystemExit("error: building the core kit failed (the reason is above)")


def cut_wheel(wheel: Path, dest: Path, python_version: str) -> Path:
    """``wheel`` rewritten into ``dest`` uncompressed (xz compresses the tar better) without the extension modules of
    the other Pythons (``*.cpython-3XY*.so`` for XY other than the host's), its RECORD rewritten to match."""
    keep_tag = f"cpython-{python_version.replace('.', '')}-"
    out = dest / wheel.name

    def other_python(name: str) -> bool:
        return re.search(r"\.cpython-3\d+t?-", name) is not None and keep_tag not in name

    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if other_python(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "".join(f"{line}\n" for line in lines if not other_python(line.split(",")[0])).encode()
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    return out


def build_dali(args: argparse.Namespace, out: Path) -> dict:
    """DALI's wheels (DALI cut to the host's Python) in one xz-compressed tar, cut into chunks of CHUNK_LIMIT."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        bundle, cut = Path(tmp) / "bundle", Path(tmp) / "cut"
        argv = ["--cuda", args.cuda, "--python-version", args.python_version, "--dali-only", "--out", str(bundle),
                "--leave-out", ",".join(DALI_LEFT_OUT)]  # fmt: skip
        if offline_bundle.main(argv) != 0:
            raise SystemExit("error: downloading DALI failed (the reason is above)")
        cut.mkdir()
        wheels = [cut_wheel(w, cut, args.python_version) for w in sorted((bundle / "wheels").glob("*.whl"))]
        return pack_chunks(wheels, out, {"python_version": args.python_version, "cuda": args.cuda})


def pack_chunks(
    wheels: List[Path], out: Path, about: dict, chunk_bytes: int = CHUNK_LIMIT, imports: tuple = ("nvidia.dali",)
) -> dict:
    """``wheels`` in one tar compressed with xz, cut into chunks of at most ``chunk_bytes`` in ``out``, and the
    manifest (each chunk's and the whole's sha256, the wheels, what the installer imports afterwards)."""
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        joined = Path(tmp) / "dali.tar.xz"
        with lzma.open(joined, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
            for wheel in wheels:
                tar.add(wheel, arcname=wheel.name)
        chunks = offline_bundle.cut_file(joined, out, CHUNK_PREFIX, chunk_bytes)
        manifest = {
            **about,
            "wheels": [{"file": w.name, "sha256": sha256(w), "size": w.stat().st_size} for w in wheels],
            "xz_sha256": sha256(joined),
            "chunks": chunks,
            "smoke_imports": list(imports),
        }
    (out / DALI_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.monotonic()
    build_core(args, out / "core")
    if not args.no_dali_part:
        build_dali(args, out / "dali")
    sizes = kit_sizes(out)
    sizes["build_seconds"] = round(time.monotonic() - start)
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    print(json.dumps(sizes))
    return check(out)


def kit_sizes(kit: Path) -> dict:
    sizes: dict = {"core_mib": round(folder_bytes(kit / "core") / MiB, 2)}
    if (kit / "dali").exists():
        sizes["dali_chunks_mib"] = [round(p.stat().st_size / MiB, 2) for p in sorted((kit / "dali").glob("*.part*"))]
    return sizes


def kit_problems(kit: Path) -> List[str]:
    """Each file or part of the kit over its limit, in one line each (empty when the kit fits)."""
    problems = []
    if not (kit / "core" / offline_install.MANIFEST).exists():
        return [f"{kit}/core holds no manifest.json: build the kit with make gpu-kit"]
    core = folder_bytes(kit / "core")
    if core > CORE_LIMIT:
        problems.append(f"{kit}/core is {core / MiB:.1f} MiB, over its {CORE_LIMIT // MiB} MiB")
    for chunk in sorted((kit / "dali").glob(f"{CHUNK_PREFIX}*")) if (kit / "dali").exists() else []:
        if chunk.stat().st_size > CHUNK_LIMIT:
            problems.append(f"{chunk} is {chunk.stat().st_size / MiB:.1f} MiB, over {CHUNK_LIMIT // MiB} MiB")
    return problems


def check(kit: Path) -> int:
    problems = kit_problems(kit)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not problems:
        print(f"{kit}: every file under its limit ({json.dumps(kit_sizes(kit))})")
    return 1 if problems else 0


def missing_chunks(dali: Path, manifest: dict) -> List[str]:
    bad = []
    for chunk in manifest["chunks"]:
        path = dali / chunk["file"]
        if not path.exists():
            bad.append(f"{chunk['file']} (missing)")
        elif path.stat().st_size != chunk["size"] or sha256(path) != chunk["sha256"]:
            bad.append(f"{chunk['file']} (corrupt: its sha256 differs)")
    return bad


def install_dali(dali: Path, target: Optional[Path]) -> int:
    manifest = json.loads((dali / DALI_MANIFEST).read_text())
    bad = missing_chunks(dali, manifest)
    if bad:
        print(f"error: dali: {len(bad)} of {len(manifest['chunks'])} chunks not usable: {', '.join(bad)}; carry "
              "them into dist/gpu-kit/dali and run the installer again (the core part is installed)", file=sys.stderr)  # fmt: skip
        return 3
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        joined = Path(tmp) / "dali.tar.xz"
        with open(joined, "wb") as out:
            for chunk in manifest["chunks"]:
                out.write((dali / chunk["file"]).read_bytes())
        if sha256(joined) != manifest["xz_sha256"]:
            print(
                "error: dali: the joined chunks' sha256 differs from the manifest's: rebuild the kit", file=sys.stderr
            )
            return 2
        with lzma.open(joined) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            tar.extractall(tmp, filter="data")
        wheels = [str(Path(tmp) / w["file"]) for w in manifest["wheels"]]
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wheels]
        if target:
            cmd += ["--target", str(target), "--upgrade"]
        if subprocess.run(cmd).returncode != 0:
            print("error: pip could not install DALI's wheels (its message is above)", file=sys.stderr)
            return 2
    try:
        versions = offline_install.smoke_test(target, tuple(manifest.get("smoke_imports", ["nvidia.dali"])))
    except offline_install.BundleError as err:
        print(f"error: dali: {err}", file=sys.stderr)
        return 2
    print("import check: " + versions)
    return 0


def install(kit: Path, target: Optional[Path], dali_only: bool) -> int:
    if not dali_only:
        argv = [str(kit / "core"), *(["--target", str(target)] if target else [])]
        status = offline_install.main(argv)
        if status != 0:
            return status
    if not (kit / "dali" / DALI_MANIFEST).exists():
        print("dali: not in this kit (stage 5 of the checklist needs it)")
        return 0
    return install_dali(kit / "dali", target)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["build", "check", "install"])
    parser.add_argument("kit", nargs="?", type=Path, default=REPO / "dist" / "gpu-kit", help="the kit's folder")
    parser.add_argument("--out", type=Path, help="build: the kit's folder (replaced)")
    parser.add_argument("--python-version", default="3.12", help="build: the GPU host's Python")
    parser.add_argument("--cuda", choices=["12", "13"], default="13", help="build: DALI for CUDA 12 or 13")
    parser.add_argument("--no-dali-part", action="store_true", help="build: the core part only")
    parser.add_argument("--target", type=Path, help="install: into this folder (then put it on PYTHONPATH)")
    parser.add_argument("--dali-only", action="store_true", help="install: the DALI part only (the core is in)")
    args = parser.parse_args(argv)
    if args.action == "build":
        args.out = args.out or args.kit
        return build(args)
    if args.action == "check":
        return check(args.kit)
    return install(args.kit, args.target, args.dali_only)


if __name__ == "__main__":
    sys.exit(main())
