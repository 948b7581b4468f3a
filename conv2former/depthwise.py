"""Conv2Former's depthwise convolutions (the k x k modulation, the MLP's 3x3) and the formulations they can run as.

Same parameters, same names and the same math as ``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)``. A
stride-1 "same" depthwise convolution and both of its gradients can each be computed several ways (every candidate
of a part gives the same tensor up to float rounding), and which is fastest depends on the processor, the shape and
the layout (docs/performance.md):

    forward      conv2d             F.conv2d(x, w, padding=k // 2, groups=C)                 (PyTorch's own)
                 transposed         F.conv_transpose2d(x, flip(w), padding=k // 2, groups=C)
                 channels_last      F.conv2d on a channels_last copy of x, the output back in x's layout
    grad_input   conv2d_backward    PyTorch's convolution_backward                            (PyTorch's own)
                 conv2d             F.conv2d(grad_out, flip(w), padding=k // 2, groups=C)
                 transposed         F.conv_transpose2d(grad_out, w, padding=k // 2, groups=C)
    grad_weight  conv2d_backward    PyTorch's convolution_backward                            (PyTorch's own)
                 batch_groups       sum over the batch of conv2d(pad(x) as (1, C*B, H+2p, W+2p),
                                                                 grad_out as (C*B, 1, H, W) kernels, groups=C*B)

and, where they run (``runs_on``): ``native`` (forward and input gradient; CUDA only), PyTorch's own NCHW CUDA
depthwise kernel ``aten::_conv_depthwise2d``, which ``F.conv2d`` takes when it does not send the call to cuDNN (it
sends every channels_last bf16 depthwise convolution there); ``triton`` (all three parts; CUDA, or any device under
Triton's interpreter), conv2former/triton_depthwise.py's kernels.

This module is the op and that table only. Which formulation a call uses is asked of the process's chooser
(``use_chooser``), a function of the input and the weight; there is none unless one is installed, and then every
layer is exactly ``F.conv2d``. The training engine installs conv2former/cpu's tuner on CPU runs
(``conv2former.cpu.CpuTuning``); nothing in the model imports it. Under autocast, for integer tensors and mixed
dtypes the layer is always ``F.conv2d``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DepthwiseConv2d",
    "depthwise_conv2d",
    "use_chooser",
    "shape_key",
    "valid_formulation",
    "FORWARD",
    "GRAD_INPUT",
    "GRAD_WEIGHT",
    "PARTS",
    "PLAIN",
    "runs_on",
    "candidates",
]

Formulation = Tuple[str, str, str]  # (forward, grad_input, grad_weight)
Chooser = Callable[[torch.Tensor, torch.Tensor], Optional[Formulation]]  # (x, weight) -> a formulation, None: plain
PLAIN: Formulation = ("conv2d", "conv2d_backward", "conv2d_backward")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _pad(weight: torch.Tensor) -> int:
    return weight.shape[-1] // 2


def _backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: List[bool]) -> Any:
    """PyTorch's own ``convolution_backward``: (grad input, grad weight, grad bias), each where ``mask`` asks."""
    p = _pad(weight)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], x.shape[1], mask
    )


def _grad_weight_batch_groups(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = x.shape
    k, p = weight.shape[-1], _pad(weight)
    # pad and put channels first in one copy: (C, B, H + 2p, W + 2p)
    x_padded = x.new_zeros(channels, batch, height + 2 * p, width + 2 * p)
    x_padded[:, :, p : p + height, p : p + width] = x.transpose(0, 1)
    x_padded = x_padded.view(1, channels * batch, height + 2 * p, width + 2 * p)
    kernels = grad_out.transpose(0, 1).reshape(channels * batch, 1, height, width)
    grad_w = F.conv2d(x_padded, kernels, groups=channels * batch)
    return grad_w.view(channels, batch, k, k).sum(1, keepdim=True)


def _forward_channels_last(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    out = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, padding=_pad(w), groups=x.shape[1])
    return out.contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _native(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """PyTorch's native CUDA depthwise kernel (NCHW), the result in ``x``'s layout."""
    k, p = w.shape[-1], _pad(w)
    out = torch.ops.aten._conv_depthwise2d(x.contiguous(), w, [k, k], b, [1, 1], [p, p], [1, 1])
    return out.contiguous(memory_format=_memory_format(x))


def _triton(name: str) -> Callable[..., torch.Tensor]:
    def run(*args: Any) -> torch.Tensor:
        from conv2former import triton_depthwise

        result: torch.Tensor = getattr(triton_depthwise, name)(*args)
        return result

    return run


FORWARD: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d": lambda x, w, b: F.conv2d(x, w, b, padding=_pad(w), groups=x.shape[1]),
    "transposed": lambda x, w, b: F.conv_transpose2d(x, w.flip(-1, -2), b, padding=_pad(w), groups=x.shape[1]),
    "channels_last": _forward_channels_last,
    "native": _native,
    "triton": _triton("forward"),
}
GRAD_INPUT: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d_backward": lambda g, x, w: _backward(g, x, w, [True, False, False])[0],
    "conv2d": lambda g, x, w: F.conv2d(g, w.flip(-1, -2), padding=_pad(w), groups=x.shape[1]),
    "transposed": lambda g, x, w: F.conv_transpose2d(g, w, padding=_pad(w), groups=x.shape[1]),
    "native": lambda g, x, w: _native(g, w.flip(-1, -2), None),
    "triton": _triton("grad_input"),
}
GRAD_WEIGHT: Dict[str, Callable[..., torch.Tensor]] = {
    "conv2d_backward": lambda g, x, w: _backward(g, x, w, [False, True, False])[1],
    "batch_groups": _grad_weight_batch_groups,
    "triton": _triton("grad_weight"),
}
CUDA_ONLY = ("native",)


def runs_on(name: str, device: torch.device) -> bool:
    """Whether the candidate ``name`` can run on ``device`` (``native``: CUDA; ``triton``: CUDA, or anywhere under
    Triton's interpreter; the rest: everywhere)."""
    if name in CUDA_ONLY:
        return device.type == "cuda"
    if name == "triton":
        from conv2former import triton_depthwise

        return triton_depthwise.available(device)
    return True


def candidates(table: Dict[str, Callable[..., torch.Tensor]], device: torch.device) -> Dict[str, Callable[..., Any]]:
    """The entries of one part's table that run on ``device``."""
    return {name: run for name, run in table.items() if runs_on(name, device)}


PARTS = (("forward", FORWARD), ("grad_input", GRAD_INPUT), ("grad_weight", GRAD_WEIGHT))


class _DepthwiseConv2dFunction(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution with the forward and the two gradients computed as ``formulation`` says."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], formulation: Formulation
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.formulation = formulation
        return FORWARD[formulation[0]](x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        _, grad_input, grad_weight = ctx.formulation
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = GRAD_INPUT[grad_input](grad_out, x, weight)
        if ctx.needs_input_grad[1]:
            grad_w = GRAD_WEIGHT[grad_weight](grad_out, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def shape_key(x: torch.Tensor, weight: torch.Tensor) -> str:
    """What a choice depends on, as a string: 'cpu float32 contiguous 8x72x56x56 k11'."""
    layout = "channels_last" if _memory_format(x) == torch.channels_last else "contiguous"
    dtype = str(x.dtype).replace("torch.", "")
    return f"{x.device.type} {dtype} {layout} {'x'.join(map(str, x.shape))} k{weight.shape[-1]}"


def valid_formulation(choice: Iterable[str]) -> Formulation:
    """``choice`` (a sequence of three names) as a formulation; ValueError when a name is not in its part's table."""
    parts = tuple(choice)
    if len(parts) != 3 or any(name not in table for name, (_, table) in zip(parts, PARTS)):
        raise ValueError(f"not a depthwise formulation: {choice!r} (names: {[list(t) for _, t in PARTS]})")
    return parts[0], parts[1], parts[2]


_chooser: Optional[Chooser] = None


def use_chooser(chooser: Optional[Chooser]) -> Optional[Chooser]:
    """Make ``chooser`` decide every depthwise layer's formulation in this process (None: plain ``F.conv2d``);
    returns the one it replaces."""
    global _chooser
    previous, _chooser = _chooser, chooser
    return previous


def _formulation(x: torch.Tensor, weight: torch.Tensor) -> Formulation:
    if _chooser is None or x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or _autocast_on(x.device.type):
        return PLAIN
    return _chooser(x, weight) or PLAIN


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta: shape-only models)
        return False


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fast_backward: bool = True
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for a (C, 1, k, k) weight with odd k.

    ``fast_backward=False``: always the plain convolution. A leaf for torch.fx (``torch.fx.wrap`` below): traced
    graphs call this function, so they keep the chosen formulation and never branch on a traced tensor's device or
    dtype. Under TorchScript it is the plain convolution.
    """
    if not torch.jit.is_scripting() and fast_backward:
        return _formulated(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _formulated(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    formulation = _formulation(x, weight)
    if formulation == PLAIN:
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        out: torch.Tensor = _DepthwiseConv2dFunction.apply(x, weight, bias, formulation)
        return out
    return FORWARD[formulation[0]](x, weight, bias)


torch.fx.wrap("depthwise_conv2d")


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)`` (same parameters and state_dict), computed the way the
    process's chooser says for its shape (``use_chooser``). ``fast_backward=False`` is the plain PyTorch layer everywhere
    (the reference formulation)."""

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, fast_backward: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.fast_backward = fast_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.fast_backward)

    def extra_repr(self) -> str:
        plain: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return plain + ("" if self.fast_backward else ", fast_backward=False")
