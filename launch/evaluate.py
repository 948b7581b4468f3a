#!/usr/bin/env python
"""Evaluate weights on a shard split: ``deepspeed launch/evaluate.py --variant l --weights W --data URL
--resolution 384`` (also ``python launch/evaluate.py ...`` on one process).

Prints top-1/top-5 and images/s; ``--json FILE`` writes {"top1", "top5", "num_samples", ...}; ``--per-class FILE``
writes one line per class (synset, correct, total, accuracy). Each sample is counted exactly once across ranks.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from typing import Optional

from conv2former.errors import UserError, exit_on_user_error


def _beside(weights: str, name: str) -> Optional[str]:
    """``name`` in the weights' folder or its export/ (the weights: a file, an export or run folder; local or any
    fsspec URL), or None."""
    import fsspec

    path = weights[len("local-dir:") :] if weights.startswith("local-dir:") else weights
    fs, fs_path = fsspec.core.url_to_fs(path)
    folder = fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path)
    for candidate in (posixpath.join(folder, name), posixpath.join(folder, "export", name)):
        if fs.isfile(candidate):
            return fs.unstrip_protocol(candidate) if "://" in path else candidate
    return None


def default_crop(weights: str, resolution: int):
    """The eval crop when none is given: the one the weights' own stage evaluated with (timm's config.json in an
    export folder) when it was at this resolution; otherwise 0.875 center up to 256 px and squash (1.0) above."""
    import fsspec

    config = _beside(weights, "config.json")
    if config is not None:
        with fsspec.open(config, "r") as f:
            cfg = json.load(f).get("pretrained_cfg", {})
        if list(cfg.get("input_size", []))[-1:] == [resolution] and "crop_pct" in cfg and "crop_mode" in cfg:
            return float(cfg["crop_pct"]), cfg["crop_mode"]
    from conv2former.data.eval_crop import eval_crop, recipe_for

    return eval_crop(recipe_for(resolution))


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument(
        "--weights", required=True, help="model.safetensors, export dir, run dir, DeepSpeed dir or .pth"
    )
    parser.add_argument("--data", required=True, help="shard root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument(
        "--crop-pct", type=float, help="default: the export's own (config.json), else 0.875 at <=256 px, 1.0 above"
    )
    parser.add_argument(
        "--crop-mode",
        choices=["center", "squash"],
        help="default: the export's own, else center at <=256 px, squash above",
    )
    parser.add_argument("--ema", action="store_true", help="use model_ema.safetensors beside the weights")
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--backend", default="auto", choices=["auto", "dali-gpu", "dali-cpu", "torch"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", dest="json_path", help="write the result as JSON here")
    parser.add_argument("--per-class", help="write per-class accuracy (synset correct total accuracy) here")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import timm
    import torch

    from conv2former.config import DataConfig
    from conv2former.cpu import CpuTuning
    from conv2former.data.loader import build_loader
    from conv2former.data.shard_format import read_classes
    from conv2former.engine.cli import variant_name
    from conv2former.engine.distributed import join_group, this_process
    from conv2former.engine.evaluator import Evaluator
    from conv2former.engine.metrics import get_logger
    from conv2former.weights import check_compatible, read_weights

    variant = variant_name(args.variant)
    path = args.weights
    if args.ema:
        path = _beside(path, "model_ema.safetensors")
        if path is None:
            raise UserError(f"--ema: no model_ema.safetensors beside {args.weights}")
    weights = read_weights(path)
    classes = read_classes(args.data)
    if weights.classes is not None and weights.classes != classes:
        raise UserError(
            f"the weights' {len(weights.classes)} classes (e.g. {', '.join(weights.classes[:2])}) are not "
            f"the data's {len(classes)} (e.g. {', '.join(classes[:2])}): evaluate on the data it was "
            "trained for, or fine-tune first"
        )
    process = this_process()
    rank, world, device, gpu = process.rank, process.world_size, process.device, process.gpu
    if world > 1:
        join_group(process)
    if not gpu:  # the depthwise formulations measured fastest on this CPU, as training uses them
        CpuTuning.install()
    model = timm.create_model(variant, num_classes=len(classes))
    check_compatible(model, weights.state_dict, path)
    model.load_state_dict(weights.state_dict, strict=True)
    model = model.to(device).eval()
    crop_pct, crop_mode = default_crop(path, args.resolution)
    cfg = DataConfig(
        root=args.data,
        backend=args.backend,
        image_size=args.resolution,
        batch_size=args.batch,
        workers=args.workers,
        crop_pct=args.crop_pct or crop_pct,
        crop_mode=args.crop_mode or crop_mode,
    )
    loader = build_loader(cfg, args.split, rank, world, device, train=False)
    start = time.perf_counter()
    evaluation = Evaluator(len(classes), device).run(model, loader, autocast_dtype=torch.bfloat16 if gpu else None)
    seconds = time.perf_counter() - start
    n = evaluation.num_samples
    result = {
        "top1": evaluation.top1,
        "top5": evaluation.top5,
        "num_samples": n,
        "images_per_s": round(n / seconds, 1),
        "weights": path,
        "resolution": args.resolution,
        "crop_pct": cfg.crop_pct,
        "crop_mode": cfg.crop_mode,
        "ranks": world,
    }
    if rank == 0:
        get_logger(rank).info(
            f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  on {n} images "
            f"({result['images_per_s']} img/s, {world} rank(s))"
        )
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(result, f, indent=1)
        if args.per_class:
            with open(args.per_class, "w") as f:
                for synset, (c1, _, total) in zip(classes, evaluation.per_class.tolist()):
                    f.write(f"{synset} {int(c1)} {int(total)} {c1 / total if total else 0:.4f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
