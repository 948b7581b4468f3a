"""``python -m conv2former.analysis {erf,gradcam} ...``: the paper's analyses for any checkpoint (docs/analysis.md).

``erf``: per-stage effective receptive fields (paper Table 5, Fig. 4; method in ``conv2former/analysis/erf.py``)
of one or more timm models with feature maps, at initialisation or with ``--weights``, on the first ``--images``
images of a shard split resized to ``--resolution``. Writes ``erf.json``, ``erf.png`` (one row per model, one panel
per stage) and prints Table 5's columns.

``gradcam``: Grad-CAM overlays (``conv2former/analysis/gradcam.py``) of the first ``--images`` images of a split,
with true and predicted class names, as ``gradcam.png`` and ``gradcam.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

if TYPE_CHECKING:
    import torch

from conv2former.errors import UserError, exit_on_user_error


def eval_images(
    root: str, split: str, count: int, resolution: int, batch: int, crop_pct: float = 1.0, crop_mode: str = "squash"
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the split's first ``count`` images, by default squashed to resolution²."""
    from conv2former.config import DataConfig
    from conv2former.data.loader import first_eval_images

    cfg = DataConfig(root=root, image_size=resolution, batch_size=batch, crop_pct=crop_pct, crop_mode=crop_mode)
    return first_eval_images(cfg, split, count)


def erf_command(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from conv2former.analysis import erf as erf_lib
    from conv2former.analysis.models import StageFeatures, build, feature_stages, parse_model_kwargs
    from conv2former.analysis.plots import plot_erf

    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    weights = [w.strip() for w in args.weights.split(",")] if args.weights else [""] * len(names)
    if len(weights) != len(names):
        raise UserError(
            f"--weights names {len(weights)} files for {len(names)} models: give one per model "
            "(comma-separated, empty for none)"
        )
    kwargs = parse_model_kwargs(args.model_kwargs)
    stages = {name: feature_stages(name, kwargs) for name in names}  # every model checked before any work
    torch.manual_seed(args.seed)
    results: Dict[str, List[erf_lib.StageErf]] = {}
    for name, weight in zip(names, weights):
        model = StageFeatures(build(name, weight or None, kwargs), stages[name])
        meter = erf_lib.ErfMeter(model, stages[name])
        with tqdm(total=args.images, desc=f"ERF {name}", unit="img", file=sys.stderr) as bar:
            for images, _ in eval_images(args.data, args.split, args.images, args.resolution, args.batch):
                meter.add(images)
                bar.update(len(images))
        results[name] = meter.result()
    os.makedirs(args.out, exist_ok=True)
    report = {
        "resolution": args.resolution,
        "split": args.split,
        "data": args.data,
        "model_kwargs": kwargs,
        "models": {
            name: {
                "weights": w or None,
                "images": stage_list[0].images,
                "stages": {str(e.stage + 1): e.metrics for e in stage_list},
            }
            for (name, stage_list), w in zip(results.items(), weights)
        },
    }
    with open(os.path.join(args.out, "erf.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_erf(results, os.path.join(args.out, "erf.png"), args.resolution)
    print(f"{'model':<22} stage  side@0.5 area@0.5 side@0.75 area@0.75 side(mean) area(mean)")
    for name, stage_list in results.items():
        for e in stage_list:
            m = e.metrics
            print(
                f"{name:<22} {e.stage + 1:>5}  {m['side_0.5']:>8} {m['area_0.5']:>8.3f} {m['side_0.75']:>9} "
                f"{m['area_0.75']:>9.3f} {m['side_mean']:>10.1f} {m['area_mean']:>10.3f}"
            )
    print(
        f"wrote {os.path.join(args.out, 'erf.json')} and {os.path.join(args.out, 'erf.png')} "
        f"({results[names[0]][0].images} images at {args.resolution} px)"
    )
    return 0


def class_name(synset: str) -> str:
    """``n01440764 tench`` (timm's ImageNet descriptions; the synset alone when unknown)."""
    from timm.data import ImageNetInfo

    try:
        return f"{synset} {ImageNetInfo('imagenet-22k').label_name_to_description(synset).split(',')[0]}"
    except (KeyError, ValueError, IndexError):
        return synset


def gradcam_command(args: argparse.Namespace) -> int:
    import torch

    from conv2former.analysis.gradcam import grad_cam, overlays, target_layer_name
    from conv2former.analysis.models import build, parse_model_kwargs
    from conv2former.analysis.plots import plot_grid
    from conv2former.config import DataConfig
    from conv2former.data.eval_crop import eval_crop, recipe_for
    from conv2former.data.shard_format import read_classes

    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    model = build(args.model, args.weights, parse_model_kwargs(args.model_kwargs))
    classes = read_classes(args.data)
    if model.num_classes != len(classes):
        raise UserError(
            f"{args.weights} has {model.num_classes} classes, the data {len(classes)}: give the data the "
            "model was trained on"
        )
    crop_pct, crop_mode = eval_crop(recipe_for(args.resolution))
    batches = list(eval_images(args.data, args.split, args.images, args.resolution, args.images, crop_pct, crop_mode))
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches]).tolist()
    result = grad_cam(model, images)
    defaults = DataConfig()
    pictures = overlays(images, result.maps, defaults.mean, defaults.std)
    captions = [
        f"true {class_name(classes[t])}\npred {class_name(classes[p])}" for t, p in zip(labels, result.predicted)
    ]
    os.makedirs(args.out, exist_ok=True)
    plot_grid(
        pictures,
        captions,
        os.path.join(args.out, "gradcam.png"),
        f"Grad-CAM of {args.model} at {result.layer} ({args.resolution} px, predicted class)",
    )
    report = {
        "model": args.model,
        "weights": args.weights,
        "layer": target_layer_name(model),
        "split": args.split,
        "images": [{"true": classes[t], "predicted": classes[p]} for t, p in zip(labels, result.predicted)],
    }
    with open(os.path.join(args.out, "gradcam.json"), "w") as f:
        json.dump(report, f, indent=1)
    correct = sum(t == p for t, p in zip(labels, result.predicted))
    print(
        f"wrote {os.path.join(args.out, 'gradcam.png')}: {len(labels)} images, target layer {result.layer}, "
        f"{correct} predicted correctly"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conv2former.analysis", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    erf = sub.add_parser("erf", help="effective receptive field per stage (Table 5, Fig. 4)")
    erf.add_argument("--model", required=True, help="timm model name(s), comma-separated: conv2former_t,convnext_tiny")
    erf.add_argument("--weights", help="weights per model, comma-separated (empty: initialisation)")
    erf.add_argument(
        "--model-kwargs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a timm.create_model keyword for every model, e.g. kernel_size=21 (repeatable)",
    )
    erf.add_argument("--data", required=True, help="shard root (data_prep/shard.py output)")
    erf.add_argument("--split", default="val")
    erf.add_argument("--images", type=int, default=50)
    erf.add_argument("--resolution", type=int, default=1024, help="input side in pixels (the paper uses 1024)")
    erf.add_argument("--batch", type=int, default=4, help="images decoded at a time")
    erf.add_argument("--seed", type=int, default=0, help="initialisation seed when no weights are given")
    erf.add_argument("--out", required=True, help="folder for erf.json and erf.png")
    erf.set_defaults(run=erf_command)
    cam = sub.add_parser("gradcam", help="Grad-CAM overlays with predicted and true classes (Fig. 6)")
    cam.add_argument("--model", required=True, help="the timm model name the weights belong to")
    cam.add_argument("--weights", required=True, help="model.safetensors, export dir, run dir, DeepSpeed dir or .pth")
    cam.add_argument("--model-kwargs", action="append", default=[], metavar="KEY=VALUE")
    cam.add_argument("--data", required=True, help="shard root whose classes.txt the model's head follows")
    cam.add_argument("--split", default="val")
    cam.add_argument("--images", type=int, default=16)
    cam.add_argument("--resolution", type=int, default=224, help="the eval transform of that size (as evaluate.py)")
    cam.add_argument("--out", required=True, help="folder for gradcam.png and gradcam.json")
    cam.set_defaults(run=gradcam_command)
    return parser


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # the depthwise formulations measured fastest on this CPU, as training
        from conv2former.cpu import CpuTuning

        CpuTuning.install()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
