"""The Conv2Former model: official structure and names, paper sizes, timm interface, ablation knobs."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from official_reference import RefConv2Former
from timm.optim import param_groups_layer_decay

import conv2former  # noqa: F401  (registers the variants with timm)
from conv2former.complexity import count_gmacs, count_params
from conv2former.model import FUSIONS, PAPER_FIGURES, VARIANTS

HIERARCHICAL = [
    "conv2former_n",
    "conv2former_t",
    "conv2former_s",
    "conv2former_b",
    "conv2former_b_22k",
    "conv2former_l",
]
ISOTROPIC = ["conv2former_is", "conv2former_is_convs", "conv2former_ib", "conv2former_ib_convs"]


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BN statistic non-trivial values (layer scales included), so blocks matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif "layer_scale" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("name", HIERARCHICAL + ISOTROPIC)
def test_params_and_macs_match_the_paper(name):
    model = meta_model(name)
    paper_params, paper_224, paper_384 = PAPER_FIGURES[name]
    params = count_params(model) / 1e6
    macs_224 = count_gmacs(model, 224)
    if name in ISOTROPIC:
        assert params == pytest.approx(paper_params, rel=0.05)
        assert macs_224 == pytest.approx(paper_224, rel=0.05)
        return
    assert params == pytest.approx(paper_params, rel=0.02)
    # N's 2.2G is rounded down in the paper; every other figure matches to 1%.
    assert macs_224 == pytest.approx(paper_224, rel=0.06 if name == "conv2former_n" else 0.01)
    if paper_384 is not None:
        assert count_gmacs(model, 384) == pytest.approx(paper_384, rel=0.01)


def test_meta_counting_equals_real_counting():
    real = timm.create_model("conv2former_demo")
    assert count_gmacs(real, 96) == pytest.approx(count_gmacs(meta_model("conv2former_demo"), 96))
    assert count_params(real) == count_params(meta_model("conv2former_demo"))


@pytest.mark.parametrize("name", HIERARCHICAL + ["conv2former_demo"])
def test_state_dict_names_follow_the_official_scheme(name):
    spec = VARIANTS[name]
    dims, depths, k = spec["dims"], spec["depths"], spec["kernel_size"]
    sd = meta_model(name, num_classes=21841).state_dict()
    half = dims[0] // 2
    expected_shapes = {
        "downsample_layers.0.0.weight": (half, 3, 3, 3),
        "downsample_layers.0.2.running_mean": (half,),
        "downsample_layers.0.3.weight": (half, half, 3, 3),
        "downsample_layers.0.5.num_batches_tracked": (),
        "downsample_layers.0.6.weight": (dims[0], half, 2, 2),
        "downsample_layers.1.0.weight": (dims[0],),
        "downsample_layers.3.1.weight": (dims[3], dims[2], 2, 2),
        "downsample_layers.3.1.bias": (dims[3],),
        "stages.0.0.layer_scale_1": (dims[0],),
        "stages.0.0.attn.norm.weight": (dims[0],),
        "stages.0.0.attn.att.0.weight": (dims[0], dims[0], 1, 1),
        f"stages.2.{depths[2] - 1}.attn.att.2.weight": (dims[2], 1, k, k),
        f"stages.2.{depths[2] - 1}.attn.att.2.bias": (dims[2],),
        "stages.1.0.attn.v.weight": (dims[1], dims[1], 1, 1),
        "stages.1.0.attn.proj.bias": (dims[1],),
        "stages.3.0.mlp.norm.bias": (dims[3],),
        "stages.3.0.mlp.fc1.weight": (4 * dims[3], dims[3], 1, 1),
        "stages.3.0.mlp.pos.weight": (4 * dims[3], 1, 3, 3),
        "stages.3.0.mlp.fc2.weight": (dims[3], 4 * dims[3], 1, 1),
        f"stages.3.{depths[3] - 1}.layer_scale_2": (dims[3],),
        "head.0.weight": (1280, dims[3], 1, 1),
        "head.2.weight": (1280,),
        "pred.weight": (21841, 1280),
        "pred.bias": (21841,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # The stem convolutions have no biases; nothing else exists beyond the official modules.
    assert not any(re.match(r"downsample_layers\.0\.[036]\.bias", key) for key in sd)
    assert {key.split(".")[0] for key in sd} == {"downsample_layers", "stages", "head", "pred"}
    for i, depth in enumerate(depths):
        assert f"stages.{i}.{depth - 1}.layer_scale_1" in sd and f"stages.{i}.{depth}.layer_scale_1" not in sd


def test_layer_scale_and_init_follow_the_paper():
    model = timm.create_model("conv2former_demo")
    assert torch.all(model.stages[0][0].layer_scale_1 == 1e-6)
    assert torch.all(model.stages[0][0].attn.att[0].bias == 0)
    std = model.stages[2][1].mlp.fc1.weight.std().item()
    assert 0.015 < std < 0.025  # trunc_normal(std=0.02)


@pytest.mark.parametrize("dims,depths,k", [((16, 32, 64, 128), (1, 1, 2, 1), 7), ((24, 48, 96, 192), (2, 1, 3, 1), 11)])
def test_outputs_match_the_official_formulation(dims, depths, k):
    ref = randomize(RefConv2Former(dims, depths, k, num_classes=10)).eval()
    ours = timm.create_model("conv2former_demo", dims=dims, depths=depths, kernel_size=k, num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            ours(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4
        )
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs


def test_timm_create_model_with_pretrained_cfg_keywords():
    model = meta_model("conv2former_l", num_classes=21841, drop_path_rate=0.1)
    assert model.num_classes == 21841 and model.pretrained_cfg["classifier"] == "pred"
    blocks = [b for stage in model.stages for b in stage]
    assert blocks[0].drop_path.__class__.__name__ == "Identity"
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    for name in VARIANTS:
        assert name in timm.list_models("conv2former_*")


@pytest.mark.parametrize("resolution", [224, 384])
def test_forward_shapes(resolution):
    model = timm.create_model("conv2former_n", num_classes=7).eval()
    x = torch.randn(1, 3, resolution, resolution)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 512, resolution // 32, resolution // 32)
        assert model.forward_head(feats, pre_logits=True).shape == (1, 1280)
        assert model(x).shape == (1, 7)


@pytest.mark.parametrize("name", ISOTROPIC[:2])
def test_isotropic_forward(name):
    model = timm.create_model(name, num_classes=5, dim=64, depth=2).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 64, 14, 14)
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_builds_runs_and_trains(fusion):
    model = randomize(timm.create_model("conv2former_demo", num_classes=4, fusion=fusion))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.stages[0][0].attn.att[2].weight.grad.abs().sum() > 0


def test_fusions_compute_different_functions():
    x = torch.randn(2, 3, 64, 64)
    base = randomize(timm.create_model("conv2former_demo", num_classes=4)).eval()
    outputs = {}
    for fusion in FUSIONS:
        model = timm.create_model("conv2former_demo", num_classes=4, fusion=fusion).eval()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            outputs[fusion] = model(x)
    for a in FUSIONS:
        for b in FUSIONS:
            if a < b:
                assert not torch.allclose(outputs[a], outputs[b]), (a, b)


def test_linear01_weights_lie_in_zero_one():
    from conv2former.model import _fuse

    a = torch.randn(2, 3, 5, 5) * 10
    w = _fuse(a, torch.ones_like(a), "linear01")
    assert (w > 0).all() and (w <= 1).all() and torch.allclose(w.amax((2, 3)), torch.ones(2, 3))


@pytest.mark.parametrize("kernel_size", [5, 7, 9, 11, 15, 21])
def test_kernel_size_override(kernel_size):
    model = timm.create_model("conv2former_t", kernel_size=kernel_size, dims=(8, 16, 32, 64), depths=(1, 1, 1, 1))
    assert model.stages[3][0].attn.att[2].weight.shape[-1] == kernel_size
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_bad_model_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown fusion 'mul'"):
        timm.create_model("conv2former_demo", fusion="mul")
    with pytest.raises(ValueError, match="positive odd"):
        timm.create_model("conv2former_demo", kernel_size=4)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize(timm.create_model("conv2former_demo", num_classes=3)).train()
    x = torch.randn(2, 3, 64, 64)

    def grads(checkpointing: bool):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_features_of_the_four_stages():
    features = timm.create_model("conv2former_demo", features_only=True)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [16, 32, 64, 128]
    outs = features(torch.randn(1, 3, 128, 128))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]
    assert [o.shape[1] for o in outs] == [16, 32, 64, 128]
    model = timm.create_model("conv2former_demo").eval()
    final, inters = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    assert len(inters) == 4 and torch.equal(final, inters[-1])
    assert [
        t.shape[-1]
        for t in model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1, 2], intermediates_only=True)
    ] == [8, 4]


def test_classifier_interface():
    model = timm.create_model("conv2former_demo", num_classes=10)
    assert model.get_classifier() is model.pred
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_group_matcher_orders_stem_blocks_head_for_layer_decay():
    model = timm.create_model("conv2former_demo", num_classes=10)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    named = dict(model.named_parameters())
    stem = scale_of[id(named["downsample_layers.0.0.weight"])]
    first_block = scale_of[id(named["stages.0.0.attn.v.weight"])]
    last_block = scale_of[id(named["stages.3.0.mlp.fc2.weight"])]
    head = scale_of[id(named["head.0.weight"])]
    assert scale_of[id(named["pred.weight"])] == head == 1.0
    assert stem < first_block < last_block < head
    # the downsample before a stage shares the group of that stage's first block
    assert scale_of[id(named["downsample_layers.2.1.weight"])] == scale_of[id(named["stages.2.0.attn.v.weight"])]
    # 1-D parameters (norms, biases, layer scales) get no weight decay
    for group in groups:
        if any(p is named["stages.1.0.layer_scale_1"] for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_table_cli_prints_every_requested_variant(capsys):
    from conv2former.complexity import main

    main(["--table", "--variants", "conv2former_t", "conv2former_demo"])
    out = capsys.readouterr().out
    assert "| conv2former_t | 26.70 | 27 | 4.36 | 4.4 |" in out and "conv2former_demo" in out
    with pytest.raises(SystemExit):
        main(["--variants", "conv2former_xl"])


def test_stem_batchnorm_runs_in_fp32_under_deepspeed_style_bf16():
    """DeepSpeed's bf16 mode casts parameters, not buffers: the stem BatchNorm still works and keeps fp32 statistics."""
    from conv2former.model import BatchNorm2dFP32

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 6, 8, 8, generator=gen) * 3 + 1
    ours, plain = BatchNorm2dFP32(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5, generator=gen)
        plain.bias.uniform_(-1, 1, generator=gen)
    ours.load_state_dict(plain.state_dict(), strict=True)
    expected = plain(x.bfloat16().float())
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()  # as DeepSpeed does
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16 and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_mean, plain.running_mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, plain.running_var, rtol=1e-2, atol=1e-2)
    assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked) == 1
    ours.eval(), plain.eval()
    torch.testing.assert_close(ours(x.bfloat16()).float(), plain(x.bfloat16().float()), rtol=2e-2, atol=3e-2)
    # fp32 in, fp32 parameters: exactly nn.BatchNorm2d
    fresh, reference = BatchNorm2dFP32(6), torch.nn.BatchNorm2d(6)
    torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=0)


def test_cast_like_engine_is_the_one_bf16_cast_and_model_to_bf16_breaks_the_stem():
    """The defect the GPU checklist would have met first: ``model.to(torch.bfloat16)`` casts the stem BatchNorm's
    running statistics too, and the fp32 BatchNorm then fails; ``cast_like_engine`` (what DeepSpeed's bf16 mode does:
    parameters only) trains and evaluates, and is what the benchmarks, the GPU tests and the memory planner use."""
    from conv2former.engine.precision import cast_like_engine

    x = torch.randn(2, 3, 64, 64).bfloat16()
    broken = timm.create_model("conv2former_demo", num_classes=10).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="expected scalar type Float but found BFloat16"):
        broken.eval()(x)
    model = cast_like_engine(timm.create_model("conv2former_demo", num_classes=10), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    model.train()(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
    assert model.eval()(x).dtype == torch.bfloat16


def test_timm_model_attributes_and_a_reset_head_on_the_models_device_dtype_and_mode():
    """What timm's own tests/test_models.py reads (tests/test_timm_own_tests.py runs it): ``in_chans``, a classifier
    rebuilt by ``reset_classifier`` on the model's device, in its dtype and train/eval mode, and isotropic variants
    offering their last three blocks as features (as timm's plain ViTs do)."""
    for name in ("conv2former_demo", "conv2former_is"):
        model = timm.create_model(name, in_chans=1, device="meta").eval().to(torch.float64)
        assert model.in_chans == 1
        model.reset_classifier(7)
        head = model.get_classifier()
        assert head.weight.device.type == "meta" and head.weight.dtype == torch.float64 and not head.training
    features = timm.create_model("conv2former_is", features_only=True, device="meta")
    assert features.feature_info.module_name() == ["blocks.15", "blocks.16", "blocks.17"]
