"""Build the models an analysis compares: any timm model with feature maps, Conv2Former weights from any of our
sources, ablation keywords (``--model-kwargs kernel_size=21``)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Sized, cast

import timm
import torch
import torch.nn as nn
import yaml

import conv2former  # noqa: F401  (registers the variants)
from conv2former.errors import UserError


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``["kernel_size=21", "fusion=sum"]`` -> keywords for ``timm.create_model`` (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--model-kwargs {item!r}: expected key=value, e.g. kernel_size=21")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def feature_stages(name: str, kwargs: Dict[str, Any]) -> List[int]:
    """The stage indices timm's ``features_only`` offers for ``name``; a one-line error if it offers none."""
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}: give a timm model name (conv2former_t, convnext_tiny, ...)")
    try:
        with torch.device("meta"):
            features = timm.create_model(name, features_only=True, **kwargs)
    except UserError:
        raise
    except Exception as err:  # timm raises several types for models without feature support or bad keywords
        raise UserError(f"{name} cannot give per-stage feature maps (timm features_only: {str(err)[:120]})") from None
    return list(range(len(cast(Sized, features.feature_info))))


class StageFeatures(nn.Module):
    """``forward(x)`` -> the list of stage maps, through ``forward_intermediates`` (weights stay the full model's)."""

    def __init__(self, model: nn.Module, stages: Sequence[int]) -> None:
        super().__init__()
        self.model: Any = model  # (a timm model: forward_intermediates)
        self.stages = list(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.stages, intermediates_only=True)


def build(name: str, weights: Optional[str], kwargs: Dict[str, Any], log: Callable[[str], None] = print) -> nn.Module:
    """The full model in eval mode, with ``weights`` loaded (strict) when given; random initialisation otherwise."""
    kwargs = dict(kwargs)
    state = None
    if weights:
        from conv2former.weights import read_weights

        state = read_weights(weights).state_dict
        head = next((v for k, v in state.items() if k in ("pred.weight", "head.fc.weight", "fc.weight")), None)
        if head is not None:
            kwargs.setdefault("num_classes", head.shape[0])
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as err:
        raise UserError(f"{name} does not take these --model-kwargs: {err}") from None
    if state is not None:
        if name.startswith("conv2former_"):
            from conv2former.weights import check_compatible

            check_compatible(model, state, str(weights), hint="give the --model these weights belong to")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"weights {weights} do not fit {name} ({len(missing)} missing, {len(unexpected)} "
                f"unexpected tensors, e.g. {(missing + unexpected)[0]}): give the model they belong to"
            )
        log(f"{name}: loaded {weights}")
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"{name} has no forward_intermediates: timm cannot give its stage maps with these weights")
    return model.eval()
