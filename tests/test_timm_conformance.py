"""What our variants promise beyond what timm's own tests/test_models.py checks (tests/test_timm_own_tests.py runs
that file): exact values where timm checks shapes, and behaviours specific to Conv2Former.

Models: the demo variant (hierarchical) and a real isotropic one (IS), at small inputs to stay fast; the cfg test covers every variant.
Covered: the classifier interface (reset_classifier(0), reset_classifier(0, '') and
global_pool='' at creation, pre_logits), cfg names, TorchScript, features_only, forward_intermediates, torch.fx
tracing forward and backward (torchvision's feature extractor and timm's FX feature path), FX + TorchScript.
The fast CPU depthwise backward and grad checkpointing stay in traced graphs.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import set_scriptable
from torchvision.models.feature_extraction import create_feature_extractor

import conv2former  # noqa: F401
from conv2former.depthwise import depthwise_conv2d

MODELS = {"conv2former_demo": 64, "conv2former_is": 64}  # the demo and one real variant, as the issue asks


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def sample(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, MODELS[name], MODELS[name])


def spatial(name: str, model) -> int:
    return MODELS[name] // model.feature_info[-1]["reduction"]


# Every parameter reached by the backward pass: timm's own test_model_backward checks it (tests/test_timm_own_tests.py).


@pytest.mark.parametrize("name", MODELS)
def test_classifier_interface_and_cfg_names(name):
    model = make(name)
    x = sample(name)
    side = spatial(name, model)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, side, side)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.shape == (2, model.head_hidden_size, side, side)
        torch.testing.assert_close(unpooled.mean((2, 3)), pre)  # the pooling is all that was removed
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5)
        made = make(name, num_classes=0, global_pool="")
        assert made(x).shape == (2, made.head_hidden_size, side, side)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, "max")
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    assert cfg["pool_size"] == (224 // model.feature_info[-1]["reduction"],) * 2


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager(name):
    with set_scriptable(True):
        model = make(name)
    scripted = torch.jit.script(model)
    x = sample(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_forward_intermediates_agree(name):
    model = make(name)
    features = make(name, features_only=True)
    x = sample(name)
    with torch.no_grad():
        maps = features(x)
        final, inter = model.forward_intermediates(x, indices=features.feature_info.out_indices)
    channels = features.feature_info.channels()
    assert len(maps) == len(channels) and [m.shape[1] for m in maps] == channels
    assert len(inter) == len(maps) and all(torch.equal(a, b) for a, b in zip(inter, maps))
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(x))


def _graph_calls_fast_depthwise(graph_module) -> bool:
    return any(node.op == "call_function" and node.target is depthwise_conv2d for node in graph_module.graph.nodes)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.slow
def test_fx_feature_extraction_forward_backward_and_script(name, grad_checkpointing):
    model = make(name)
    model.set_grad_checkpointing(grad_checkpointing)
    last = model.feature_info[-1]["module"]
    extractor = create_feature_extractor(model, return_nodes={last: "out"})
    assert _graph_calls_fast_depthwise(extractor)  # the fast CPU backward is a leaf, not traced through
    x = sample(name)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model.forward_features(x))

    extractor.train()
    model.train()
    traced_grads = torch.autograd.grad(extractor(x)["out"].square().mean(), list(extractor.parameters()))
    eager_grads = torch.autograd.grad(
        model.forward_features(x).square().mean(),
        [dict(model.named_parameters())[n] for n, _ in extractor.named_parameters()],
    )
    for a, b in zip(traced_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    if not grad_checkpointing:  # FX + TorchScript (a fresh model: the training passes above moved BatchNorm stats)
        scripted = torch.jit.script(create_feature_extractor(make(name), return_nodes={last: "out"}))
        with torch.no_grad():
            torch.testing.assert_close(scripted(x)["out"], make(name).forward_features(x))


@pytest.mark.parametrize("name", MODELS)
def test_timm_fx_feature_path(name):
    features = make(name, features_only=True, feature_cls="fx")
    reference = make(name, features_only=True)
    x = sample(name)
    with torch.no_grad():
        for a, b in zip(features(x), reference(x)):
            torch.testing.assert_close(a, b)


EVAL_224 = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}  # finetune_224.yaml's eval


@pytest.mark.parametrize("name", sorted(conv2former.model.VARIANTS))
def test_pretrained_cfg_is_complete_and_gives_the_recipes_eval_transform(name):
    from timm.data import infer_imagenet_subset, resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name).to_dict()
    for key in (
        "input_size",
        "crop_pct",
        "crop_mode",
        "interpolation",
        "mean",
        "std",
        "num_classes",
        "first_conv",
        "classifier",
        "license",
        "paper_ids",
        "pool_size",
    ):
        assert cfg.get(key) not in (None, ""), key
    assert resolve_data_config({}, pretrained_cfg=cfg) == EVAL_224
    assert infer_imagenet_subset(cfg) == "imagenet-1k"
    head22k = get_pretrained_cfg(f"{name}.in22k").to_dict()
    assert head22k["num_classes"] == 21841 and infer_imagenet_subset(head22k) == "imagenet-22k"
    at384 = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(f"{name}.in22k_ft_in1k_384").to_dict())
    assert at384["input_size"] == (3, 384, 384) and at384["crop_pct"] == 1.0 and at384["crop_mode"] == "squash"


def test_tags_build_their_heads_and_name_their_labels():
    from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

    model = timm.create_model("conv2former_demo.in22k")
    assert model.num_classes == 21841 and model.pred.out_features == 21841
    labels = ImageNetInfo(infer_imagenet_subset(model.pretrained_cfg)).label_names()
    assert len(labels) == 21841 and labels[0].startswith("n")
    assert resolve_data_config({}, model=timm.create_model("conv2former_demo")) == EVAL_224


@pytest.mark.parametrize("name", sorted(conv2former.model.VARIANTS))
def test_factory_device_and_dtype_place_every_tensor(name):
    """timm's factory arguments (``create_model(name, device=..., dtype=...)``, which timm's own model tests pass):
    every parameter and buffer is created on the device (``meta`` here: no memory, no init cost), floating ones in
    the dtype, except the stem BatchNorm's statistics, which stay fp32 (docs/model.md); the architecture is the
    default one's, and features_only takes them too."""
    with torch.device("meta"):
        reference = timm.create_model(name)
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert [(n, t.shape) for n, t in tensors.items()] == [
        (n, t.shape) for n, t in (dict(reference.named_parameters()) | dict(reference.named_buffers())).items()
    ]
    fp32_norms = {n for n, m in model.named_modules() if isinstance(m, conv2former.model.BatchNorm2dFP32)}
    assert fp32_norms or not isinstance(model, conv2former.model.Conv2Former)  # (the 3-conv stems have them)
    for tensor_name, tensor in tensors.items():
        if tensor.is_floating_point():
            statistic = tensor_name.rsplit(".", 1)[0] in fp32_norms and "running_" in tensor_name
            assert tensor.dtype == (torch.float32 if statistic else torch.bfloat16), tensor_name
    features = timm.create_model(name, features_only=True, device="meta")
    assert {p.device.type for p in features.parameters()} == {"meta"}


def test_factory_dtype_trains_and_unknown_arguments_fail_as_timms_do():
    """A bf16 model built by the factory runs forward and backward on the CPU with its fp32 stem BatchNorm; an
    argument the model does not take is the same TypeError as for timm's own models."""
    model = timm.create_model("conv2former_demo", num_classes=5, dtype=torch.bfloat16).train()
    out = model(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad is not None for p in model.parameters())
    assert model.downsample_layers[0][2].running_mean.dtype == torch.float32
    assert model.downsample_layers[0][2].running_mean.abs().sum() > 0  # updated in fp32
    errors = []
    for factory in ("conv2former_demo", "convnext_atto"):
        with pytest.raises(TypeError) as info:
            timm.create_model(factory, not_an_argument=1)
        errors.append(str(info.value).split("()", 1)[-1])
    assert errors[0] == errors[1] == " got an unexpected keyword argument 'not_an_argument'"
