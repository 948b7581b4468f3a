"""Images/s of data_prep/shard.py on ImageNet-sized JPEGs, next to ``tar cf`` of the same files (the I/O bound).

    python benchmarks/shard_speed.py [--images 1000] [--workers N] [--record]

Generates an ImageNet-1k-style tree of 500x375 JPEGs (~110 KB each) in a temporary folder on the same disk as
the outputs, then times, each in a fresh output: ``tar cf``; shard.py with ``--check header`` (no decode, no
re-encode); shard.py with the default ``--check decode``; and shard.py re-encoding everything (``--max-side 256``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
from results import machine, record, versions  # noqa: E402  (benchmarks/results.py)

from conv2former.engine.distributed import python_path  # noqa: E402

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668"]


def imagenet_like_jpeg(rng: np.random.Generator) -> bytes:
    """A 500x375 photo-like JPEG of ~110 KB: smooth structure plus fine texture."""
    coarse = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-20, 21, size=img.shape)
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_tree(root: Path, images: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        synset = SYNSETS[i % len(SYNSETS)]
        folder = root / "train" / synset
        folder.mkdir(parents=True, exist_ok=True)
        data = imagenet_like_jpeg(rng)
        (folder / f"{synset}_{i}.JPEG").write_bytes(data)
        total += len(data)
    return total


def timed(cmd, **kwargs) -> Tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, **kwargs).stdout
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/results/")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shard-bench-", dir=REPO / "data" if (REPO / "data").is_dir() else None))
    try:
        src = work / "src"
        size = make_tree(src, args.images)
        print(f"{args.images} JPEGs, {size / args.images / 1e3:.0f} KB each on average, {size / 1e6:.0f} MB")
        subprocess.run(["sync"], check=False)
        tar_s, _ = timed(["tar", "cf", str(work / "all.tar"), "-C", str(src), "train"])
        shard = [sys.executable, str(REPO / "data_prep" / "shard.py"), "imagenet1k", str(src)]
        common = ["--workers", str(args.workers), "--quiet", "--shard-size", "16MB"]
        runs = {
            "shard.py --check header (no decode, no re-encode)": ["--check", "header"],
            "shard.py (default: decode every image, no re-encode)": [],
            "shard.py --max-side 256 (re-encode every image)": ["--max-side", "256"],
        }
        rows = [("tar cf", tar_s, None)]
        for i, (name, extra) in enumerate(runs.items()):
            seconds, out = timed(
                shard + [str(work / f"out{i}")] + common + extra,
                env=dict(os.environ, PYTHONPATH=python_path(str(REPO))),
            )
            match = re.search(r"\(([0-9.]+) img/s\)", out)
            rows.append((name, seconds, float(match.group(1)) if match else None))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = []
    for name, seconds, steady in rows:
        steady_text = f"{steady:.0f}" if steady else "—"
        line = (
            f"| {datetime.date.today()} | {machine()} | {name} | {args.images} | {args.workers} | {seconds:.2f} | "
            f"{args.images / seconds:.0f} | {steady_text} | {seconds / tar_s:.2f}× | {versions('pillow', 'webdataset')} |"
        )
        print(line)
        lines.append(line)
    if args.record:
        record("shard_speed.py", lines)


if __name__ == "__main__":
    main()
