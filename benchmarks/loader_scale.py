"""What a rank pays to start an epoch of a full-size split: opening it, and building its loader, before any decode.

    python benchmarks/loader_scale.py [--shards 1400] [--per-shard 10000] [--world 8] [--backends torch dali-cpu]
                                      [--root DIR] [--record]

Generates a split of the real shape (the parts that do not decode: a ``_info.json``, one DALI index per shard with
ImageNet-sized members, and sparse tars whose first and last sample carry real tar headers, which is what opening a
split reads), then, in a fresh process per backend, times for rank 0 of ``--world``: ``open_split`` (manifest, every
shard checked against its index) and the epoch start (torch: this rank's sample list in epoch order; DALI: the
reader pipeline's build, which reads the index files it is given). Host memory is the growth of the process's RSS
over its imports; every rank of a node pays the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)
from results import machine, record, versions  # noqa: E402  (benchmarks/results.py)

COMPONENTS = (("jpg", 110_000), ("cls", 5), ("json", 90), ("lbl", 8))


def rss_mb() -> float:
    """The current resident set size (not the high-water mark)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def make_split(root: Path, shards: int, per_shard: int) -> None:
    """``root``/_info.json and train/train-NNNNNN.{tar,idx}: indexes of ``per_shard`` samples, sparse tars."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines, offset = [f"v1.2 {per_shard}"], 0
        first = last = None
        for i in range(per_shard):
            key, parts = f"s{s:06d}_{i:06d}", []
            for ext, size in COMPONENTS:
                parts.append(f"{ext} {offset + 512} {size} {key}.{ext}")
                if ext == "jpg":
                    first = first or (offset, key)
                    last = (offset, key)
                offset += 512 + -(-size // 512) * 512
            lines.append(" ".join(parts))
        name = f"train-{s:06d}"
        (root / "train" / f"{name}.idx").write_text("\n".join(lines) + "\n")
        with open(root / "train" / f"{name}.tar", "wb") as f:
            f.truncate(offset + 1024)
            for at, key in (first, last):
                f.seek(at)
                f.write(_header(f"{key}.jpg", COMPONENTS[0][1]))
    info = {
        "name": "generated",
        "num_classes": 21841,
        "splits": {
            "train": {
                "name": "train",
                "num_samples": shards * per_shard,
                "filenames": [f"train/train-{s:06d}.tar" for s in range(shards)],
                "shard_lengths": [per_shard] * shards,
            }
        },
    }
    (root / "_info.json").write_text(json.dumps(info))


def child(root: str, backend: str, world: int, cache: str) -> Dict[str, float]:
    import torch

    from conv2former.config import DataConfig
    from conv2former.data.loader import build_loader

    base = rss_mb()
    cfg = DataConfig(root=root, backend=backend, batch_size=128, workers=2, cache_dir=cache)
    start = time.perf_counter()
    loader = build_loader(cfg, "train", rank=0, world_size=world, device=torch.device("cpu"))  # opens the split
    row = {"open_s": time.perf_counter() - start, "open_mb": rss_mb() - base}
    start = time.perf_counter()
    if backend == "torch":
        refs = loader.epoch_refs()  # held, as the epoch's dataset holds it
        row["rank_samples"] = len(refs)
    else:
        loader._build()  # the reader pipeline of this rank's epoch, as the first batch builds it
    row["start_s"] = time.perf_counter() - start
    row["rank_mb"] = rss_mb() - base
    row["peak_mb"], row["imports_mb"] = peak_rss_mb(), base
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1400)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--world", type=int, default=8, help="ranks the split is dealt to (rank 0 is measured)")
    parser.add_argument("--backends", nargs="+", default=["torch", "dali-cpu"])
    parser.add_argument("--root", help="where to generate the split (default: a temporary folder, removed after)")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, backend, world, cache = args.child
        print(json.dumps(child(root, backend, int(world), cache)))
        return
    with tempfile.TemporaryDirectory(prefix="c2f-split-", dir=args.root) as tmp:
        root = Path(tmp) / "split"
        start = time.perf_counter()
        make_split(root, args.shards, args.per_shard)
        index_mb = sum(p.stat().st_size for p in (root / "train").glob("*.idx")) / 1e6
        print(
            f"generated {args.shards:,} shards x {args.per_shard:,} samples in {time.perf_counter() - start:.0f} s; "
            f"index files {index_mb:,.0f} MB"
        )
        rows: List[str] = []
        for backend in args.backends:
            cache = Path(tmp) / f"cache-{backend}"
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(root), backend, str(args.world), str(cache)],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cache_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6 if cache.exists() else 0.0
            print(
                f"{backend}: open_split {r['open_s']:.1f} s (+{r['open_mb']:,.0f} MB), epoch start of rank 0 of "
                f"{args.world} {r['start_s']:.1f} s; rank memory +{r['rank_mb']:,.0f} MB over imports "
                f"({r['imports_mb']:,.0f} MB), peak {r['peak_mb']:,.0f} MB; cache {cache_mb:,.0f} MB"
            )
            rows.append(
                f"| {datetime.date.today().isoformat()} | {machine()} | {backend} | {args.shards:,} x "
                f"{args.per_shard:,} | {args.world} | {r['open_s']:.1f} | {r['start_s']:.1f} | {r['rank_mb']:,.0f} | "
                f"{r['peak_mb']:,.0f} | {index_mb:,.0f} | {cache_mb:,.0f} | {versions('torch', 'dali')} |"
            )
    if args.record:
        record("loader_scale.py", rows)


if __name__ == "__main__":
    main()
