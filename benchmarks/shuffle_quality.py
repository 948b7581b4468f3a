"""How well the training order is shuffled at ImageNet-22k scale, next to a perfect shuffle.

    python benchmarks/shuffle_quality.py [--samples 14200000] [--classes 21841] [--shards 1400] [--world 8]
                                         [--batch 256] [--buffers 0 1024 4096 16384] [--record]

The order a rank trains in is made in three stages: shard.py shuffles the whole dataset once by seed and cuts it into
shards; every epoch deals the shards in a new seeded order and gives each rank a contiguous range of that sequence;
the rank then streams its range through a shuffle buffer of ``data.shuffle_buffer`` samples. This script runs those
stages with the project's own functions (``epoch_shard_order``, ``rank_range``, ``buffer_shuffle``) on labels only,
with ImageNet-22k's class layout (21,841 classes of very unequal size: generated, log-normal, 1 to ~3,000 images,
14.2M in all), and measures per batch of 256 on rank 0: the distinct classes, the most repeated class, and, between
epoch 0 and epoch 1, how many pairs of batch-mates meet again in one batch (a perfect shuffle: almost none).
"""

from __future__ import annotations

import argparse
import datetime
import random
import time
from typing import Dict, List

import numpy as np

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)
from results import machine, record  # noqa: E402  (benchmarks/results.py)


def class_layout(samples: int, classes: int, seed: int = 0) -> np.ndarray:
    """Every sample's label, in class order: log-normal class sizes (1 to ~3,000), ``samples`` in all."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(600), 0.8, classes), 1, 3000)
    sizes = np.maximum(1, np.floor(sizes / sizes.sum() * samples)).astype(np.int64)
    sizes[np.argsort(-sizes)[: samples - sizes.sum()]] += 1
    return np.repeat(np.arange(classes, dtype=np.int32), sizes)


def epoch_order(shard_labels: List[np.ndarray], epoch: int, world: int, buffer: int, seed: int = 0) -> List[np.ndarray]:
    """Every rank's sample ids (positions in the written dataset) of one epoch, as the loader deals them."""
    from conv2former.data.shards import epoch_shard_order, rank_range, sample_seed
    from conv2former.data.torch_loader import buffer_shuffle

    starts = np.cumsum([0] + [len(s) for s in shard_labels])
    order = epoch_shard_order(len(shard_labels), seed, epoch)
    ids = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order])
    ranks = []
    for rank in range(world):
        lo, hi = rank_range(len(ids), rank, world)
        part = ids[lo:hi]
        if buffer:
            part = np.asarray(buffer_shuffle(part.tolist(), buffer, random.Random(sample_seed(seed, epoch, rank))))
        ranks.append(part)
    return ranks


def batch_stats(labels: np.ndarray, batch: int) -> Dict[str, float]:
    """Distinct classes and the most repeated class per batch (mean, and the worst batch)."""
    usable = len(labels) // batch * batch
    batches = np.sort(labels[:usable].reshape(-1, batch), axis=1)
    new = np.ones_like(batches, dtype=bool)
    new[:, 1:] = batches[:, 1:] != batches[:, :-1]
    distinct = new.sum(axis=1)
    run_id = np.cumsum(new, axis=1)  # the longest run of one label in a sorted batch is its most repeated class
    repeat = np.array([np.bincount(r).max() for r in run_id])
    return {
        "distinct_mean": distinct.mean(),
        "distinct_min": distinct.min(),
        "repeat_mean": repeat.mean(),
        "repeat_max": repeat.max(),
    }


def met_again(first: List[np.ndarray], second: List[np.ndarray], batch: int, total: int) -> float:
    """Of the pairs of samples that share a batch on rank 0 in ``first``, the share that share one in ``second``."""
    batch_of = np.full(total, -1, dtype=np.int64)
    for rank, ids in enumerate(second):
        usable = len(ids) // batch * batch
        batch_of[ids[:usable]] = rank * 10**7 + np.arange(usable) // batch
    ids = first[0][: len(first[0]) // batch * batch].reshape(-1, batch)
    later = np.sort(batch_of[ids], axis=1)
    pairs = 0
    for row in later:
        _, counts = np.unique(row[row >= 0], return_counts=True)
        pairs += int((counts * (counts - 1) // 2).sum())
    return pairs / (ids.shape[0] * batch * (batch - 1) / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=14_200_000)
    parser.add_argument("--classes", type=int, default=21_841)
    parser.add_argument("--shards", type=int, default=1400)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--buffers", type=int, nargs="+", default=[0, 1024, 4096, 16384])
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    start = time.perf_counter()
    labels = class_layout(args.samples, args.classes)
    written = labels[np.random.default_rng(1).permutation(len(labels))]  # shard.py's global shuffle
    shard_labels = np.array_split(written, args.shards)
    rows: List[str] = []
    perfect = written[np.random.default_rng(2).permutation(len(written))]
    chance = (args.batch - 1) / (len(written) - 1)  # two independent perfect shuffles
    results = {"perfect shuffle": (batch_stats(perfect[: len(written) // args.world], args.batch), chance)}
    for buffer in args.buffers:
        first = epoch_order(shard_labels, 0, args.world, buffer)
        second = epoch_order(shard_labels, 1, args.world, buffer)
        stats = batch_stats(written[first[0]], args.batch)
        results[f"shards + buffer {buffer}"] = (stats, met_again(first, second, args.batch, len(written)))
    for name, (s, again) in results.items():
        print(
            f"{name:>24}: distinct classes per batch {s['distinct_mean']:.1f} (worst {s['distinct_min']}), most "
            f"repeated class {s['repeat_mean']:.2f} (worst {s['repeat_max']}); batch-mates meeting again next "
            f"epoch {100 * again:.3f}%"
        )
        rows.append(
            f"| {datetime.date.today().isoformat()} | {machine()} | {args.samples:,} / {args.classes:,} / "
            f"{args.shards:,} | {args.world} x {args.batch} | {name} | {s['distinct_mean']:.1f} | "
            f"{s['distinct_min']} | {s['repeat_mean']:.2f} | {s['repeat_max']} | {100 * again:.3f} |"
        )
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.record:
        record("shuffle_quality.py", rows)


if __name__ == "__main__":
    main()
