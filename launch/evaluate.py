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
import json
import posixpath
import sys
import time
from typing import Dict, List, Optional, Tuple

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def requested_sets(args: argparse.Namespace) -> List[str]:
    """The --eval-set names in order ([] without the flag); one-line errors for unknown names or a missing root."""
    from conv2former.data.eval_sets import EVAL_SETS

    if not args.eval_set:
        if args.data is None:
            raise UserError("give --data SHARD_ROOT (a shard split to evaluate) or --eval-set with --eval-root")
        return []
    names = list(EVAL_SETS) if args.eval_set == "all" else [n.strip() for n in args.eval_set.split(",")]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise UserError(f"--eval-set {unknown[0]}: unknown set; choose from {', '.join(EVAL_SETS)} or all")
    if not args.eval_root:
        raise UserError("--eval-set needs --eval-root DIR, the folder the set (or the sets) lie in")
    if args.backend not in ("auto", "torch"):
        raise UserError(
            f"--backend {args.backend}: the evaluation sets are image folders, read with the torch backend "
            "(PIL, timm's eval transform); leave --backend out"
        )
    return names


def head_classes(weights, data: Optional[str]) -> List[str]:
    """The head's synsets: the weights' classes.txt, else the shard root's, else timm's 1k or 22k order when the
    head has exactly that many outputs."""
    from conv2former.data.shard_format import canonical_synsets, read_classes

    if weights.classes is not None:
        return list(weights.classes)
    if data is not None:
        return read_classes(data)
    outputs = weights.state_dict["pred.weight"].shape[0] if "pred.weight" in weights.state_dict else 0
    for dataset in ("imagenet1k", "imagenet22k"):
        if outputs == len(canonical_synsets(dataset)):
            return list(canonical_synsets(dataset))
    raise UserError(
        f"{weights.source} has no classes.txt beside it and a {outputs}-class head: give --data SHARD_ROOT "
        "(its classes.txt names the head's classes)"
    )


def load_model(args: argparse.Namespace, device):
    """(model on the device in eval mode, weights path, the head's synsets)."""
    import timm

    from conv2former.data.shard_format import read_classes
    from conv2former.engine.cli import variant_name
    from conv2former.weights import check_compatible, read_weights

    path = args.weights
    if args.ema:
        path = _beside(path, "model_ema.safetensors")
        if path is None:
            raise UserError(f"--ema: no model_ema.safetensors beside {args.weights}")
    weights = read_weights(path)
    classes = head_classes(weights, args.data)
    if args.data is not None:
        data_classes = read_classes(args.data)
        if data_classes != classes:
            raise UserError(
                f"the weights' {len(classes)} classes (e.g. {', '.join(classes[:2])}) are not "
                f"the data's {len(data_classes)} (e.g. {', '.join(data_classes[:2])}): evaluate on the data it was "
                "trained for, or fine-tune first"
            )
    model = timm.create_model(variant_name(args.variant), num_classes=len(classes))
    check_compatible(model, weights.state_dict, path)
    model.load_state_dict(weights.state_dict, strict=True)
    return model.to(device).eval(), path, classes


def evaluate_sets(args, names: List[str], model, classes, cfg, process) -> Tuple[List[Dict], Dict[str, str]]:
    """One row per set found: top-1/top-5 over the set's classes; the sets not found, with where they were looked
    for."""
    import torch

    from conv2former.data.eval_set_loader import eval_set_batches
    from conv2former.data.eval_sets import FOLDER_NAMES, find_set_root, load_eval_set, logit_columns
    from conv2former.engine.evaluator import Evaluator

    rows: List[Dict] = []
    missing: Dict[str, str] = {}
    for name in names:
        root = args.eval_root if len(names) == 1 and args.eval_set != "all" else find_set_root(name, args.eval_root)
        if root is None:
            missing[name] = f"no {' or '.join(FOLDER_NAMES[name])} folder in {args.eval_root}"
            continue
        eval_set = load_eval_set(name, root)
        evaluator = Evaluator(len(eval_set.synsets), process.device, logit_columns(eval_set, classes))
        start = time.perf_counter()
        batches = eval_set_batches(eval_set, cfg, process.rank, process.world_size)
        result = evaluator.run(model, batches, autocast_dtype=torch.bfloat16 if process.gpu else None)
        rows.append(_row(name, result, time.perf_counter() - start, eval_set.note))
    if names and not rows:
        raise UserError(f"none of {', '.join(names)} found in {args.eval_root}: " + "; ".join(missing.values()))
    return rows, missing


def _row(name: str, result, seconds: float, note: str = "") -> Dict:
    n = result.num_samples
    return {
        "set": name,
        "top1": result.top1,
        "top5": result.top5,
        "num_samples": n,
        "images_per_s": round(n / seconds, 1),
        "note": note,
    }


def evaluate_split(args, model, classes, cfg, process):
    """The shard split's row and its per-class counts."""
    import torch

    from conv2former.data.loader import build_loader
    from conv2former.engine.evaluator import Evaluator

    loader = build_loader(cfg, args.split, process.rank, process.world_size, process.device, train=False)
    start = time.perf_counter()
    result = Evaluator(len(classes), process.device).run(
        model, loader, autocast_dtype=torch.bfloat16 if process.gpu else None
    )
    return _row(args.split, result, time.perf_counter() - start), result.per_class


def parse_resolutions(args: argparse.Namespace) -> List[int]:
    """--resolutions 224,256,288 (or the one --resolution) as sizes; a one-line error for anything else."""
    if not args.resolutions:
        return [args.resolution]
    try:
        sizes = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--resolutions {args.resolutions}: give sizes in px separated by commas, e.g. 224,256,288")
    if not sizes or any(s <= 0 for s in sizes) or len(set(sizes)) != len(sizes):
        raise UserError(f"--resolutions {args.resolutions}: give distinct positive sizes, e.g. 224,256,288")
    if args.per_class:
        raise UserError("--per-class takes one --resolution, not --resolutions")
    return sizes


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = requested_sets(args)
    resolutions = parse_resolutions(args)
    if args.per_class and args.data is None:
        raise UserError("--per-class counts the shard split's classes: give --data SHARD_ROOT with it")
    if args.record and _beside(args.weights, "config.json") is None:
        raise UserError(f"--record: {args.weights} is not an export folder (no config.json beside the weights)")

    from conv2former.cpu import CpuTuning
    from conv2former.engine.distributed import join_group, this_process
    from conv2former.engine.metrics import get_logger

    process = this_process()
    if process.world_size > 1:
        join_group(process)
    if not process.gpu:  # the depthwise formulations measured fastest on this CPU, as training uses them
        CpuTuning.install()
    model, path, classes = load_model(args, process.device)
    results = [evaluate_at(args, names, model, path, classes, process, size) for size in resolutions]
    if process.rank == 0:
        logger = get_logger(0)
        if len(results) == 1:
            report(args, results[0], classes, logger)
        else:
            report_resolutions(args, results, logger)
    return 0


def evaluate_at(args, names: List[str], model, path: str, classes: List[str], process, size: int) -> Dict:
    """Every requested evaluation at one resolution: {"setting", "rows", "missing", "per_class"}."""
    from conv2former.config import DataConfig

    crop_pct, crop_mode = default_crop(path, size)
    cfg = DataConfig(
        root=args.data or "",
        backend=args.backend,
        image_size=size,
        batch_size=args.batch,
        workers=args.workers,
        crop_pct=args.crop_pct or crop_pct,
        crop_mode=args.crop_mode or crop_mode,
    )
    rows, per_class = [], None
    if args.data is not None:
        split_row, per_class = evaluate_split(args, model, classes, cfg, process)
        rows.append(split_row)
    set_rows, missing = evaluate_sets(args, names, model, classes, cfg, process)
    setting = {"weights": path, "resolution": size, "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode,
               "ranks": process.world_size}  # fmt: skip
    return {"setting": setting, "rows": rows + set_rows, "missing": missing, "per_class": per_class}


def report(args, result: Dict, classes, logger) -> None:
    """Print one resolution's results; write --json, --per-class and (--record) the export's README.md."""
    from conv2former.eval_report import format_table

    rows, setting, missing = result["rows"], result["setting"], result["missing"]
    if not args.eval_set:  # one shard split: the flat result of earlier releases
        row = rows[0]
        out = {**{k: row[k] for k in ("top1", "top5", "num_samples", "images_per_s")}, **setting}
        logger.info(
            f"top-1 {100 * row['top1']:.2f}%  top-5 {100 * row['top5']:.2f}%  on {row['num_samples']} images "
            f"({row['images_per_s']} img/s, {setting['ranks']} rank(s))"
        )
    else:
        out = {**setting, "sets": {row["set"]: row for row in rows}, "missing": missing}
        logger.info(f"{setting['resolution']} px, crop {setting['crop_mode']} {setting['crop_pct']}:")
        logger.info(format_table(rows, missing))
    _write_json(args, out)
    if args.per_class and result["per_class"] is not None:
        with open(args.per_class, "w") as f:
            for synset, (c1, _, total) in zip(classes, result["per_class"].tolist()):
                f.write(f"{synset} {int(c1)} {int(total)} {c1 / total if total else 0:.4f}\n")
    _record(args, [result], logger)


def report_resolutions(args, results: List[Dict], logger) -> None:
    """--resolutions: a table of top-1 per resolution and the best one (by the first row: the shard split, else the
    first set; ties go to the smaller size)."""
    from conv2former.eval_report import format_table

    first = results[0]["rows"][0]["set"]
    best = max(results, key=lambda r: (r["rows"][0]["top1"], -r["setting"]["resolution"]))
    for result in results:
        setting = result["setting"]
        logger.info(f"{setting['resolution']} px, crop {setting['crop_mode']} {setting['crop_pct']}:")
        logger.info(format_table(result["rows"], result["missing"]))
    chosen = best["setting"]["resolution"]
    logger.info(f"best: {chosen} px ({first} top-1 {100 * best['rows'][0]['top1']:.2f}%)")
    out = {
        "weights": best["setting"]["weights"],
        "ranks": best["setting"]["ranks"],
        "resolutions": [
            {
                **{k: r["setting"][k] for k in ("resolution", "crop_pct", "crop_mode")},
                "sets": {row["set"]: row for row in r["rows"]},
                "missing": r["missing"],
            }
            for r in results
        ],  # fmt: skip
        "best": {"resolution": chosen, "set": first, "top1": best["rows"][0]["top1"]},
    }
    _write_json(args, out)
    _record(args, results, logger)


def _write_json(args, out: Dict) -> None:
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)


def _record(args, results: List[Dict], logger) -> None:
    """--record: each resolution's rows into the export's evaluation_sets.json and README.md."""
    if not args.record:
        return
    from conv2former.eval_report import record_in_export

    for result in results:
        export = str(_beside(result["setting"]["weights"], "config.json"))  # checked before evaluating
        recorded = {**result["setting"], "sets": {row["set"]: row for row in result["rows"]}}
        logger.info(f"recorded in {record_in_export(posixpath.dirname(export), recorded)}")


if __name__ == "__main__":
    sys.exit(main())
