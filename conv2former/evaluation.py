"""Evaluation of weights, as ``launch/evaluate.py`` runs it: a shard split and the ImageNet robustness / relabelled
sets (conv2former/data/eval_sets.py), at one or several resolutions (``--resolutions``: FixRes), on one or several
ranks, each sample counted exactly once. ``EvalRequest`` is what the command line asked for; ``evaluate`` returns one
``ResolutionResult`` per resolution; ``report`` prints and writes them (``--json``, ``--per-class``, ``--record``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch

from conv2former.config import DataConfig, ModelConfig
from conv2former.engine.distributed import Process
from conv2former.engine.evaluator import EvalResult, Evaluator
from conv2former.errors import UserError
from conv2former.weights import Weights


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how (the flags of ``launch/evaluate.py``)."""

    variant: str  # a full timm name
    weights: str
    data: Optional[str] = None  # a shard root
    split: str = "val"
    eval_set: Optional[str] = None  # real, v2, a, r, sketch (comma-separated) or all
    eval_root: Optional[str] = None
    record: bool = False
    resolutions: Tuple[int, ...] = (224,)
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None
    ema: bool = False
    batch: int = 64
    backend: str = "auto"
    workers: int = 4
    json_path: Optional[str] = None
    per_class: Optional[str] = None


@dataclass
class Row:
    """One evaluated set (or split) at one resolution."""

    set: str
    top1: float
    top5: float
    num_samples: int
    images_per_s: float
    note: str = ""


@dataclass
class ResolutionResult:
    setting: Dict[str, Any]  # weights, resolution, crop_pct, crop_mode, ranks
    rows: List[Row]
    missing: Dict[str, str] = field(default_factory=dict)  # sets not found: where they were looked for
    per_class: Optional[torch.Tensor] = None  # the shard split's (classes, 3) counts

    def row_dicts(self) -> List[Dict[str, Any]]:
        return [dataclasses.asdict(row) for row in self.rows]


def beside(weights: str, name: str) -> Optional[str]:
    """``name`` in the weights' folder or its export/ (the weights: a file, an export or run folder; local or any
    fsspec URL), or None."""
    import fsspec

    path = weights[len("local-dir:") :] if weights.startswith("local-dir:") else weights
    fs, fs_path = fsspec.core.url_to_fs(path)
    folder = fs_path if fs.isdir(fs_path) else posixpath.dirname(fs_path)
    for candidate in (posixpath.join(folder, name), posixpath.join(folder, "export", name)):
        if fs.isfile(candidate):
            return str(fs.unstrip_protocol(candidate)) if "://" in path else candidate
    return None


def default_crop(weights: str, resolution: int) -> Tuple[float, str]:
    """The eval crop when none is given: the one the weights' own stage evaluated with (timm's config.json in an
    export folder) when it was at this resolution; otherwise 0.875 center up to 256 px and squash (1.0) above."""
    import fsspec

    from conv2former.data.eval_crop import eval_crop, recipe_for

    config = beside(weights, "config.json")
    if config is not None:
        with fsspec.open(config, "r") as f:
            cfg = json.load(f).get("pretrained_cfg", {})
        if list(cfg.get("input_size", []))[-1:] == [resolution] and "crop_pct" in cfg and "crop_mode" in cfg:
            return float(cfg["crop_pct"]), str(cfg["crop_mode"])
    pct, mode = eval_crop(recipe_for(resolution))
    return float(pct), str(mode)


def requested_sets(request: EvalRequest) -> List[str]:
    """The --eval-set names in order ([] without the flag); one-line errors for unknown names or a missing root."""
    from conv2former.data.eval_sets import EVAL_SETS

    if not request.eval_set:
        if request.data is None:
            raise UserError("give --data SHARD_ROOT (a shard split to evaluate) or --eval-set with --eval-root")
        return []
    names = list(EVAL_SETS) if request.eval_set == "all" else [n.strip() for n in request.eval_set.split(",")]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise UserError(f"--eval-set {unknown[0]}: unknown set; choose from {', '.join(EVAL_SETS)} or all")
    if not request.eval_root:
        raise UserError("--eval-set needs --eval-root DIR, the folder the set (or the sets) lie in")
    if request.backend not in ("auto", "torch"):
        raise UserError(
            f"--backend {request.backend}: the evaluation sets are image folders, read with the torch backend "
            "(PIL, timm's eval transform); leave --backend out"
        )
    return names


def check_request(request: EvalRequest) -> List[str]:
    """Every mistake of the request as a one-line error before anything is loaded; the sets to evaluate."""
    names = requested_sets(request)
    if request.per_class and request.data is None:
        raise UserError("--per-class counts the shard split's classes: give --data SHARD_ROOT with it")
    if request.per_class and len(request.resolutions) > 1:
        raise UserError("--per-class takes one --resolution, not --resolutions")
    if request.record and beside(request.weights, "config.json") is None:
        raise UserError(f"--record: {request.weights} is not an export folder (no config.json beside the weights)")
    return names


def head_classes(weights: Weights, data: Optional[str]) -> List[str]:
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


def load_model(request: EvalRequest, device: torch.device) -> Tuple[Any, str, List[str]]:
    """(model on the device in eval mode, weights path, the head's synsets)."""
    from conv2former.data.shard_format import read_classes
    from conv2former.weights import check_compatible, read_weights

    path = request.weights
    if request.ema:
        ema = beside(request.weights, "model_ema.safetensors")
        if ema is None:
            raise UserError(f"--ema: no model_ema.safetensors beside {request.weights}")
        path = ema
    weights = read_weights(path)
    classes = head_classes(weights, request.data)
    if request.data is not None:
        data_classes = read_classes(request.data)
        if data_classes != classes:
            raise UserError(
                f"the weights' {len(classes)} classes (e.g. {', '.join(classes[:2])}) are not "
                f"the data's {len(data_classes)} (e.g. {', '.join(data_classes[:2])}): evaluate on the data it was "
                "trained for, or fine-tune first"
            )
    model_cfg = ModelConfig(variant=request.variant, drop_path_rate=0.0)
    model: Any = timm.create_model(request.variant, **model_cfg.create_kwargs(len(classes)))
    check_compatible(model, weights.state_dict, path)
    model.load_state_dict(weights.state_dict, strict=True)
    return model.to(device).eval(), path, classes


def evaluate(request: EvalRequest, process: Process) -> Tuple[List[ResolutionResult], List[str]]:
    """Every requested evaluation at each resolution, and the head's classes."""
    from conv2former.engine.distributed import join_group

    names = check_request(request)
    if process.world_size > 1:
        join_group(process)
    if not process.gpu:  # the depthwise formulations measured fastest on this CPU, as training uses them
        from conv2former.cpu import CpuTuning

        CpuTuning.install()
    model, path, classes = load_model(request, process.device)
    results = [evaluate_at(request, names, model, path, classes, process, size) for size in request.resolutions]
    return results, classes


def evaluate_at(
    request: EvalRequest, names: List[str], model: Any, path: str, classes: List[str], process: Process, size: int
) -> ResolutionResult:
    """Every requested evaluation at one resolution."""
    crop_pct, crop_mode = default_crop(path, size)
    cfg = DataConfig(root=request.data or "", backend=request.backend, image_size=size, batch_size=request.batch,
                     workers=request.workers, crop_pct=request.crop_pct or crop_pct,
                     crop_mode=request.crop_mode or crop_mode)  # fmt: skip
    rows, per_class = [], None
    if request.data is not None:
        split_row, per_class = evaluate_split(request.split, model, classes, cfg, process)
        rows.append(split_row)
    set_rows, missing = evaluate_sets(request, names, model, classes, cfg, process)
    setting = {"weights": path, "resolution": size, "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode,
               "ranks": process.world_size}  # fmt: skip
    return ResolutionResult(setting, rows + set_rows, missing, per_class)


def _row(name: str, result: EvalResult, seconds: float, note: str = "") -> Row:
    n = result.num_samples
    return Row(name, result.top1, result.top5, n, round(n / seconds, 1), note)


def evaluate_split(
    split: str, model: Any, classes: List[str], cfg: DataConfig, process: Process
) -> Tuple[Row, torch.Tensor]:
    """The shard split's row and its per-class counts."""
    from conv2former.data.loader import build_loader

    loader = build_loader(cfg, split, process.rank, process.world_size, process.device, train=False)
    start = time.perf_counter()
    half = torch.bfloat16 if process.gpu else None
    result = Evaluator(len(classes), process.device).run(model, loader, autocast_dtype=half)
    return _row(split, result, time.perf_counter() - start), result.per_class


def evaluate_sets(
    request: EvalRequest, names: List[str], model: Any, classes: List[str], cfg: DataConfig, process: Process
) -> Tuple[List[Row], Dict[str, str]]:
    """One row per set found: top-1/top-5 over the set's classes; the sets not found, with where they were looked
    for."""
    from conv2former.data.eval_set_loader import eval_set_batches
    from conv2former.data.eval_sets import FOLDER_NAMES, find_set_root, load_eval_set, logit_columns

    rows: List[Row] = []
    missing: Dict[str, str] = {}
    root_of_all = str(request.eval_root)
    for name in names:
        one = len(names) == 1 and request.eval_set != "all"
        root = root_of_all if one else find_set_root(name, root_of_all)
        if root is None:
            missing[name] = f"no {' or '.join(FOLDER_NAMES[name])} folder in {root_of_all}"
            continue
        eval_set = load_eval_set(name, root)
        evaluator = Evaluator(len(eval_set.synsets), process.device, logit_columns(eval_set, classes))
        start = time.perf_counter()
        batches = eval_set_batches(eval_set, cfg, process.rank, process.world_size)
        result = evaluator.run(model, batches, autocast_dtype=torch.bfloat16 if process.gpu else None)
        rows.append(_row(name, result, time.perf_counter() - start, eval_set.note))
    if names and not rows:
        raise UserError(f"none of {', '.join(names)} found in {root_of_all}: " + "; ".join(missing.values()))
    return rows, missing


def report(request: EvalRequest, results: List[ResolutionResult], classes: List[str], log: logging.Logger) -> None:
    """Print the results; write --json, --per-class and (--record) the export's README.md."""
    if len(results) == 1:
        out = _report_one(request, results[0], classes, log)
    else:
        out = _report_resolutions(results, log)
    if request.json_path:
        with open(request.json_path, "w") as f:
            json.dump(out, f, indent=1)
    if request.record:
        _record(results, log)


def _report_one(request: EvalRequest, result: ResolutionResult, classes: List[str], log: logging.Logger) -> Any:
    from conv2former.eval_report import format_table

    rows, setting = result.row_dicts(), result.setting
    if not request.eval_set:  # one shard split: the flat result of earlier releases
        row = rows[0]
        out = {**{k: row[k] for k in ("top1", "top5", "num_samples", "images_per_s")}, **setting}
        log.info(
            f"top-1 {100 * row['top1']:.2f}%  top-5 {100 * row['top5']:.2f}%  on {row['num_samples']} images "
            f"({row['images_per_s']} img/s, {setting['ranks']} rank(s))"
        )
    else:
        out = {**setting, "sets": {row["set"]: row for row in rows}, "missing": result.missing}
        log.info(f"{setting['resolution']} px, crop {setting['crop_mode']} {setting['crop_pct']}:")
        log.info(format_table(rows, result.missing))
    if request.per_class and result.per_class is not None:
        with open(request.per_class, "w") as f:
            for synset, (c1, _, total) in zip(classes, result.per_class.tolist()):
                f.write(f"{synset} {int(c1)} {int(total)} {c1 / total if total else 0:.4f}\n")
    return out


def _report_resolutions(results: List[ResolutionResult], log: logging.Logger) -> Dict[str, Any]:
    """--resolutions: a table of top-1 per resolution and the best one (by the first row: the shard split, else the
    first set; ties go to the smaller size)."""
    from conv2former.eval_report import format_table

    first = results[0].rows[0].set
    best = max(results, key=lambda r: (r.rows[0].top1, -r.setting["resolution"]))
    for result in results:
        setting = result.setting
        log.info(f"{setting['resolution']} px, crop {setting['crop_mode']} {setting['crop_pct']}:")
        log.info(format_table(result.row_dicts(), result.missing))
    chosen = best.setting["resolution"]
    log.info(f"best: {chosen} px ({first} top-1 {100 * best.rows[0].top1:.2f}%)")
    return {
        "weights": best.setting["weights"],
        "ranks": best.setting["ranks"],
        "resolutions": [
            {
                **{k: r.setting[k] for k in ("resolution", "crop_pct", "crop_mode")},
                "sets": {row["set"]: row for row in r.row_dicts()},
                "missing": r.missing,
            }
            for r in results
        ],  # fmt: skip
        "best": {"resolution": chosen, "set": first, "top1": best.rows[0].top1},
    }


def _record(results: List[ResolutionResult], log: logging.Logger) -> None:
    """--record: each resolution's rows into the export's evaluation_sets.json and README.md."""
    from conv2former.eval_report import record_in_export

    for result in results:
        export = str(beside(result.setting["weights"], "config.json"))  # checked before evaluating
        recorded = {**result.setting, "sets": {row["set"]: row for row in result.row_dicts()}}
        log.info(f"recorded in {record_in_export(posixpath.dirname(export), recorded)}")
