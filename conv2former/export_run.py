"""The export stage, as ``launch/export.py`` runs it: ``OUTPUT/export/`` written from a run's newest complete
checkpoint (a run stopped or preempted before its own export), a bare export's config.json refreshed, a remote run
exported in its staging folder and uploaded back, and the ONNX export checked with onnxruntime on real eval images."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from conv2former.errors import UserError

ONNX_TOLERANCE = 1e-3
"""Largest accepted |onnxruntime - PyTorch| of a logit, relative to the largest logit (at least 1): fp32 kernels
that sum in another order differ by ~1e-6 here; a wrong graph differs by whole units."""


def export_from_checkpoint(run_dir: str) -> str:
    """Write run_dir/export/ from the newest complete checkpoint; refresh config.json of a bare export folder."""
    import torch
    import yaml

    from conv2former.engine.checkpoint_layout import CHECKPOINTS, complete_tags
    from conv2former.export import write_export, write_timm_config
    from conv2former.weights import read_weights

    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    tags = complete_tags(ckpt_dir)
    export_dir = os.path.join(run_dir, "export")
    if not tags:
        config_yaml, classes_txt = os.path.join(export_dir, "config.yaml"), os.path.join(export_dir, "classes.txt")
        if os.path.isfile(config_yaml) and os.path.isfile(classes_txt):
            with open(config_yaml) as f:
                config = yaml.safe_load(f)
            with open(classes_txt) as f:
                classes = [line.strip() for line in f if line.strip()]
            write_timm_config(os.path.join(export_dir, "config.json"), config, classes)
            print(f"no complete checkpoint in {run_dir}: kept the weights in {export_dir}, wrote its config.json")
            return export_dir
        raise UserError(f"{run_dir} holds no complete checkpoint under checkpoints/ and no export/ to complete")
    tag_dir = os.path.join(ckpt_dir, tags[-1])
    weights = read_weights(tag_dir)
    states = [f for f in sorted(os.listdir(tag_dir)) if f.endswith("model_states.pt")]
    client = torch.load(os.path.join(tag_dir, states[0]), map_location="cpu", weights_only=True)
    out = write_export(
        run_dir,
        weights.state_dict,
        client.get("classes") or weights.classes or [],
        client.get("config") or {},
        client.get("ema"),
    )
    print(f"exported {tags[-1]} to {out}")
    return out


def eval_images(export_dir: str, data_root: str | None, split: str, count: int) -> Any:
    """The first ``count`` images of the split, through the stage's own eval transform."""
    import torch
    import yaml

    from conv2former.config import DataConfig
    from conv2former.data.loader import first_eval_images

    with open(os.path.join(export_dir, "config.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    cfg = DataConfig(
        root=data_root or data["root"],
        image_size=data["image_size"],
        batch_size=count,
        crop_pct=data["crop_pct"],
        crop_mode=data["crop_mode"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
    )
    try:
        return torch.cat([images for images, _ in first_eval_images(cfg, split, count)])
    except UserError as err:
        raise UserError(f"{err} (the ONNX check reads eval images of the run's data: pass --data ROOT)") from None


def export_onnx_checked(export_dir: str, data: Optional[str], split: str, images: int, opset: int) -> Dict[str, Any]:
    """export/model.onnx and export/onnx.json, the ONNX model compared with PyTorch on ``images`` eval images of
    ``split`` (of ``data``, default the run's own data root); a one-line error when they disagree."""
    from conv2former.export import export_onnx, model_from_export

    model = model_from_export(export_dir)
    batch = eval_images(export_dir, data, split, images)
    result = export_onnx(model, os.path.join(export_dir, "model.onnx"), batch, opset)
    result["split"] = split
    with open(os.path.join(export_dir, "onnx.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{result['file']}: opset {result['opset']}, dynamic batch; onnxruntime vs PyTorch on {result['images']} "
        f"{split} images at {result['input_size'][-1]} px: max abs diff {result['max_abs_diff']:.2e} "
        f"(logits up to {result['max_abs_logit']:.2f}), top-1 agreement {100 * result['top1_agreement']:.0f}%"
    )
    if result["max_abs_diff"] > ONNX_TOLERANCE * max(1.0, result["max_abs_logit"]):
        raise UserError(
            f"the ONNX model disagrees with PyTorch (max abs diff {result['max_abs_diff']:.3g}): "
            f"do not use {os.path.join(export_dir, 'model.onnx')}; report it with onnx.json attached"
        )
    return result


def export_remote_run(run_url: str, staging_dir: Optional[str], onnx: Optional[Dict[str, Any]] = None) -> str:
    """A run whose --output was a bucket: its newest complete checkpoint (and files) brought into the staging folder
    as a relaunch would, exported there, the export uploaded back."""
    from conv2former.engine.run_output import RunOutput

    output = RunOutput(run_url, staging_dir, rank=0, local_rank=0)
    output.restore()
    export_dir = export_from_checkpoint(output.local)
    if onnx is not None:  # export_onnx_checked's keyword arguments
        export_onnx_checked(export_dir, **onnx)
    problem = output.push_files()
    if problem:
        failed = problem.replace("warning: ", "", 1).replace(": retried at the next checkpoint", "")
        raise UserError(f"{failed}: check the bucket and its credentials, then run this again")
    shown = str(output.shown(export_dir))
    print(f"uploaded to {shown}")
    return shown
