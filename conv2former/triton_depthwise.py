"""Triton kernels for the stride-1 "same" depthwise convolution (conv2former/depthwise.py's ``triton`` candidates):
the forward, the input gradient (the forward with the flipped kernel) and the weight gradient (a reduction over batch
and space), for any odd kernel size, NCHW or NHWC (channels_last) tensors, fp32/bf16/fp16 with fp32 accumulation.

Hand-written because no maintained library ships depthwise kernels for 5-21 px kernels (RepLKNet and SLaK wrote their
own CUDA for the same reason); written in Triton so that they run on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), where the tests check them against ``F.conv2d``, and compile for the GPU unchanged. Which
formulation a GPU run uses is measured per shape (``conv2former/depthwise_chooser.py``); these are candidates.

The kernels read tensors through their strides, so one kernel serves both layouts: each program computes a
(BLOCK_W x BLOCK_C) tile of one output row; the weight gradient splits the (batch x rows) reduction over programs
that write fp32 partial sums, added afterwards (deterministic: no atomics).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["available", "forward", "grad_input", "grad_weight"]


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: a CUDA device with Triton, or any device under the interpreter."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # (decided before importing Triton: CPU runs never load it)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels() -> Tuple[Any, Any]:
    """The jitted kernels, built on first use (importing Triton costs ~1 s and is not needed on CPU runs)."""
    global _KERNELS
    if _KERNELS is None:
        import triton
        import triton.language as tl

        _KERNELS = (_forward_kernel(triton, tl), _grad_weight_kernel(triton, tl))
    return _KERNELS


def _forward_kernel(triton: Any, tl: Any) -> Any:
    """The forward (and, with FLIP, the input gradient): one program per (row, block of columns, block of channels)."""

    @triton.jit  # type: ignore[untyped-decorator]
    def dw_forward(  # type: ignore[no-untyped-def]
        x_ptr, w_ptr, b_ptr, out_ptr, C, H, W,
        sxb, sxc, sxh, sxw, sob, soc, soh, sow,
        HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * H + h
        b = row // H
        h = row % H
        ws = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(K):
            hi = h + i - K // 2
            row_ok = (hi >= 0) & (hi < H)
            for j in tl.static_range(K):
                wi = ws + j - K // 2
                mask = row_ok & ((wi >= 0) & (wi < W))[:, None] & c_ok[None, :]
                xv = tl.load(x_ptr + b * sxb + hi * sxh + wi[:, None] * sxw + cs[None, :] * sxc, mask=mask, other=0.0)
                if FLIP:
                    wv = tl.load(w_ptr + cs * (K * K) + (K - 1 - i) * K + (K - 1 - j), mask=c_ok, other=0.0)
                else:
                    wv = tl.load(w_ptr + cs * (K * K) + i * K + j, mask=c_ok, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = (ws < W)[:, None] & c_ok[None, :]
        out = out_ptr + b * sob + h * soh + ws[:, None] * sow + cs[None, :] * soc
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    return dw_forward


def _grad_weight_kernel(triton: Any, tl: Any) -> Any:
    """The weight gradient: one program per (block of channels, tap, split of the rows), partial sums per split."""

    @triton.jit  # type: ignore[untyped-decorator]
    def dw_grad_weight(  # type: ignore[no-untyped-def]
        g_ptr, x_ptr, part_ptr, C, H, W, ROWS, ROWS_PER_PROGRAM,
        sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
        K: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        tap = tl.program_id(1)
        split = tl.program_id(2)
        i = tap // K
        j = tap % K
        c_ok = cs < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for r in range(split * ROWS_PER_PROGRAM, split * ROWS_PER_PROGRAM + ROWS_PER_PROGRAM):
            b = r // H
            h = r % H
            hi = h + i - K // 2
            row_ok = (r < ROWS) & (hi >= 0) & (hi < H)
            for w0 in range(0, W, BLOCK_W):
                ws = w0 + tl.arange(0, BLOCK_W)
                wi = ws + j - K // 2
                g_mask = (r < ROWS) & (ws < W)[:, None] & c_ok[None, :]
                x_mask = g_mask & row_ok & ((wi >= 0) & (wi < W))[:, None]
                gv = tl.load(g_ptr + b * sgb + h * sgh + ws[:, None] * sgw + cs[None, :] * sgc, mask=g_mask, other=0.0)
                xv = tl.load(x_ptr + b * sxb + hi * sxh + wi[:, None] * sxw + cs[None, :] * sxc, mask=x_mask, other=0.0)
                acc += gv.to(tl.float32) * xv.to(tl.float32)
        total = tl.sum(acc, axis=0)
        tl.store(part_ptr + split * (C * K * K) + cs * (K * K) + tap, total, mask=c_ok)

    return dw_grad_weight


_KERNELS: Optional[Tuple[Any, Any]] = None


def _blocks(x: torch.Tensor) -> Tuple[int, int]:
    """(BLOCK_W, BLOCK_C): channels wide on NHWC (contiguous channels), columns wide on NCHW."""
    channels, width = x.shape[1], x.shape[3]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return min(16, _next_pow2(width)), min(64, _next_pow2(channels))
    return min(64, _next_pow2(width)), min(16, _next_pow2(channels))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], flip: bool) -> torch.Tensor:
    forward_kernel, _ = _kernels()
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    out = torch.empty_like(x)  # x's layout
    block_w, block_c = _blocks(x)
    grid = (batch * height, -(-width // block_w), -(-channels // block_c))
    w = weight.contiguous()
    forward_kernel[grid](
        x, w, bias if bias is not None else w, out, channels, height, width,
        *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, FLIP=flip, K=k, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return out


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=C)``."""
    return _conv(x, weight, bias, flip=False)


def grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient: the forward of ``grad_out`` with the flipped kernel (no bias), in grad_out's layout."""
    return _conv(grad_out, weight, None, flip=True)


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, splits: int = 0) -> torch.Tensor:
    """The weight gradient (C, 1, k, k): for each tap, the sum over batch and space of grad_out times the shifted
    input; the (batch x rows) reduction split over ``splits`` programs per (channel block, tap) (0: about 4 rows
    each, at most 64 splits)."""
    _, grad_weight_kernel = _kernels()
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    rows = batch * height
    splits = splits or max(1, min(64, rows // 4))
    per_program = -(-rows // splits)
    splits = -(-rows // per_program)
    parts = torch.empty(splits, channels, k * k, dtype=torch.float32, device=x.device)
    block_w, block_c = _blocks(x)
    grid = (-(-channels // block_c), k * k, splits)
    grad_weight_kernel[grid](
        grad_out, x, parts, channels, height, width, rows, per_program,
        *grad_out.stride(), *x.stride(),
        K=k, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return parts.sum(0).view(channels, 1, k, k).to(weight.dtype)
