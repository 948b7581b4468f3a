"""Grad-CAM maps (paper Fig. 6) with the ``grad-cam`` package (pytorch-grad-cam), for any timm classifier.

Target layer: the model's last feature stage as timm's ``feature_info`` names it (``stages.3`` for Conv2Former
and ConvNeXt, the last block for isotropic models): the last spatial map before the head, so the map has the
resolution of the last stage (input / 32 for hierarchical models) upsampled to the input. The class explained is
the model's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from conv2former.errors import UserError


def _require_grad_cam() -> Any:
    try:
        import pytorch_grad_cam
    except ImportError:
        raise UserError(
            "Grad-CAM needs the grad-cam package: install the 'analysis' extra (pip install -e '.[analysis]')"
        ) from None
    return pytorch_grad_cam


def target_layer_name(model: nn.Module) -> str:
    """The module of the model's last feature stage (timm ``feature_info``)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__} has no timm feature_info: cannot choose a Grad-CAM target layer")
    last = info[-1]
    return last["module"] if isinstance(last, dict) else info.module_name()[-1]


@dataclass
class CamResult:
    maps: np.ndarray  # (N, H, W) in [0, 1], upsampled to the input
    predicted: List[int]
    layer: str


def grad_cam(model: nn.Module, images: torch.Tensor, layer: Optional[str] = None) -> CamResult:
    """Grad-CAM of each image's predicted class at ``layer`` (default: ``target_layer_name(model)``)."""
    cam_lib = _require_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer or target_layer_name(model)
    model = model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    with cam_lib.GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in predicted])
    return CamResult(np.asarray(maps), predicted, layer)


def _fit(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    from PIL import Image

    if mask.shape == tuple(shape):
        return mask
    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
        > 0
    )


def heat_inside(cam_map: np.ndarray, mask: np.ndarray) -> float:
    """The share of a map's heat that falls on the object's pixels (``mask`` resized to the map)."""
    mask = _fit(mask, cam_map.shape)
    total = float(cam_map.sum())
    return float(cam_map[mask].sum()) / total if total > 0 else 0.0


def heat_ratio(cam_map: np.ndarray, mask: np.ndarray) -> float:
    """Mean heat per object pixel over mean heat per background pixel: above 1, the map prefers the object."""
    mask = _fit(mask, cam_map.shape)
    if mask.all() or not mask.any():
        return float("nan")
    outside = float(cam_map[~mask].mean())
    return float(cam_map[mask].mean()) / outside if outside > 0 else float("inf")


def overlays(images: torch.Tensor, maps: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> List[np.ndarray]:
    """The input images (un-normalised, RGB 0-1) with their maps blended over them (pytorch-grad-cam's colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = images.detach().cpu().float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    pictures = rgb.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [show_cam_on_image(img, cam_map, use_rgb=True) for img, cam_map in zip(pictures, maps)]
