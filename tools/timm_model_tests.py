#!/usr/bin/env python3
"""timm's own model tests (``tests/test_models.py`` of a timm source release) run against our variants.

    python tools/timm_model_tests.py                      # the timm constraints.txt pins; the small variants
    python tools/timm_model_tests.py --variants all       # every variant (Conv2Former-L and -B take minutes)
    python tools/timm_model_tests.py --timm latest        # the newest timm on PyPI (make test-timm-latest)
    python tools/timm_model_tests.py -- -x -v             # anything after -- goes to pytest
    OMP_NUM_THREADS=1 python tools/timm_model_tests.py --parts 2   # two pytest processes side by side

The test file is timm's, unchanged, never copied into this repository: the sdist is fetched from PyPI once into
``.timm-tests/`` (beside ``.venv``, ignored by git), checked against its sha256 (PyPI's digest; for the pinned release
also the one recorded here, ``SDIST_SHA256``), and its ``tests/`` and ``pyproject.toml`` (the markers) are extracted.
A release other than the installed one is installed with ``pip --target`` into the cache and put first on the path.
``import conv2former`` registers the variants (``pytest -p conv2former``) before timm's file lists its models.

Exit status: pytest's (0: every selected test passed); 3 when the sdist cannot be fetched (one line, the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_install import sha256_file as sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".timm-tests"
SMALL = ("conv2former_demo", "conv2former_n", "conv2former_t", "conv2former_is")  # conv2former_is* (both stems)
# sha256 of timm's sdist per release, checked here once and recorded (PyPI's digest is checked as well).
SDIST_SHA256 = {"1.0.31": "baa0b333339c46d3d6d4965d99b69f5053afed71210e8f433d7ea5ee6a18f0ec"}
PYPI = "https://pypi.org/pypi/timm/{}/json"


class FetchError(Exception):
    """The sdist could not be fetched or verified (said in one line)."""


def pinned_version() -> str:
    found = re.search(r"^timm==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    if not found:
        raise SystemExit("error: constraints.txt pins no timm release (a line timm==X.Y.Z)")
    return found.group(1)


def pypi(url: str, accept: str = "application/json") -> dict:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            data: dict = json.load(answer)
    except OSError as err:
        raise FetchError(f"cannot reach PyPI ({url}): {err}") from None
    return data


def latest_version() -> str:
    return str(pypi("https://pypi.org/pypi/timm/json")["info"]["version"])


def sdist_file(version: str) -> dict:
    """The sdist of ``version`` from PyPI's simple index (PEP 691 JSON: file name, url, sha256), as pip sees it."""
    index = pypi("https://pypi.org/simple/timm/", "application/vnd.pypi.simple.v1+json")
    found = next((f for f in index["files"] if f["filename"] == f"timm-{version}.tar.gz"), None)
    if found is None:
        raise FetchError(f"timm {version} has no source release on PyPI")
    return found


def fetch_tests(version: str) -> Path:
    """The extracted release folder (tests/, pyproject.toml) of timm ``version``, fetched and verified once."""
    folder = CACHE / f"timm-{version}"
    if (folder / "tests" / "test_models.py").exists():
        return folder
    CACHE.mkdir(exist_ok=True)
    sdist = sdist_file(version)
    wanted = {sdist["hashes"]["sha256"], SDIST_SHA256.get(version, sdist["hashes"]["sha256"])}
    if len(wanted) != 1:
        raise FetchError(f"PyPI's sha256 of timm {version}'s sdist differs from the one recorded in this tool")
    archive = CACHE / sdist["filename"]
    if not archive.exists() or sha256(archive) not in wanted:
        try:
            urllib.request.urlretrieve(sdist["url"], archive)
        except OSError as err:
            raise FetchError(f"cannot download {sdist['url']}: {err}") from None
    if sha256(archive) not in wanted:
        archive.unlink()
        raise FetchError(f"{sdist['filename']}: its sha256 is not {wanted.pop()}; removed, try again")
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith((f"{prefix}/tests/", f"{prefix}/pyproject.toml"))]
        tar.extractall(CACHE, members=members, filter="data")
    return CACHE / prefix


def installed_timm() -> str:
    import importlib.metadata

    return importlib.metadata.version("timm")


def timm_site(version: str) -> Optional[Path]:
    """None when ``version`` is the installed timm; else a ``pip --target`` folder holding that release."""
    if version == installed_timm():
        return None
    site = CACHE / f"site-{version}"
    if not (site / "timm").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), f"timm=={version}"]
        if subprocess.run(cmd).returncode != 0:
            raise FetchError(f"pip could not install timm {version} into {site}")
    return site


def run(version: str, variants: str, junit: Optional[Path], extra: List[str], parts: int = 1) -> int:
    """timm's test file on the variants, in ``parts`` pytest processes side by side (each a share of the variants);
    pytest's exit status (the first part's that failed)."""
    folder = fetch_tests(version)
    site = timm_site(version)
    names = SMALL if variants == "small" else ("conv2former",)
    groups = [names[k :: min(parts, len(names))] for k in range(min(parts, len(names)))]
    paths = [str(p) for p in (site, REPO) if p is not None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])]))
    print(f"timm {version}'s tests/test_models.py on {', '.join(names)} ({folder})", flush=True)
    procs = []
    for k, group in enumerate(groups):
        cmd = [sys.executable, "-m", "pytest", "-p", "conv2former", "-p", "no:cacheprovider", "-q",
               "tests/test_models.py", "-k", " or ".join(group)]  # fmt: skip
        if junit is not None:
            cmd += [f"--junitxml={part_file(junit, k, len(groups))}"]
        output = subprocess.PIPE if len(groups) > 1 else None  # (the parts' outputs one after the other)
        procs.append(subprocess.Popen([*cmd, *extra], cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    codes = []
    for proc in procs:
        out, _ = proc.communicate()
        print(out or "", end="", flush=True)
        codes.append(proc.returncode)
    if junit is not None and len(groups) > 1:
        merge_junit([part_file(junit, k, len(groups)) for k in range(len(groups))], junit)
    return next((code for code in codes if code != 0), 0)


def part_file(junit: Path, part: int, parts: int) -> Path:
    return junit if parts == 1 else junit.with_name(f"{junit.stem}.part{part}{junit.suffix}")


def merge_junit(files: List[Path], junit: Path) -> None:
    """The parts' JUnit reports as one: every part's <testsuite> under one <testsuites>."""
    import xml.etree.ElementTree as ET

    merged = ET.Element("testsuites")
    for path in files:
        root = ET.parse(path).getroot()
        merged.extend(root.iter("testsuite"))
        path.unlink()
    ET.ElementTree(merged).write(junit, encoding="utf-8", xml_declaration=True)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timm", default="pinned", help="pinned (constraints.txt), latest (PyPI), or a version")
    parser.add_argument("--variants", choices=["small", "all"], default="small")
    parser.add_argument("--junitxml", type=Path, help="pytest's JUnit XML report here")
    parser.add_argument("--parts", type=int, default=1, help="pytest processes side by side, each a share of the "
                        "small variants (one OpenMP thread each is fastest on 2 cores: OMP_NUM_THREADS=1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.parts < 1:
        parser.error(f"--parts must be at least 1, got {args.parts}")
    try:
        version = {"pinned": pinned_version, "latest": latest_version}.get(args.timm, lambda: args.timm)()
        return run(version, args.variants, args.junitxml, extra, args.parts)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
