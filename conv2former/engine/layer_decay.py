"""Layer-wise lr decay over ConvNeXt's 12 depth groups (the fine-tuning recipe the paper follows).

Hand-written because timm's ``param_groups_layer_decay`` takes one level per block from ``group_matcher`` (so
Conv2Former-L, 4+4+48+4 blocks, would give its stem 0.8^61 of the lr), and no library carries ConvNeXt's rule
(facebookresearch/ConvNeXt ``optim_factory.get_num_layer_for_convnext``):

    group 0    the stem (downsample_layers.0)
    group 1    stage 0
    group 2    downsample 1 and stage 1
    group 3    downsample 2
    3 + k*9//depth   block k of stage 2 (ConvNeXt's 3 + k//3 for its 27 blocks)
    group 12   downsample 3 and stage 3
    group 13   everything after the stages (head, pred)

with scale ``decay ** (13 - group)``: no parameter gets less than ``decay**13`` of the lr (0.8^13 = 0.055).
Isotropic variants keep timm's grouping (stem, one group per block, head).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple, cast

import torch.nn as nn
from timm.optim import param_groups_layer_decay

MIDDLE_GROUPS = 9  # groups 3..11 hold stage 2
NUM_GROUPS = 14  # 0 (stem) .. 13 (head)

_DOWNSAMPLE = re.compile(r"^downsample_layers\.(\d+)\.")
_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def depth_group(name: str, depths: Sequence[int]) -> int:
    """ConvNeXt's depth group (0..13) of the parameter ``name`` of a hierarchical model with stage ``depths``."""
    match = _DOWNSAMPLE.match(name)
    if match:
        return (0, 2, 3, 12)[int(match.group(1))]
    match = _BLOCK.match(name)
    if match:
        stage, block = int(match.group(1)), int(match.group(2))
        if stage == 2:
            return 3 + block * MIDDLE_GROUPS // depths[2]
        return {0: 1, 1: 2, 3: 12}[stage]
    return NUM_GROUPS - 1


def group_scales(decay: float) -> List[float]:
    """The lr scale of each depth group: ``decay ** (13 - group)``."""
    return [decay ** (NUM_GROUPS - 1 - g) for g in range(NUM_GROUPS)]


def param_groups_depth_decay(model: nn.Module, weight_decay: float, decay: float) -> List[Dict[str, Any]]:
    """AdamW parameter groups: one per (depth group, decay or not), each with its ``lr_scale`` (timm's schedulers
    multiply the lr by it). No weight decay for 1-D parameters and biases, as timm and ConvNeXt."""
    depths = getattr(model, "depths", None)
    if depths is None or not hasattr(model, "stages"):  # isotropic: timm's per-block grouping
        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=decay)
    scales = group_scales(decay)
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name in skip
        group = depth_group(name, depths)
        key = (group, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scales[group],
                "depth_group": group,
            }
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def scale_table(model: nn.Module, decay: float) -> List[Dict[str, Any]]:
    """Per depth group of ``model``: its scale, what it holds, and its share of the parameters (docs, --dry-run)."""
    depths = cast(Sequence[int], model.depths)
    rows: Dict[int, Dict[str, Any]] = {}
    total = sum(p.numel() for p in model.parameters())
    for name, param in model.named_parameters():
        group = depth_group(name, depths)
        row = rows.setdefault(group, {"group": group, "scale": group_scales(decay)[group], "params": 0, "names": []})
        row["params"] += param.numel()
        prefix = ".".join(name.split(".")[:3] if name.startswith("stages") else name.split(".")[:2])
        if prefix not in row["names"]:
            row["names"].append(prefix)
    for row in rows.values():
        row["share"] = row["params"] / total
    return [rows[g] for g in sorted(rows)]
