#!/usr/bin/env python
"""Fetching shards from a remote root: per-rank download rate and the epoch-start wait, cold and prefetched.

A moto S3 server on 127.0.0.1 holds a shard root (the demo "22k" shards unless ``--data``); one rank of ``--world``
opens the split, then runs epochs 0 and 1 of the DALI CPU loader as training would: the epoch-0 start waits for its
shards (cold cache), epoch 1's were fetched in the background during epoch 0. This measures the code's overhead on
loopback, not a real network. ``--project`` adds the 22k planning figures: bytes per rank per epoch on 64 nodes of 8
GPUs and the bandwidth per node below which the loader would wait at a given img/s per GPU.

    python benchmarks/remote_fetch.py [--data DIR] [--world 2] [--workers 8] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from conv2former.checkout import checkout_first

checkout_first(__file__)  # tests/moto_s3.py

from results import machine, record, versions  # noqa: E402

# planning figures for the projection (docs/design.md): ImageNet-22k re-encoded at max side 512
IMAGES_22K, BYTES_22K = 14_197_087, 1.4e12


def serve(root: str):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint, FSSPEC_S3_ENDPOINT_URL=endpoint)  # fmt: skip
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(root, "bench/root", recursive=True)
    return server


def measure(world: int, workers: int, rank: int) -> dict:
    from conv2former.config import DataConfig
    from conv2former.data.loader import build_loader

    cache = tempfile.mkdtemp(prefix="c2f-fetch-bench-")
    cfg = DataConfig(root="s3://bench/root", backend="dali-cpu", image_size=32, batch_size=16, workers=1,
                     shuffle_buffer=64, cache_dir=cache, fetch_workers=workers)  # fmt: skip
    start = time.perf_counter()
    loader = build_loader(cfg, "train", rank=rank, world_size=world)
    open_s = time.perf_counter() - start
    epoch0_bytes = sum(shard.size for shard, _, _ in loader._quiet_slices(0))
    waits = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        before = loader.shards.cache.stats.waited
        for _ in loader:
            pass
        waits.append(loader.shards.cache.stats.waited - before)
    stats = loader.fetch_stats()
    return {
        "open_s": open_s,
        "epoch0_wait_s": waits[0],
        "epoch1_wait_s": waits[1],
        **stats,
        "epoch0_bytes": epoch0_bytes,
        "mb_per_s": epoch0_bytes / 1e6 / max(waits[0], 1e-9),
    }  # cold, per rank


def projection(images_per_gpu: float) -> str:
    ranks = 64 * 8
    per_rank = BYTES_22K / ranks
    per_image = BYTES_22K / IMAGES_22K
    node_bw = 8 * images_per_gpu * per_image
    return (f"22k on 64 nodes x 8 GPUs: {per_rank / 1e9:.1f} GB per rank per epoch, {per_rank * 8 / 1e9:.0f} GB per "
            f"node; at {images_per_gpu:.0f} img/s per GPU the loader waits below {node_bw / 1e6:.0f} MB/s per node "
            f"({per_image / 1e3:.0f} KB per image)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/demo/in22k", help="a local shard root to serve (default: the demo's)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads per rank")
    parser.add_argument(
        "--images-per-gpu",
        type=float,
        default=1800.0,
        help="for the projection (docs/design.md: what the 90-epoch plan needs per GPU)",
    )
    parser.add_argument("--record", action="store_true", help="add the row to benchmarks/results/")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "_info.json")):
        raise SystemExit(f"error: {args.data} is not a shard root (make demo builds data/demo/in22k)")
    server = serve(args.data)
    try:
        result = measure(args.world, args.workers, args.rank)
    finally:
        server.stop()
    print(json.dumps(result, indent=1))
    line = projection(args.images_per_gpu)
    print(line)
    row = (f"| {machine()} | moto on loopback | rank {args.rank} of {args.world}, {args.workers} downloads | "
           f"{result['epoch0_bytes'] / 1e6:.1f} MB (epoch 0) | {result['mb_per_s']:.0f} MB/s | "
           f"{result['epoch0_wait_s']:.2f} s | {result['epoch1_wait_s']:.2f} s | {versions('dali')} |")  # fmt: skip
    print(row)
    if args.record:
        record("remote_fetch.py", [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
