"""A run's export folder, in timm's own format, and its ONNX form.

``OUTPUT/export/`` holds:

* ``model.safetensors``: consolidated fp32 weights with the official key names;
* ``model_ema.safetensors``: the EMA's weights, when the run kept an EMA;
* ``classes.txt``: the synsets in head order;
* ``config.yaml``: the run's whole configuration;
* ``evaluation.json``: the run's last evaluation and its best one (top-1, top-5, epochs completed, step);
* ``config.json``: timm's model config, written by timm's own ``save_config_for_hf``: ``architecture``,
  ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (e.g. ``kernel_size``), ``label_names`` (from
  classes.txt) and a ``pretrained_cfg`` whose input size, crop and normalisation are the eval transform of the stage
  that made the weights;
* ``model.onnx`` and ``onnx.json`` after ``launch/export.py RUN_DIR --onnx``.

So after ``import conv2former``, ``timm.create_model("local-dir:OUTPUT/export", pretrained=True)`` builds the exact
model with these weights, ``timm.data.resolve_data_config({}, model=model)`` gives the stage's eval transform, and
the folder is what ``timm.models.push_to_hf_hub`` uploads (docs/export.md). ``OUTPUT/export/best/`` (fine-tuning,
``checkpoint.keep_best``) has the same layout and holds the weights of the best evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

from conv2former.errors import UserError

__all__ = ["write_export", "write_timm_config", "model_from_export", "require_onnx", "export_onnx", "ONNX_EXTRA"]

ONNX_EXTRA = "onnx"
"""The pip extra that installs the ONNX exporter and runtime: ``pip install -e '.[onnx]'``."""


def _fp32_cpu(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu() for k, v in state.items()
    }


def write_export(
    run_dir: str,
    model_state: Mapping[str, torch.Tensor],
    classes: List[str],
    config: Dict[str, Any],
    ema_state: Optional[Mapping[str, torch.Tensor]] = None,
    evaluation: Optional[Dict[str, Any]] = None,
    folder: str = "export",
) -> str:
    """Write ``run_dir/<folder>/`` (``export`` or ``export/best``; see the module docstring) and return its path."""
    out = os.path.join(run_dir, folder)
    os.makedirs(out, exist_ok=True)
    save_file(_fp32_cpu(model_state), os.path.join(out, "model.safetensors"))
    if ema_state is not None:
        save_file(_fp32_cpu(ema_state), os.path.join(out, "model_ema.safetensors"))
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("".join(f"{c}\n" for c in classes))
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    write_timm_config(os.path.join(out, "config.json"), config, classes)
    if evaluation is not None:
        with open(os.path.join(out, "evaluation.json"), "w") as f:
            json.dump(evaluation, f, indent=1)
    return out


def write_timm_config(path: str, config: Dict[str, Any], classes: List[str]) -> None:
    """timm's ``config.json`` for the model a run's ``config`` (``to_dict(TrainConfig)``) describes.

    The model is built on the meta device (no memory, no initialisation), so this costs milliseconds even for
    Conv2Former-L; timm's ``save_config_for_hf`` then writes exactly what timm's own exports hold.
    """
    import timm
    from timm.models._hub import save_config_for_hf

    import conv2former.model  # noqa: F401  (registers the variants)

    model_cfg, data = config["model"], config["data"]
    model_args = {"kernel_size": model_cfg["kernel_size"]} if model_cfg.get("kernel_size") else {}
    with torch.device("meta"):
        model = timm.create_model(model_cfg["variant"], num_classes=len(classes), **model_args)
    size = int(data["image_size"])
    data_config = {
        "input_size": (3, size, size),
        "crop_pct": float(data["crop_pct"]),
        "crop_mode": data["crop_mode"],
        "interpolation": "bicubic",
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
    }
    save_config_for_hf(
        model,
        path,
        model_args=model_args,
        data_config=data_config,
        model_config={"label_names": list(classes), "pretrained_cfg": {"tag": config.get("stage", "")}},
    )


def model_from_export(folder: str) -> nn.Module:
    """``timm.create_model("local-dir:" + folder, pretrained=True)``, with one-line errors for a folder that is not
    an export (no config.json, no weights) or whose config.json describes another model than its weights."""
    import timm

    import conv2former.model  # noqa: F401

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(
            f"{folder} has no config.json: it is not a timm export folder (re-export it with "
            "python launch/export.py RUN_DIR, which writes config.json beside model.safetensors)"
        )
    try:
        with open(config_path) as f:
            architecture = json.load(f)["architecture"]
    except (ValueError, KeyError) as err:
        raise UserError(f"{config_path} is not a timm model config ({type(err).__name__}: {err})") from None
    if not timm.is_model(architecture):
        raise UserError(f"{config_path} names architecture {architecture!r}, which is not a registered model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise UserError(f"{folder} has config.json but no model.safetensors")
    return timm.create_model("local-dir:" + os.path.abspath(folder), pretrained=True)


def require_onnx() -> None:
    """A one-line ``UserError`` naming the extra when the ONNX exporter or runtime is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"ONNX export needs the package {err.name}, which is not installed: install the "
            f"'{ONNX_EXTRA}' extra (pip install -e '.[{ONNX_EXTRA}]')"
        ) from None


def export_onnx(model: nn.Module, path: str, images: torch.Tensor, opset: int) -> Dict[str, Any]:
    """Write ``model`` to ``path`` as ONNX (batch dimension dynamic) with timm's exporter (the torch.export-based
    one), run it with onnxruntime on ``images`` and compare with PyTorch. Returns the comparison."""
    require_onnx()
    from timm.utils.onnx import onnx_export, onnx_forward

    model = model.eval()
    onnx_export(model, path, example_input=images[:2], opset=opset, use_dynamo=True, check=True)
    with torch.no_grad():
        expected = model(images).float()
    got = torch.from_numpy(onnx_forward(path, images))
    diff = (got - expected).abs().max().item()
    return {
        "file": os.path.basename(path),
        "opset": opset,
        "dynamic_axes": {"input0": ["batch"]},
        "images": int(images.shape[0]),
        "input_size": list(images.shape[1:]),
        "max_abs_diff": diff,
        "max_abs_logit": expected.abs().max().item(),
        "top1_agreement": (got.argmax(1) == expected.argmax(1)).float().mean().item(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
    }
