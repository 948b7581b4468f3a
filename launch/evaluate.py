#!/usr/bin/env python
"""Evaluate weights on a shard split: ``deepspeed launch/evaluate.py --variant l --weights W --data URL
--resolution 384`` (also ``python launch/evaluate.py ...`` on one process).

Prints top-1/top-5 and images/s; ``--json FILE`` writes {"top1", "top5", "num_samples", ...}; ``--per-class FILE``
writes one line per class (synset, correct, total, accuracy). Each sample is counted exactly once across ranks.

The ImageNet robustness and relabelled sets, in the layouts they are distributed in
(``conv2former/data/eval_sets.py``): ``--eval-set real|v2|a|r|sketch --eval-root DIR``, several comma-separated, or
``--eval-set all --eval-root DIR`` with DIR holding real/, v2/, a/, r/, sketch/ (or the sets' own folder names); with
``--data`` too, the shard split is the table's first row. ``--record`` adds the results to the export's README.md.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from conv2former.errors import UserError, exit_on_user_error
from conv2former.evaluation import EvalRequest, default_crop, evaluate, report
from conv2former.process_exit import exit_process

__all__ = ["build_parser", "default_crop", "main", "request_from"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument(
        "--weights", required=True, help="model.safetensors, export dir, run dir, DeepSpeed dir or .pth"
    )
    parser.add_argument("--data", help="shard root (required unless --eval-set is given)")
    parser.add_argument("--split", default="val")
    parser.add_argument(
        "--eval-set",
        help="robustness/relabelled sets: real, v2, a, r, sketch (comma-separated) or all; read from --eval-root",
    )
    parser.add_argument(
        "--eval-root", help="the set's folder; with several sets or all, the folder holding them (real/, v2/, ...)"
    )
    parser.add_argument("--record", action="store_true", help="add the results to the export's README.md")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument(
        "--resolutions", help="several sizes, e.g. 224,256,288: evaluates at each and reports the best (FixRes)"
    )
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
    return parser


def parse_resolutions(args: argparse.Namespace) -> List[int]:
    """--resolutions 224,256,288 (or the one --resolution) as sizes; a one-line error for anything else."""
    if not args.resolutions:
        return [args.resolution]
    try:
        sizes = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        raise UserError(
            f"--resolutions {args.resolutions}: give sizes in px separated by commas, e.g. 224,256,288"
        ) from None
    if not sizes or any(s <= 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise UserError(f"--resolutions {args.resolutions}: give distinct positive sizes, e.g. 224,256,288")
    return sizes


def request_from(args: argparse.Namespace) -> EvalRequest:
    """The command line as the library's request (conv2former/evaluation.py)."""
    from conv2former.engine.cli import variant_name

    return EvalRequest(
        variant=variant_name(args.variant), weights=args.weights, data=args.data, split=args.split,
        eval_set=args.eval_set, eval_root=args.eval_root, record=args.record,
        resolutions=tuple(parse_resolutions(args)), crop_pct=args.crop_pct, crop_mode=args.crop_mode, ema=args.ema,
        batch=args.batch, backend=args.backend, workers=args.workers, json_path=args.json_path,
        per_class=args.per_class,
    )  # fmt: skip


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
    from conv2former.engine.distributed import this_process
    from conv2former.engine.metrics import get_logger

    request = request_from(build_parser().parse_args(argv))
    process = this_process()
    results, classes = evaluate(request, process)
    if process.rank == 0:
        report(request, results, classes, get_logger(0))
    return 0


if __name__ == "__main__":
    exit_process(main())
