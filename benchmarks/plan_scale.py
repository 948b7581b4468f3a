"""What data_prep/shard.py costs before the first image is written, from 10k to ImageNet-22k's 14.2M samples.

    python benchmarks/plan_scale.py [--sizes 10000 100000 1000000 14200000] [--record]

Each size runs in a fresh process on a generated listing of the real shape (the seam: names, sizes and offsets of
ImageNet-22k's synset tars, about 650 images per class over up to 21,841 classes, no image bytes), through the
same functions shard.py runs: the held-out draw (``--val-per-class 50``; its image checks answer "valid" here, their
I/O cost is per image and stated in docs/data.md), the plan (class filter, global shuffle, the cut into ~1 GB
shards, the digest, ``_plan.json``), and the resume check of a second run over every shard's commit record in
``_progress/`` (the shards are sparse files of the recorded size). Peak RSS is the process's high-water mark. The
listing itself reads every tar header; its rate is measured separately on a local synset tar (page cache warm).
"""

from __future__ import annotations

import argparse
import datetime
import io
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

CLASSES_22K = 21841
PER_CLASS = 650  # 14.2M / 21,841


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generated_listing(samples: int):
    """The listing list_22k makes for the synset-tars layout (an ItemTable filled one synset tar at a time), with
    realistic class sizes and file sizes."""
    import numpy as np

    from data_prep.items import ItemTable
    from data_prep.sources import Listing, SourceItem

    rng = np.random.default_rng(0)
    classes = max(1, min(CLASSES_22K, round(samples / PER_CLASS)))
    weights = rng.uniform(0.05, 1.95, classes)  # class sizes from ~30 to ~1,270 at full scale
    counts = np.floor(weights / weights.sum() * samples).astype(int)
    counts[: samples - counts.sum()] += 1
    sizes = rng.lognormal(np.log(100_000), 0.5, samples).astype(int) + 1000
    table, n = ItemTable(), 0
    for c in range(classes):
        synset = f"n{10_000_000 + c * 137:08d}"
        path, offset, items = f"/data/fall11_whole/{synset}.tar", 512, []
        for i in range(counts[c]):
            size = int(sizes[n])
            items.append(SourceItem(f"{synset}_{i}", synset, path, offset, size, f"{synset}.tar:{synset}_{i}.JPEG"))
            offset += 512 + -(-size // 512) * 512
            n += 1
        table.add(items, synset, path, f"{synset}.tar:")
    return [f"n{10_000_000 + c * 137:08d}" for c in range(classes)], Listing(table.ordered(), [])


def fake_commits(out: Path, plan_summary: Dict[str, object]) -> None:
    """A committed shard for every planned one: a sparse tar of the planned size, its index header, its record."""
    (out / "_progress").mkdir(parents=True, exist_ok=True)
    for split, count in plan_summary["shards"].items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            name = f"{split}-{index:06d}"
            with open(out / split / f"{name}.tar", "wb") as f:
                f.truncate(1_000_000_000)
            (out / split / f"{name}.idx").write_text("v1.2 650\n")
            record = {"num_samples": 650, "num_bytes": 1_000_000_000, "skipped": [], "reencoded": 0, "images_in": 650}
            (out / "_progress" / f"{name}.json").write_text(json.dumps(record))


def child(samples: int) -> Dict[str, float]:
    """One size, in this process: the phases' seconds and the peak RSS after each."""
    import data_prep.build as build
    from data_prep.holdout import split_holdout
    from data_prep.sources import Listing

    base = peak_rss_mb()
    start = time.perf_counter()
    classes, listing = generated_listing(samples)
    row = {"samples": samples, "classes": len(classes), "generate_s": time.perf_counter() - start}
    row["rss_listing_mb"] = peak_rss_mb()

    start = time.perf_counter()
    train, val, rejected = split_holdout(listing.items, 50, 0, lambda batch: {it.name: None for it in batch})
    row["holdout_s"], row["rss_holdout_mb"] = time.perf_counter() - start, peak_rss_mb()
    del listing
    splits = {"train": Listing(train, rejected), "val": Listing(val, [])}
    source = {"dataset": "imagenet22k", "src": "/data/fall11_whole", "layout": "synset-tars", "val_per_class": 50}
    with tempfile.TemporaryDirectory(prefix="c2f-plan-") as tmp:
        out = Path(tmp) / "out"
        options = build.BuildOptions(seed=0, workers=1, quiet=True)
        start = time.perf_counter()
        plan = build.build_shards(str(out), "imagenet-22k", classes, splits, source, build.BuildOptions(plan_only=True))
        row["plan_s"], row["rss_plan_mb"] = time.perf_counter() - start, peak_rss_mb()
        row["shards"] = sum(plan["shards"].values())
        fake_commits(out, plan)
        planned, _ = build._plan_splits(splits, {s: i for i, s in enumerate(classes)}, options)
        plan_json = {"digest": build._digest(planned)}
        (out / build.PLAN_FILE).write_text(json.dumps(plan_json))
        start = time.perf_counter()
        kept, pending = build._pending_shards(build.fsspec.filesystem("file"), str(out), planned, True)
        row["resume_check_s"] = time.perf_counter() - start
        assert len(kept) == row["shards"] and not pending, (len(kept), len(pending))
    row["rss_peak_mb"], row["rss_imports_mb"] = peak_rss_mb(), base
    return row


def listing_rate(members: int = 20000) -> float:
    """Members per second that the synset-tars listing reads from a local tar and keeps (headers only, page cache
    warm)."""
    import fsspec

    from data_prep.items import ItemTable
    from data_prep.sources import _items_from_tar

    with tempfile.TemporaryDirectory(prefix="c2f-list-") as tmp:
        path = os.path.join(tmp, "n01440764.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(members):
                info = tarfile.TarInfo(f"n01440764_{i}.JPEG")
                info.size = 700
                tar.addfile(info, io.BytesIO(b"x" * 700))
        fs = fsspec.filesystem("file")
        _items_from_tar(fs, path, "n01440764", "n01440764.tar")  # warm
        start = time.perf_counter()
        listed = _items_from_tar(fs, path, "n01440764", "n01440764.tar")
        table = ItemTable()
        table.add(listed.items, "n01440764", path, "n01440764.tar:")  # as list_22k keeps them
        assert len(table) == members
        return members / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 14_200_000])
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rate = listing_rate()
    print(f"listing: {rate:,.0f} tar members/s from a local synset tar (14.2M members: {14.2e6 / rate:.0f} s)")
    rows: List[str] = []
    today, where = datetime.date.today().isoformat(), machine()
    for samples in args.sizes:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(samples)], check=True, stdout=subprocess.PIPE, text=True
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        total = r["holdout_s"] + r["plan_s"]
        print(
            f"{samples:>11,} samples, {r['classes']:>6,} classes, {r['shards']:>5,} shards: held-out draw "
            f"{r['holdout_s']:.1f} s, plan {r['plan_s']:.1f} s (total {total:.1f} s), resume check "
            f"{r['resume_check_s']:.2f} s; peak RSS {r['rss_peak_mb']:,.0f} MB (listing alone {r['rss_listing_mb']:,.0f} MB)"
        )
        rows.append(
            f"| {today} | {where} | {samples:,} | {r['classes']:,} | {r['shards']:,} | {r['holdout_s']:.1f} | "
            f"{r['plan_s']:.1f} | {r['resume_check_s']:.2f} | {r['rss_listing_mb']:,.0f} | {r['rss_peak_mb']:,.0f} | "
            f"{rate:,.0f} | {versions('pillow', 'webdataset')} |"
        )
    if args.record:
        record("plan_scale.py", rows)


if __name__ == "__main__":
    main()
