"""The k x k depthwise convolution of convolutional modulation, with a faster CPU backward.

Same parameters, same names and the same math as ``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)``; only
how the backward pass is computed on CPU differs. PyTorch's CPU kernel for the weight gradient of a large-kernel
depthwise convolution is 6-16x slower than its forward (see docs/performance.md, "Where the time goes"), and the
11x11 convolutions made that the single largest cost of a Conv2Former training step. Both gradients are
themselves depthwise convolutions, which PyTorch computes quickly in the forward direction:

    grad_input  = conv2d(grad_out, flip(weight), padding=k // 2, groups=C)
    grad_weight = sum over the batch of conv2d(pad(x) as (1, C*B, H+k-1, W+k-1),
                                               grad_out as (C*B, 1, H, W) kernels, groups=C*B)

The results equal PyTorch's own backward up to float rounding (the sums run in another order; tested against
``nn.Conv2d`` in tests/test_model.py). On CUDA, under autocast, for non-float32 tensors or small kernels
(3x3, where PyTorch's backward is already fast) the layer is exactly ``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["DepthwiseConv2d", "depthwise_conv2d"]

FAST_BACKWARD_MIN_KERNEL = 5
"""Kernels this large or larger use the reformulated CPU backward: fwd+bwd measured 1.3-4x faster at 5x5 (and more at
7x7 and 11x11) on the four stage shapes of Conv2Former-T at batch 8, slower at 3x3, on a 2-core x86_64 CPU."""


class _DepthwiseConv2dCPU(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution whose backward runs as two forward depthwise convolutions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        padding = weight.shape[-1] // 2
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        batch, channels, height, width = x.shape
        k = weight.shape[-1]
        padding = k // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad_out, weight.flip(-1, -2), padding=padding, groups=channels)
        if ctx.needs_input_grad[1]:
            # pad and put channels first in one copy: (C, B, H + 2p, W + 2p)
            x_padded = x.new_zeros(channels, batch, height + 2 * padding, width + 2 * padding)
            x_padded[:, :, padding : padding + height, padding : padding + width] = x.transpose(0, 1)
            x_padded = x_padded.view(1, channels * batch, height + 2 * padding, width + 2 * padding)
            kernels = grad_out.transpose(0, 1).reshape(channels * batch, 1, height, width)
            grad_w = F.conv2d(x_padded, kernels, groups=channels * batch)
            grad_w = grad_w.view(channels, batch, k, k).sum(1, keepdim=True)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def _use_fast_backward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.shape[-1] >= FAST_BACKWARD_MIN_KERNEL
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and not torch.is_autocast_enabled("cpu")
    )


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fast_backward: bool = True
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)`` for a (C, 1, k, k) weight with odd k.

    A leaf for torch.fx (``torch.fx.wrap`` below): traced graphs call this function, so they keep the fast backward
    and never branch on a traced tensor's device or dtype. Under TorchScript it is the plain convolution.
    """
    if not torch.jit.is_scripting() and fast_backward:
        return _fast_or_plain(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _fast_or_plain(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _use_fast_backward(x, weight):
        return _DepthwiseConv2dCPU.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


torch.fx.wrap("depthwise_conv2d")


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)`` (same parameters and state_dict) with the fast backward.

    ``fast_backward=False`` is the plain PyTorch layer everywhere (the reference formulation).
    """

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, fast_backward: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)
        self.fast_backward = fast_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.fast_backward)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.fast_backward else ", fast_backward=False")
