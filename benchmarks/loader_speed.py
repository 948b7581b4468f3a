"""Images/s of our loaders next to the torchvision ImageFolder + PIL DataLoader most users run today.

    python benchmarks/loader_speed.py --backend {dali-gpu,dali-cpu,torch,imagefolder,all} [--data DIR]
        [--mode {train,eval}] [--image-size 224] [--batch 64] [--workers 2] [--seconds 20] [--json] [--record]

``--data`` is a shard root for our backends and a class-folder tree for ``imagefolder``. Without it, a set of
ImageNet-sized JPEGs (500x375, ~85 KB) is generated once under data/bench/ as both a tree and shards, so every
backend reads the same images. ``--backend all`` runs each available backend on that data and reports the ratio to
``imagefolder``. Same threads/workers for all; train uses the training transform (RandAugment included), eval the
eval transform.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import torch

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)
from results import machine, machine_info, record, versions  # noqa: E402  (benchmarks/results.py)

BENCH_DIR = Path(os.environ.get("C2F_BENCH_DIR", REPO / "data" / "bench"))  # generated benchmark data


def prepare(images: int) -> Path:
    """data/bench/tree (ImageFolder layout) and data/bench/shards, made once per --images."""
    from shard_speed import make_tree  # benchmarks/ is on the path: these scripts run as benchmarks/NAME.py

    tree, shards, count = BENCH_DIR / "tree", BENCH_DIR / "shards", BENCH_DIR / "images.txt"
    if count.exists() and count.read_text().strip() != str(images):  # made for another --images: make it again
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    if not (shards / "_info.json").exists():
        if not (tree / "train").exists():
            make_tree(tree, images)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "data_prep" / "shard.py"),
                "imagenet1k",
                str(tree),
                str(shards),
                "--classes",
                "present",
                "--shard-size",
                "32MB",
                "--quiet",
                "--check",
                "header",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        count.write_text(f"{images}\n")
    return BENCH_DIR


def measure(loader, seconds: float, warmup: int = 3) -> Dict[str, float]:
    """Overall images/s; images/s within an epoch (the first batch of each epoch left out); mean seconds to an
    epoch's first batch (pipeline or worker start, shuffle-buffer fill), which a run pays once per epoch."""

    def batches():
        while True:
            for i, batch in enumerate(loader):
                yield i == 0, batch

    it = batches()
    for _ in range(warmup):
        next(it)
    count = within_count = 0
    within_s, firsts = 0.0, []
    start = last = time.perf_counter()
    while last - start < seconds:
        first, (images, _) = next(it)
        if images.is_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        count += images.shape[0]
        if first:
            firsts.append(now - last)
        else:
            within_count += images.shape[0]
            within_s += now - last
        last = now
    return {
        "images_per_s": count / (last - start),
        "within_epoch_images_per_s": within_count / within_s,
        "epoch_start_s": sum(firsts) / len(firsts) if firsts else float("nan"),
    }


def build(backend: str, data: Path, args: argparse.Namespace):
    if backend == "imagefolder":
        from torchvision.datasets import ImageFolder

        from conv2former.config import DataConfig
        from conv2former.data.torch_loader import timm_transform

        cfg = DataConfig(image_size=args.image_size)
        dataset = ImageFolder(str(data / "train"), transform=timm_transform(cfg, args.mode == "train"))
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch,
            shuffle=args.mode == "train",
            num_workers=args.workers,
            drop_last=True,
            persistent_workers=True,
        )
    from conv2former.config import DataConfig
    from conv2former.data.loader import build_loader

    cfg = DataConfig(
        root=str(data), backend=backend, image_size=args.image_size, batch_size=args.batch, workers=args.workers
    )
    return build_loader(cfg, "train", train=args.mode == "train")


def in_subprocess(backend: str, data: Path, args: argparse.Namespace) -> Dict[str, float]:
    command = [sys.executable, __file__, "--backend", backend, "--data", str(data), "--json"]
    for flag in ("mode", "image_size", "batch", "workers", "seconds"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    line = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: line[k] for k in ("images_per_s", "within_epoch_images_per_s", "epoch_start_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="all", choices=["dali-gpu", "dali-cpu", "torch", "imagefolder", "all"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--mode", default="train", choices=["train", "eval"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--images", type=int, default=2000, help="images to generate when --data is not given")
    parser.add_argument("--json", action="store_true", help="print one JSON line per backend")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/results/")
    args = parser.parse_args()
    generated = prepare(args.images) if args.data is None else None
    backends = (
        [args.backend]
        if args.backend != "all"
        else (["dali-gpu"] if torch.cuda.is_available() else []) + ["dali-cpu", "torch", "imagefolder"]
    )
    results: Dict[str, Dict[str, float]] = {}
    for backend in backends:
        data = args.data or (generated / ("tree" if backend == "imagefolder" else "shards"))
        # each backend in a fresh process when several are measured: none pays for another's threads, workers or
        # heap (a torch backend after dali-cpu in one process ran ~5% slower)
        r = (
            measure(build(backend, data, args), args.seconds)
            if len(backends) == 1
            else in_subprocess(backend, data, args)
        )
        results[backend] = r
        if args.json:
            print(
                json.dumps(
                    {
                        "backend": backend,
                        "machine": machine_info(),
                        "mode": args.mode,
                        **{k: round(v, 3) for k, v in r.items()},
                        "image_size": args.image_size,
                        "batch": args.batch,
                        "workers": args.workers,
                    }
                )
            )
        else:
            print(
                f"{backend:>12} {args.mode}: {r['images_per_s']:.1f} images/s, {r['within_epoch_images_per_s']:.1f} "
                f"within an epoch, {r['epoch_start_s']:.2f} s to an epoch's first batch"
            )
    base = results.get("imagefolder")

    def ratio(r: Dict[str, float], key: str) -> str:
        return f"{r[key] / base[key]:.2f}×" if base else "—"

    if args.record:
        rows = [
            f"| {datetime.date.today()} | {machine()} | {backend} | {args.mode} | {args.image_size} | {args.batch} | "
            f"{args.workers} | {r['images_per_s']:.0f} | {ratio(r, 'images_per_s')} | "
            f"{r['within_epoch_images_per_s']:.0f} | {ratio(r, 'within_epoch_images_per_s')} | "
            f"{r['epoch_start_s']:.2f} | {versions('dali', 'torch', 'pillow')} |"
            for backend, r in results.items()
        ]
        record("loader_speed.py", rows)


if __name__ == "__main__":
    main()
