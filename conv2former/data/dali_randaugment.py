"""timm's RandAugment ``rand-m{M}-n{N}-mstd{S}-inc1`` written with DALI operators, for the DALI backends (CPU and GPU).

Hand-written because DALI's ``auto_aug.rand_augment`` is another RandAugment: 14 ops (an identity in place of
Invert and SolarizeAdd), both drawn ops always applied, a fixed magnitude, linear warps filled with 128, and
posterize keeping 4 bits at m9 where timm keeps 1; measured against timm's it changed images about twice as much.

What matches timm (``timm.data.auto_augment``, ``_RAND_INCREASING_TRANSFORMS``; the torch backend runs timm itself):

* the 15 ops and their magnitude rules: AutoContrast, Equalize, Invert, Rotate (±3°/level), PosterizeIncreasing
  (keep 4 − int(0.4 m) bits), SolarizeIncreasing (threshold 256 − int(25.6 m)), SolarizeAdd (+int(11 m) below 128),
  Color/Contrast/Brightness/SharpnessIncreasing (factor max(0.1, 1 ± 0.09 m)), ShearX/Y (±0.03 m, about the top-left
  corner), TranslateX/YRel (±0.045 m of the side);
* N ops drawn uniformly with replacement, each applied with probability 0.5, its magnitude drawn per application
  from N(M, S) and clipped to [0, 10], its sign (where an op has one) negated with probability 0.5;
* PIL's arithmetic where it is cheap to follow: luma weights and rounding of ``convert("L")``, the blends' truncation,
  autocontrast's truncation, the mean colour fill of warps (timm's ``img_mean``, (124, 116, 104) for ImageNet), each
  op's output quantized to uint8 as PIL images are.

What does not: warps (rotate, shear, translate) are bilinear, since DALI's ``warp_affine`` and ``rotate`` offer only
nearest and linear (timm: bicubic; docs/data.md gives the measured difference); Equalize is DALI's (OpenCV's lookup
table, not PIL's); Sharpness filters the border pixels (PIL leaves a 1-pixel border unfiltered).
tests/test_loader.py compares the two on the same images (share of images left unchanged, distribution of the
per-image change).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

NUM_OPS = 15
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
Node = Any  # a DALI DataNode (DALI's operators carry no static types)
LUMA = np.array([19595, 38470, 7471], dtype=np.float32) / 65536  # PIL's convert("L"): (R*19595 + ... + 0x8000) >> 16
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13  # PIL's ImageFilter.SMOOTH


def fill_colour(mean: Sequence[float]) -> Tuple[int, ...]:
    """timm's ``img_mean`` fill: the normalisation mean on the 0-255 scale, rounded."""
    return tuple(min(255, round(255 * m)) for m in mean)


def _on(value: Node, data: Node) -> Node:
    """A per-sample CPU scalar ``value`` where arithmetic with ``data`` can use it (the GPU when data is there)."""
    return value.gpu() if getattr(data, "device", "cpu") == "gpu" else value


def _u8(values: Node) -> Node:
    """Float pixel values to uint8 the way PIL stores them: truncated, then clipped to 0..255."""
    return fn.cast(dmath.clamp(dmath.floor(values), 0.0, 255.0), dtype=types.UINT8)


def _float(images: Node) -> Node:
    return fn.cast(images, dtype=types.FLOAT)


def _gray(images_f: Node) -> Node:
    """PIL's luma (``convert("L")``), rounded as PIL rounds it, one channel, float."""
    luma = fn.reductions.sum(images_f * types.Constant(LUMA), axis_names="C", keep_dims=True)
    return dmath.floor(luma + 0.5)


def _blend(degenerate_f: Node, images_f: Node, factor: Node, images: Node) -> Node:
    """PIL's ``Image.blend(degenerate, image, factor)``: degenerate + factor * (image - degenerate), truncated."""
    return _u8(degenerate_f + _on(factor, images) * (images_f - degenerate_f))


def auto_contrast(images: Node) -> Node:
    lo = _float(fn.reductions.min(images, axis_names="HW", keep_dims=True))
    hi = _float(fn.reductions.max(images, axis_names="HW", keep_dims=True))
    spread = hi - lo
    stretched = (_float(images) - lo) * (255.0 / dmath.max(spread, 1.0))
    keep = spread <= 0.0  # a flat channel is left as it is (PIL's lut is the identity)
    return _u8(stretched * (keep ^ True) + _float(images) * keep)


def invert(images: Node) -> Node:
    return types.Constant(255, dtype=types.UINT8) - images


def posterize(images: Node, magnitude: Node) -> Node:
    bits = 4.0 - dmath.floor(magnitude * 0.4)  # timm: 4 - int(m / 10 * 4) bits kept
    mask = fn.cast(256.0 - dmath.pow(2.0, 8.0 - bits), dtype=types.UINT8)
    return images & _on(mask, images)


def solarize(images: Node, magnitude: Node) -> Node:
    threshold = _on(256.0 - dmath.min(dmath.floor(magnitude * 25.6), 256.0), images)
    f = _float(images)
    below = f < threshold
    return _u8(f * below + (255.0 - f) * (below ^ True))


def solarize_add(images: Node, magnitude: Node) -> Node:
    add = _on(dmath.min(dmath.floor(magnitude * 11.0), 128.0), images)
    f = _float(images)
    below = f < 128.0
    return _u8(dmath.min(f + add, 255.0) * below + f * (below ^ True))


def color(images: Node, factor: Node) -> Node:
    f = _float(images)
    return _blend(_gray(f), f, factor, images)


def contrast(images: Node, factor: Node) -> Node:
    f = _float(images)
    mean = dmath.floor(fn.reductions.mean(_gray(f), axis_names="HWC", keep_dims=True) + 0.5)
    return _blend(mean, f, factor, images)


def brightness(images: Node, factor: Node) -> Node:
    f = _float(images)
    return _u8(f * _on(factor, images))


def sharpness(images: Node, factor: Node) -> Node:
    kernel = fn.constant(  # type: ignore[attr-defined]
        fdata=SMOOTH.ravel().tolist(), shape=[3, 3], dtype=types.FLOAT, device=images.device
    )
    smooth = _float(fn.filter(images, kernel, border="clamp"))  # the kernel where the images are (as DALI's auto_aug)
    return _blend(smooth, _float(images), factor, images)


def _warp(images: Node, fill: Node, matrix: Optional[Node] = None, angle: Optional[Node] = None) -> Node:
    """An affine warp (``matrix``: output -> input, as PIL's) or a rotation about the centre, bilinear, whose
    outside is ``fill``: the mean is taken off before the warp (filled with 0) and put back after it."""
    mean = types.Constant(np.array(fill, dtype=np.float32))
    centred = _float(images) - mean
    if angle is not None:
        out = fn.rotate(centred, angle=angle, keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR)
    else:
        out = fn.warp_affine(centred, matrix=matrix, fill_value=0.0, interp_type=types.INTERP_LINEAR)
    return _u8(dmath.floor(out + mean + 0.5))


def shear(images: Node, amount: Node, axis: int, fill: Node) -> Node:
    # PIL's (1, f, 0, 0, 1, 0) for x: input x = out x + f * out y (the matrix maps output to input)
    pair = fn.stack(amount, amount * 0.0) if axis == 0 else fn.stack(amount * 0.0, amount)
    return _warp(images, fill, matrix=fn.transforms.shear(shear=pair))


def translate(images: Node, fraction: Node, axis: int, side: int, fill: Node) -> Node:
    pixels = fraction * float(side)  # PIL's (1, 0, pixels, 0, 1, 0): input x = out x + pixels
    pair = fn.stack(pixels, pixels * 0.0) if axis == 0 else fn.stack(pixels * 0.0, pixels)
    return _warp(images, fill, matrix=fn.transforms.translation(offset=pair))


def _apply(images: Node, op: Node, magnitude: Node, sign: Node, shape: Node, fill: Node) -> Node:
    """The op with index ``op`` (a per-sample DataNode) at ``magnitude``; DALI runs each branch on its samples."""
    signed = magnitude * sign
    enhance = dmath.max(1.0 + signed * 0.09, 0.1)
    if op == 0:
        images = auto_contrast(images)
    elif op == 1:
        images = fn.equalize(images)
    elif op == 2:
        images = invert(images)
    elif op == 3:
        images = _warp(images, fill, angle=signed * 3.0)
    elif op == 4:
        images = posterize(images, magnitude)
    elif op == 5:
        images = solarize(images, magnitude)
    elif op == 6:
        images = solarize_add(images, magnitude)
    elif op == 7:
        images = color(images, enhance)
    elif op == 8:
        images = contrast(images, enhance)
    elif op == 9:
        images = brightness(images, enhance)
    elif op == 10:
        images = sharpness(images, enhance)
    elif op == 11:
        images = shear(images, signed * 0.03, 0, fill)
    elif op == 12:
        images = shear(images, signed * 0.03, 1, fill)
    elif op == 13:
        images = translate(images, signed * 0.045, 0, shape[1], fill)
    else:
        images = translate(images, signed * 0.045, 1, shape[0], fill)
    return images


def rand_augment(images: Node, n: int, m: float, shape: Node, fill: Node, mstd: float = 0.5, prob: float = 0.5) -> Node:
    """timm's ``rand-m{m}-n{n}-mstd{mstd}-inc1`` (per-op probability ``prob``) on uint8 HWC ``images`` of
    ``shape`` (height, width), warps filled with ``fill`` (RGB, 0-255). Needs ``enable_conditionals=True``."""
    for _ in range(n):
        op = fn.random.uniform(values=list(range(NUM_OPS)), dtype=types.INT32)
        applied = fn.random.coin_flip(probability=prob, dtype=types.BOOL)
        magnitude = dmath.clamp(fn.random.normal(mean=float(m), stddev=max(float(mstd), 1e-9)), 0.0, 10.0)
        sign = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT) * 2.0 - 1.0
        if applied:
            images = _apply(images, op, magnitude, sign, shape, fill)
    return images
