"""Conv2Former as the backbone of detection and segmentation models, through the libraries people use for them:
torchvision's Mask R-CNN (an FPN over the four stages of timm's ``features_only`` model) and
segmentation_models_pytorch's UPerNet (its timm-universal encoder, ``tu-conv2former_t``), with weights from one of
our exports, and the detection recipe's layer-wise lr decay for the backbone (docs/downstream.md).

timm loads the export (``pretrained_cfg_overlay=dict(file=...)``, our ``checkpoint_filter_fn``: a wrong variant is
a one-line error); the classifier is left out, everything else must fit exactly.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import fsspec
import timm
import torch
import torch.nn as nn

from conv2former.engine.layer_decay import NUM_GROUPS, depth_group, group_scales
from conv2former.errors import UserError

__all__ = ["backbone_kwargs", "feature_backbone", "FPNBackbone", "mask_rcnn", "upernet", "backbone_param_groups"]


def _weights_file(export: str) -> str:
    """A local path of the export's model.safetensors (a remote export is copied into fsspec's cache)."""
    fs, path = fsspec.core.url_to_fs(export)
    weights = posixpath.join(path, "model.safetensors") if fs.isdir(path) else path
    if not fs.isfile(weights):
        raise UserError(f"{export} holds no model.safetensors: give an export folder (OUTPUT/export) or the file")
    if "://" not in export:
        return weights
    # same_names: the cached copy keeps its .safetensors name, which is how timm picks the reader
    return str(fsspec.open_local(f"simplecache::{fs.unstrip_protocol(weights)}", simplecache={"same_names": True}))


def _head_classes(weights_file: str) -> int:
    from safetensors import safe_open

    with safe_open(weights_file, "pt") as f:
        if "pred.weight" not in f.keys():
            raise UserError(f"{weights_file} is not a Conv2Former export (no pred.weight)")
        return int(f.get_slice("pred.weight").get_shape()[0])


def backbone_kwargs(export: Optional[str]) -> Dict[str, Any]:
    """``timm.create_model`` kwargs that load ``export``'s weights (the head is built at its size, then dropped by
    ``features_only``); {} for a randomly initialised backbone."""
    if export is None:
        return {}
    weights = _weights_file(export)
    return {"pretrained_cfg_overlay": {"file": weights}, "num_classes": _head_classes(weights)}


def feature_backbone(
    variant: str, export: Optional[str] = None, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs: Any
) -> nn.Module:
    """timm's ``features_only`` Conv2Former: a list of stage outputs (NCHW, strides 4/8/16/32)."""
    import conv2former.model  # noqa: F401  (registers the variants)

    weights = backbone_kwargs(export)
    return timm.create_model(
        variant, features_only=True, out_indices=tuple(out_indices), pretrained=bool(weights), **weights, **kwargs
    )


class FPNBackbone(nn.Module):
    """torchvision's ``BackboneWithFPN`` over a ``features_only`` model (whose stages are not top-level children,
    which torchvision's IntermediateLayerGetter needs): the stage outputs go through torchvision's
    FeaturePyramidNetwork with its extra max-pooled level, keyed "0".."3" and "pool" as Mask R-CNN expects."""

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = body
        channels: List[int] = getattr(body, "feature_info").channels()
        self.fpn = FeaturePyramidNetwork(channels, out_channels=out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def mask_rcnn(variant: str, num_classes: int, export: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """torchvision's ``MaskRCNN`` (num_classes counts the background) on a Conv2Former FPN backbone; kwargs go to
    MaskRCNN (e.g. ``min_size``, ``max_size``)."""
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN(FPNBackbone(feature_backbone(variant, export)), num_classes=num_classes, **kwargs)


def upernet(variant: str, classes: int, export: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """segmentation_models_pytorch's ``UPerNet`` with the ``tu-<variant>`` encoder (the ``segmentation`` extra)."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise UserError("UPerNet needs segmentation_models_pytorch: pip install -e '.[segmentation]'") from None
    import conv2former.model  # noqa: F401

    weights = backbone_kwargs(export)
    return smp.UPerNet(f"tu-{variant}", encoder_weights=True if weights else None, classes=classes, **weights, **kwargs)


def backbone_param_groups(
    model: nn.Module, backbone: nn.Module, weight_decay: float, decay: float, lr: Optional[float] = None
) -> List[Dict[str, Any]]:
    """AdamW groups for a detector or segmenter: the backbone's parameters by ConvNeXt's 14 depth groups with
    ``lr_scale = decay ** (13 - group)`` (ConvNeXt's detection recipe: ``decay_type='layer_wise'``), every other
    parameter (FPN, decoder, heads) at the full lr. No weight decay on 1-D parameters and biases. timm's schedulers
    apply ``lr_scale``; with ``lr`` each group also gets ``lr * lr_scale`` as its ``lr``, for a plain torch
    optimizer."""
    depths = getattr(getattr(backbone, "model", backbone), "depths", None)
    if depths is None:
        raise UserError("backbone_param_groups: the backbone is not a hierarchical Conv2Former (no stage depths)")
    inside = {id(p): name for name, p in backbone.named_parameters()}
    scales = group_scales(decay)
    groups: Dict[Any, Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        own = inside.get(id(param))
        group = NUM_GROUPS - 1 if own is None else depth_group(own.removeprefix("model."), depths)
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        key = (group, no_decay, own is None)
        entry = groups.setdefault(
            key,
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": 1.0 if own is None else scales[group],
                "depth_group": group,
                "backbone": own is not None,
            },
        )
        entry["params"].append(param)
        if lr is not None:
            entry["lr"] = lr * entry["lr_scale"]
    return [groups[k] for k in sorted(groups)]
