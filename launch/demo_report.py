#!/usr/bin/env python
"""The demo's report (``launch/demo.py`` runs both commands as its last stages; each can be replayed alone):

    python launch/demo_report.py gradcam --export RUN/finetune_96/export/best --out RUN --resolution 96
    python launch/demo_report.py render --out RUN --finetunes 64 96

``gradcam``: Grad-CAM of the fine-tuned demo model on freshly generated images that are in no split and whose shape
masks are known (gradcam.png, gradcam.json). ``render``: RUN/report.md, RUN/report.png and RUN/summary.json from what
the stages left in RUN (the runs' log.jsonl, eval_<px>.json, the ERF and Grad-CAM results, commands.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)  # launch and data_prep run from the checkout

from conv2former.data.eval_crop import eval_crop  # noqa: E402

ERF_PX = 128  # input side of the ERF analysis the demo runs (the paper uses 1024 on ImageNet models)
COMMANDS = "commands.sh"  # the commands that ran, one per line, written by launch/demo.py


def read_log(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def make_report(
    out: Path, stages: Dict[str, Dict[str, Any]], commands: List[str], cam: Dict[str, Any]
) -> Dict[str, Any]:
    """report.png (the curves), summary.json and report.md of the demo's stages; returns the summary."""
    runs = {name: read_log(out / name) for name in stages}
    _plot(out, runs)
    summary: Dict[str, Any] = {"stages": {}}
    for name, info in stages.items():
        summary["stages"][name] = {
            "top1": info["top1"],
            "top5": info["top5"],
            "num_classes": info["num_classes"],
            "chance": 1.0 / info["num_classes"],
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    (out / "report.md").write_text("\n".join(_report_lines(out, stages, runs, commands, cam)))
    return summary


def _report_lines(
    out: Path, stages: Dict[str, Dict[str, Any]], runs: Dict[str, List[Dict[str, Any]]], commands: List[str],
    cam: Dict[str, Any],
) -> List[str]:  # fmt: skip
    lines = [
        "# conv2former-pretrain demo report",
        "",
        "The whole pipeline on the built-in demo dataset, on CPU: generated images in ImageNet's on-disk layouts "
        "-> WebDataset shards -> DeepSpeed pretraining on 2 ranks -> head transfer by synset -> fine-tuning at "
        "two resolutions, both from the pretraining export (the paper's chain) -> evaluation of each fine-tune's "
        "best-evaluated weights (export/best/).",
        "",
        "![report](report.png)",
        "",
        "| stage | classes | top-1 | top-5 | chance | steps | images/s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, info in stages.items():
        train = [r for r in runs[name] if r["kind"] == "train"]
        ips = sorted(r["images_per_s"] for r in train)
        median = f"{ips[len(ips) // 2]:.0f}" if ips else "—"
        steps = train[-1]["step"] if train else 0
        lines.append(
            f"| {name} | {info['num_classes']} | {100 * info['top1']:.1f}% | {100 * info['top5']:.1f}% | "
            f"{100 / info['num_classes']:.1f}% | {steps} | {median} |"
        )
    lines += (
        [
            "",
            "Top-1/top-5 of the fine-tunes come from `launch/evaluate.py`; the pretraining row is the engine's "
            "held-out evaluation of its last epoch.",
            "",
            "## Effective receptive fields (paper Table 5, Fig. 4)",
            "",
            f"Side length (pixels) and area ratio of the centred square holding the high-contribution region, mean "
            f"over thresholds 0.5-0.9, {ERF_PX} px inputs, 8 images (`python -m conv2former.analysis erf`, "
            "docs/analysis.md). Maps: [erf_init/erf.png](erf_init/erf.png), "
            "[erf_pretrained/erf.png](erf_pretrained/erf.png).",
            "",
            *erf_rows(out),
            "",
            "What to see: each stage draws on a wider region than the one before (every downsampling doubles the "
            "reach). At initialisation the blocks are near-identities (layer scale 1e-6), so the downsampling "
            "convolutions alone shape the field; once trained, the blocks' modulation kernels widen it (a short run "
            "changes it little). The paper's Table 5 compares ImageNet-trained models at 1024 px.",
            "",
            *cam_lines(cam),
            "## Commands that ran (replay any stage)",
            "",
            "```bash",
        ]
        + commands
        + ["```", "", f"TensorBoard: `tensorboard --logdir {out}`", ""]
    )
    return lines


def _plot(out: Path, runs: Dict[str, List[Dict[str, Any]]]) -> None:
    """report.png: loss, held-out top-1, lr and throughput per stage, the ERF maps and the Grad-CAM sheet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 13), gridspec_kw={"height_ratios": [1, 1, 1.3]})
    for ax, picture, title in (
        (axes[2, 0], out / "erf_pretrained" / "erf.png", "effective receptive fields after pretraining"),
        (axes[2, 1], out / "gradcam.png", "Grad-CAM of the last fine-tune, held-out images"),
    ):
        ax.imshow(plt.imread(str(picture)))
        ax.set_title(title)
        ax.axis("off")
    for name, rows in runs.items():
        train = [r for r in rows if r["kind"] == "train"]
        evals = [r for r in rows if r["kind"] == "eval"]
        axes[0, 0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        axes[0, 1].plot([r["step"] for r in evals], [r["top1"] for r in evals], marker="o", label=f"{name} top-1")
        if evals and "ema_top1" in evals[0]:
            axes[0, 1].plot([r["step"] for r in evals], [r["ema_top1"] for r in evals], ls="--", label=f"{name} EMA")
        axes[1, 0].plot([r["step"] for r in train], [r["lr"] for r in train], label=name)
        axes[1, 1].plot([r["step"] for r in train], [r["images_per_s"] for r in train], label=name)
    for ax, title in zip(
        axes[:2].flat,
        ["training loss", "held-out top-1", "learning rate (per group max)", "throughput (images/s, all ranks)"],
    ):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("conv2former-pretrain demo: pretrain on demo-22k, fine-tune on demo-1k at two resolutions")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=90)
    plt.close(fig)


def gradcam_held_out(export: Path, out: Path, resolution: int, count: int = 8) -> Dict[str, Any]:
    """Grad-CAM of the fine-tuned demo model on ``count`` freshly generated images (in no split), whose shape masks
    are known: the share of each map's heat that falls on the drawn shape. Writes gradcam.png and gradcam.json."""
    import io

    import timm
    import torch
    from PIL import Image

    from conv2former.analysis.gradcam import grad_cam, heat_inside, heat_ratio, overlays
    from conv2former.analysis.models import build
    from conv2former.analysis.plots import plot_grid
    from conv2former.config import DataConfig
    from data_prep.demo import held_out_images

    model = build("conv2former_demo", str(export), {}, log=lambda line: None)
    classes = (export / "classes.txt").read_text().split()
    samples = held_out_images(count)
    norm = DataConfig()
    crop_pct, crop_mode = eval_crop("384")  # the fine-tune at the 384 recipe's stand-in size
    transform = timm.data.create_transform(
        resolution, crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic", mean=norm.mean, std=norm.std
    )
    images = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for _, data, _ in samples])
    result = grad_cam(model, images)
    rows = [
        {
            "true": synset,
            "predicted": classes[predicted],
            "heat_ratio": heat_ratio(cam_map, mask),
            "heat_on_shape": heat_inside(cam_map, mask),
            "shape_area": float(mask.mean()),
        }
        for (synset, _, mask), cam_map, predicted in zip(samples, result.maps, result.predicted)
    ]
    captions = [f"true {r['true']} pred {r['predicted']}\non shape {r['heat_ratio']:.1f}x the heat" for r in rows]
    plot_grid(
        overlays(images, result.maps, norm.mean, norm.std),
        captions,
        str(out / "gradcam.png"),
        f"Grad-CAM at {result.layer}, {resolution} px, {count} held-out images (predicted class)",
    )
    report = {"layer": result.layer, "resolution": resolution, "weights": str(export), "images": rows}
    (out / "gradcam.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def cam_lines(cam: Dict[str, Any]) -> List[str]:
    """The report's Grad-CAM section: how much more heat falls on the known shape than on the background."""
    rows = cam["images"]
    ratios = sorted(r["heat_ratio"] for r in rows)
    areas = sorted(r["shape_area"] for r in rows)
    return [
        "## Grad-CAM (paper Fig. 6)",
        "",
        f"The last fine-tune on {len(rows)} generated images that are in no split, at {cam['resolution']} px, target "
        f"layer `{cam['layer']}`, for the predicted class. The shapes' pixels are known, so the heat per pixel on the "
        f"shape is compared with the heat per pixel on the background: higher on {sum(r > 1 for r in ratios)} of "
        f"{len(rows)} images (median ratio {ratios[len(rows) // 2]:.1f}x; the shapes cover a median "
        f"{100 * areas[len(rows) // 2]:.0f}% of the image).",
        "",
        "![Grad-CAM](gradcam.png)",
        "",
        "What to see: the heat gathers on the coloured shape, the only thing that tells the classes apart, more than "
        "on the noisy background (the last stage is a 3 x 3 map here, so the heat is coarse).",
        "",
    ]


def erf_rows(out: Path) -> List[str]:
    """Report lines comparing the ERF of the demo model at initialisation and after pretraining."""
    init = json.loads((out / "erf_init" / "erf.json").read_text())
    trained = json.loads((out / "erf_pretrained" / "erf.json").read_text())
    a, b = init["models"]["conv2former_demo"], trained["models"]["conv2former_demo"]
    lines = [
        "| stage | side (mean), init | side (mean), pretrained | area (mean), init | area (mean), pretrained |",
        "|---:|---:|---:|---:|---:|",
    ]
    for stage in a["stages"]:
        x, y = a["stages"][stage], b["stages"][stage]
        lines.append(
            f"| {stage} | {x['side_mean']:.1f} | {y['side_mean']:.1f} | {x['area_mean']:.3f} | {y['area_mean']:.3f} |"
        )
    grown = max(a["stages"], key=lambda st: b["stages"][st]["side_mean"] - a["stages"][st]["side_mean"])
    before, after = a["stages"][grown]["side_mean"], b["stages"][grown]["side_mean"]
    lines += ["", f"Measured here: pretraining changed stage {grown} the most, {before:.1f} -> {after:.1f} px."]
    return lines


def stage_results(out: Path, finetunes: List[int]) -> Dict[str, Dict[str, Any]]:
    """Top-1/top-5 and class count of each stage: the pretraining's last held-out evaluation (its log.jsonl) and each
    fine-tune's evaluation by launch/evaluate.py (eval_<px>.json)."""
    pre = out / "pretrain"
    pre_eval = [r for r in read_log(pre) if r["kind"] == "eval"][-1]
    results = {"pretrain": {"top1": pre_eval["top1"], "top5": pre_eval["top5"], "num_classes": _classes(pre)}}
    for res in finetunes:
        evaluation = json.loads((out / f"eval_{res}.json").read_text())
        results[f"finetune_{res}"] = {
            "top1": evaluation["top1"],
            "top5": evaluation["top5"],
            "num_classes": _classes(out / f"finetune_{res}"),
        }
    return results


def _classes(run: Path) -> int:
    return len((run / "export" / "classes.txt").read_text().split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cam = commands.add_parser("gradcam", help="Grad-CAM of a fine-tuned demo export on held-out images")
    cam.add_argument("--export", required=True, type=Path)
    cam.add_argument("--out", required=True, type=Path)
    cam.add_argument("--resolution", type=int, required=True)
    cam.add_argument("--images", type=int, default=8)
    render = commands.add_parser("render", help="report.md, report.png and summary.json of a demo run folder")
    render.add_argument("--out", required=True, type=Path)
    render.add_argument("--finetunes", type=int, nargs="+", required=True, help="the fine-tunes' resolutions")
    args = parser.parse_args(argv)
    if args.command == "gradcam":
        gradcam_held_out(args.export, args.out, args.resolution, args.images)
        return 0
    lines = (args.out / COMMANDS).read_text().splitlines() if (args.out / COMMANDS).exists() else []
    cam_result = json.loads((args.out / "gradcam.json").read_text())
    summary = make_report(args.out, stage_results(args.out, args.finetunes), lines, cam_result)
    for name, info in summary["stages"].items():
        print(
            f"    {name:>14}: top-1 {100 * info['top1']:5.1f}%  top-5 {100 * info['top5']:5.1f}%  "
            f"(chance {100 * info['chance']:.1f}%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
