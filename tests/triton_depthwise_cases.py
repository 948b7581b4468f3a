"""Run by tests/test_triton_depthwise.py under TRITON_INTERPRET=1 (Triton's interpreter must be chosen before Triton
is imported, so these run in a process of their own): prints one JSON line per case."""

import json
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conv2former import depthwise, triton_depthwise  # noqa: E402
from conv2former.cpu.depthwise_tuner import DepthwiseTuner  # noqa: E402

# (batch, channels, height, width, kernel, channels_last, dtype): odd sizes, kernels larger than the map (every tap
# at an edge), 1-3 batches, both layouts, the kernel sizes Conv2Former uses (3 in the MLP, 5-21 modulation)
CASES = [
    (1, 3, 5, 7, 3, False, torch.float32),
    (2, 5, 6, 5, 5, True, torch.float32),
    (3, 4, 7, 6, 7, False, torch.bfloat16),
    (2, 6, 5, 9, 11, True, torch.float32),
    (1, 3, 6, 7, 11, True, torch.bfloat16),
    (1, 2, 3, 4, 21, False, torch.float32),
]


def case(batch, channels, height, width, k, channels_last, dtype):
    gen = torch.Generator().manual_seed(k * 100 + channels)
    x = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, 1, k, k, generator=gen).to(dtype)
    b = torch.randn(channels, generator=gen).to(dtype)
    g = torch.randn(batch, channels, height, width, generator=gen).to(dtype)
    xr, wr, br = x.float().requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_()
    ref = F.conv2d(xr, wr, br, padding=k // 2, groups=channels)
    ref.backward(g.float())
    out = triton_depthwise.forward(x, w, b)
    grad_x = triton_depthwise.grad_input(g, x, w)
    grad_w = triton_depthwise.grad_weight(g, x, w)
    errors = {}
    for name, got, want in (("forward", out, ref), ("grad_input", grad_x, xr.grad), ("grad_weight", grad_w, wr.grad)):
        errors[name] = {
            "max_abs": (got.float() - want).abs().max().item(),
            "max_rel_to_scale": ((got.float() - want).abs() / want.abs().clamp(min=1.0)).max().item(),
            "dtype": str(got.dtype),
            "shape_ok": tuple(got.shape) == tuple(want.shape),
        }
    return {
        "case": [batch, channels, height, width, k, channels_last, str(dtype)],
        "errors": errors,
        "layout_kept": out.is_contiguous(memory_format=torch.channels_last) == channels_last or not channels_last,
    }


def chooser_with_stub_timings():
    """The tuner on this device with the Triton candidates, its timings stubbed: Triton "fastest" in every part is
    chosen, a layer computes through it (same values and gradients as F.conv2d), the choice is recorded and reused."""

    def stub(candidates, rounds):
        return {name: (1.0 if name == "triton" else 10.0) for name in candidates}

    tuner = DepthwiseTuner("measure", timer=stub)
    previous = depthwise.use_chooser(tuner)
    try:
        layer = depthwise.DepthwiseConv2d(4, 5)
        x = torch.randn(2, 4, 6, 7, requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        grads = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
        plain = torch.nn.Conv2d(4, 4, 5, padding=2, groups=4)
        plain.load_state_dict(layer.state_dict())
        x2 = x.detach().clone().requires_grad_()
        ref = plain(x2)
        ref.square().sum().backward()
        diffs = [
            (out - ref).abs().max().item(),
            *((a - b).abs().max().item() for a, b in zip(grads, (x2.grad, plain.weight.grad, plain.bias.grad))),
        ]
        state = tuner.state_dict()
        again = DepthwiseTuner("measure", timer=lambda c, r: (_ for _ in ()).throw(AssertionError("timed again")))
        again.load_state_dict(state)
        reused = again(x, layer.weight)
    finally:
        depthwise.use_chooser(previous)
    return {"choices": state, "timed": list(tuner.timings), "max_diffs": diffs, "reused": list(reused)}


if __name__ == "__main__":
    # ``PART COUNT`` (e.g. ``0 2``): the cases whose index is PART modulo COUNT, and the chooser in part 0 (the tests
    # run the parts side by side: the interpreter uses one core)
    part, count = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)
    for spec in CASES[part::count]:
        start = time.perf_counter()
        print(json.dumps({**case(*spec), "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    if part == 0:
        print(json.dumps({"chooser": chooser_with_stub_timings()}), flush=True)
    sys.exit(0)
