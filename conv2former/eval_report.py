"""Evaluation results as a table, and recorded in an export folder (``launch/evaluate.py --record``): merged into
``evaluation_sets.json`` (one entry per set and resolution, the latest kept) and shown in the folder's ``README.md``,
the model card next to the weights."""

from __future__ import annotations

import json
import posixpath
from typing import Any, Dict, List

import fsspec

__all__ = ["format_table", "record_in_export", "RESULTS_FILE"]

RESULTS_FILE = "evaluation_sets.json"
SET_TITLES = {
    "real": "ImageNet-ReaL",
    "v2": "ImageNetV2",
    "a": "ImageNet-A",
    "r": "ImageNet-R",
    "sketch": "ImageNet-Sketch",
}


def _title(name: str) -> str:
    return SET_TITLES.get(name, f"shard split {name}")


def format_table(rows: List[Dict[str, Any]], missing: Dict[str, str]) -> str:
    """One line per evaluated set (top-1, top-5, images, note) and one per set that was asked for and not found."""
    lines = [f"{'set':<18} {'top-1':>7} {'top-5':>7} {'images':>8}  note"]
    for row in rows:
        lines.append(
            f"{_title(row['set']):<18} {100 * row['top1']:>6.2f}% {100 * row['top5']:>6.2f}% "
            f"{row['num_samples']:>8}  {row.get('note', '')}"
        )
    for name, why in missing.items():
        lines.append(f"{_title(name):<18} {'-':>7} {'-':>7} {'-':>8}  not evaluated: {why}")
    return "\n".join(lines)


def record_in_export(folder: str, result: Dict[str, Any]) -> str:
    """Merge ``result`` (evaluate.py's JSON with ``sets``) into ``folder``'s results file and rewrite its README.md;
    returns the results file's path."""
    fs, path = fsspec.core.url_to_fs(folder)
    results_path = posixpath.join(path, RESULTS_FILE)
    entries: Dict[str, Any] = {}
    if fs.isfile(results_path):
        with fs.open(results_path, "r") as f:
            entries = json.load(f)
    for name, row in result["sets"].items():
        entries[f"{name}@{result['resolution']}"] = {
            **row,
            "set": name,
            "resolution": result["resolution"],
            "crop_pct": result["crop_pct"],
            "crop_mode": result["crop_mode"],
            "weights": result["weights"],
        }
    with fs.open(results_path, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    with fs.open(posixpath.join(path, "README.md"), "w") as f:
        f.write(_readme(fs, path, entries))
    return results_path


def _readme(fs: fsspec.AbstractFileSystem, path: str, entries: Dict[str, Any]) -> str:
    architecture = "Conv2Former"
    config_path = posixpath.join(path, "config.json")
    if fs.isfile(config_path):
        with fs.open(config_path, "r") as f:
            architecture = json.load(f).get("architecture", architecture)
    lines = [
        f"# {architecture}",
        "",
        "Weights exported by conv2former-pretrain in timm's format: "
        '`timm.create_model("local-dir:<this folder>", pretrained=True)` after `import conv2former`.',
        "",
        "## Evaluation",
        "",
        "Measured with `launch/evaluate.py --record` (top-1/top-5 in %; ImageNet-A and -R scored over their 200 "
        "classes; ReaL over the images it labels).",
        "",
        "| set | resolution | crop | top-1 | top-5 | images | weights | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(entries, key=lambda k: (entries[k]["resolution"], k)):
        e = entries[key]
        lines.append(
            f"| {_title(e['set'])} | {e['resolution']} | {e['crop_mode']} {e['crop_pct']} | {100 * e['top1']:.2f} "
            f"| {100 * e['top5']:.2f} | {e['num_samples']} | {posixpath.basename(e['weights'])} | {e.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"
