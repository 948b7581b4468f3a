"""The depthwise op and its formulation table (conv2former/depthwise.py): every formulation equals ``F.conv2d`` in
value and gradients, no chooser means exactly ``F.conv2d``, and the layer asks the installed chooser. The CPU tuner
that chooses is tested in tests/test_cpu_tuning.py."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conv2former import depthwise as dw
from conv2former.depthwise import FORWARD, GRAD_INPUT, GRAD_WEIGHT, PLAIN, DepthwiseConv2d, candidates

CPU = torch.device("cpu")  # (the CUDA-only and Triton candidates: tests/test_triton_depthwise.py, tests/test_gpu.py)
ALL_FORMULATIONS = list(itertools.product(*(candidates(t, CPU) for t in (FORWARD, GRAD_INPUT, GRAD_WEIGHT))))


@pytest.fixture
def chooser():
    """Install a chooser that answers what the test sets in ``answer`` and records the calls; restored after."""

    class Recording:
        answer = PLAIN
        calls = []

        def __call__(self, x, weight):
            self.calls.append(dw.shape_key(x, weight))
            return self.answer

    recording = Recording()
    previous = dw.use_chooser(recording)
    yield recording
    dw.use_chooser(previous)


def _reference(x, weight, bias, grad_out):
    xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bi = bias.clone().requires_grad_() if bias is not None else None
    out = F.conv2d(xi, wi, bi, padding=weight.shape[-1] // 2, groups=x.shape[1])
    out.backward(grad_out)
    return out, xi.grad, wi.grad, bi.grad if bi is not None else None


@pytest.mark.parametrize("formulation", ALL_FORMULATIONS, ids="+".join)
@pytest.mark.parametrize("k,channels_last,bias", [(3, False, True), (7, True, True), (11, False, False)])
def test_every_formulation_equals_conv2d_in_value_and_gradients(formulation, k, channels_last, bias):
    gen = torch.Generator().manual_seed(k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 12, 17, 13, generator=gen).contiguous(memory_format=fmt)
    weight = torch.randn(12, 1, k, k, generator=gen)
    b = torch.randn(12, generator=gen) if bias else None
    grad_out = torch.randn(3, 12, 17, 13, generator=gen)
    xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bi = b.clone().requires_grad_() if bias else None
    out = dw._DepthwiseConv2dFunction.apply(xi, wi, bi, formulation)
    out.backward(grad_out)
    got = (out, xi.grad, wi.grad, bi.grad if bias else None)
    for g, expected, what in zip(got, _reference(x, weight, b, grad_out), ("output", "input", "weight", "bias")):
        if expected is None:
            continue
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4, msg=f"{what} of {formulation}")
        assert expected.abs().max() > 0.1
    assert out.is_contiguous(memory_format=fmt)  # the output keeps the input's layout


def test_without_a_chooser_the_layer_is_exactly_conv2d():
    """(That importing the model installs none: tests/test_cpu_tuning.py, in a fresh process.)"""
    previous = dw.use_chooser(None)  # an in-process command earlier in the session may have installed one
    try:
        layer, plain = DepthwiseConv2d(8, 5), torch.nn.Conv2d(8, 8, 5, padding=2, groups=8)
        plain.load_state_dict(layer.state_dict())
        x = torch.randn(2, 8, 9, 9)
        a, b = layer(x.clone().requires_grad_()), plain(x.clone().requires_grad_())
        assert torch.equal(a, b) and a.grad_fn.name() == b.grad_fn.name()
    finally:
        dw.use_chooser(previous)


def test_the_layer_runs_the_chosen_formulation(chooser):
    layer = DepthwiseConv2d(8, 7)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    plain_out = layer(x)
    assert "DepthwiseConv2dFunction" not in type(plain_out.grad_fn).__name__  # PyTorch's own: F.conv2d itself
    chooser.answer = ("transposed", "conv2d", "batch_groups")
    out = layer(x)
    assert "DepthwiseConv2dFunction" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, plain_out, rtol=1e-4, atol=1e-4)
    assert chooser.calls == ["cpu float32 contiguous 2x8x9x9 k7"] * 2


def test_autocast_mixed_dtypes_and_fast_backward_false_never_ask_the_chooser(chooser):
    layer, x = DepthwiseConv2d(8, 7), torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    with pytest.raises(RuntimeError):  # float64 input, float32 weight: PyTorch's own error, the chooser not asked
        layer(x.double())
    DepthwiseConv2d(8, 7, fast_backward=False)(x)
    assert chooser.calls == []
    with torch.device("meta"):  # a shape-only model (MAC counting) with a chooser installed
        assert DepthwiseConv2d(8, 7)(torch.empty(2, 8, 9, 9)).shape == (2, 8, 9, 9)


def test_a_formulation_is_three_known_names():
    assert dw.valid_formulation(["conv2d", "transposed", "batch_groups"]) == ("conv2d", "transposed", "batch_groups")
    for bad in (["fft", "conv2d", "conv2d_backward"], ["conv2d", "conv2d"]):
        with pytest.raises(ValueError):
            dw.valid_formulation(bad)
