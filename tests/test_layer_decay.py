"""Layer-wise lr decay over ConvNeXt's 12 depth groups: the rule, the shares it gives Conv2Former-L, the real lrs."""

from __future__ import annotations

import pytest
import timm
import torch

import conv2former  # noqa: F401
from conv2former.config import TrainConfig
from conv2former.engine.layer_decay import depth_group, param_groups_depth_decay
from conv2former.engine.optim import Schedule, build_optimizer, build_scheduler
from conv2former.model import Conv2Former


def convnext_group(name: str) -> int:
    """ConvNeXt's optim_factory.get_num_layer_for_convnext, restated: 12 groups plus the head (13)."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return 13


def test_convnext_shaped_depths_get_convnext_scales_for_every_parameter():
    with torch.device("meta"):
        model = Conv2Former(depths=(3, 3, 27, 3), dims=(8, 16, 32, 64), num_classes=10)
    groups = param_groups_depth_decay(model, weight_decay=1e-8, decay=0.8)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("stages.2.26.") for n in names)
    for name, param in model.named_parameters():
        assert depth_group(name, model.depths) == convnext_group(name), name
        assert scale_of[id(param)] == pytest.approx(0.8 ** (13 - convnext_group(name))), name
    assert len({g["lr_scale"] for g in groups}) == 14


@pytest.mark.parametrize("variant", ["conv2former_l", "conv2former_b", "conv2former_t", "conv2former_n"])
def test_no_parameter_of_a_variant_gets_less_than_the_stems_share(variant):
    with torch.device("meta"):
        model = timm.create_model(variant, num_classes=1000)
    groups = param_groups_depth_decay(model, weight_decay=1e-8, decay=0.8)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.8**13)
    stem = [g for g in groups if g["depth_group"] == 0]
    head = [g for g in groups if g["depth_group"] == 13]
    assert stem and head and head[0]["lr_scale"] == 1.0
    # stage 2's blocks fill groups 3..11 in order, the last one in group 11
    last = depth_group(f"stages.2.{model.depths[2] - 1}.mlp.fc2.weight", model.depths)
    assert last == 11 if model.depths[2] >= 9 else last <= 11


def test_weight_decay_skips_1d_parameters_and_biases():
    model = timm.create_model("conv2former_demo", num_classes=10)
    groups = param_groups_depth_decay(model, weight_decay=0.05, decay=0.8)
    for group in groups:
        for p in group["params"]:
            assert (group["weight_decay"] == 0.0) == (p.ndim <= 1)


def test_the_optimizer_applies_the_scales_through_the_schedule():
    cfg = TrainConfig()
    cfg.optim.layer_decay = 0.8
    cfg.optim.weight_decay = 1e-8
    cfg.schedule.min_lr = 0.0
    model = timm.create_model("conv2former_demo", num_classes=10)  # depths 1, 1, 2, 1
    schedule = Schedule(1, 16, 64, 4, 40, 10, 100, 0, 5e-5, 100)
    optimizer = build_optimizer(model, cfg.optim, schedule.lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, schedule)
    named = {id(p): n for n, p in model.named_parameters()}
    for step in (0, 37, 99):
        scheduler.step_update(step)
        top = max(g["lr"] for g in optimizer.param_groups)
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert group["lr"] == pytest.approx(top * 0.8 ** (13 - depth_group(named[id(p)], model.depths)))
    assert sorted({g["depth_group"] for g in optimizer.param_groups}) == [0, 1, 2, 3, 7, 12, 13]


def test_isotropic_variants_keep_one_group_per_block():
    model = timm.create_model("conv2former_is", num_classes=10)
    groups = param_groups_depth_decay(model, weight_decay=0.05, decay=0.8)
    depth = len(model.blocks)
    assert len({g["lr_scale"] for g in groups}) == depth + 2  # stem, each block, head


def test_fresh_head_init_is_trunc_normal_002():
    """What head_init_scale multiplies: the model's own head init, trunc-normal(std 0.02) within +-2 (timm)."""
    torch.manual_seed(0)
    model = timm.create_model("conv2former_demo", num_classes=1000)
    w = model.pred.weight.detach()
    assert abs(w.std().item() - 0.02) < 0.001 and w.abs().max() <= 2.0
    assert torch.equal(model.pred.bias.detach(), torch.zeros(1000))
