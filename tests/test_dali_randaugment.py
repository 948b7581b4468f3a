"""The DALI backends' RandAugment against timm's ``rand-m9-mstd0.5-inc1`` (the torch backend's, ConvNeXt's) on the same
images with the crop and flip held fixed: each op at a fixed magnitude, then the whole augmentation in distribution.
DALI runs its CPU operators here (device_id=None)."""

from __future__ import annotations

import io
import random
import warnings
from typing import List

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug import rand_augment as dali_stock
from PIL import Image

from conv2former.data import dali_randaugment as ours
from data_prep.demo import render

SIDE = 64
FILL = ours.fill_colour((0.485, 0.456, 0.406))  # ImageNet's mean, as timm's img_mean
HPARAMS = dict(translate_const=int(SIDE * 0.45), img_mean=FILL, interpolation=Image.BICUBIC)  # timm's train transform


def images(count: int, seed: int = 0) -> List[np.ndarray]:
    """Photo-like test images: the demo dataset's shapes on blurred noise, JPEG-decoded, resized to SIDE x SIDE."""
    out = []
    for i in range(count):
        jpeg = render(i % 40, random.Random(seed * 100_000 + i))
        out.append(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((SIDE, SIDE), Image.BICUBIC)))
    return out


def run_dali(graph, base: List[np.ndarray], batch: int = 100, seed: int = 0, gpu: bool = False) -> List[np.ndarray]:
    """``graph`` over ``base`` in batches, on DALI's CPU operators (or with the images on the GPU)."""
    batches = iter([base[i : i + batch] for i in range(0, len(base), batch)])

    @pipeline_def(enable_conditionals=True, batch_size=batch, num_threads=2, device_id=0 if gpu else None, seed=seed)
    def pipeline():
        x = fn.external_source(source=lambda: next(batches), batch=True, layout="HWC")
        return graph(x.gpu() if gpu else x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # DALI's stock suite calls deprecated aliases
        pipe = pipeline()
        pipe.build()
        outs = [pipe.run()[0] for _ in range(0, len(base), batch)]
        return [np.array(t) for out in outs for t in (out.as_cpu() if gpu else out)]


def timm_rand_augment(base: List[np.ndarray], seed: int = 0) -> List[np.ndarray]:
    random.seed(seed)
    np.random.seed(seed)
    transform = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(HPARAMS))
    return [np.asarray(transform(Image.fromarray(b))) for b in base]


def change(outs: List[np.ndarray], base: List[np.ndarray]) -> np.ndarray:
    """Per image: the mean absolute change of its pixels (0-255 levels)."""
    return np.array([np.abs(o.astype(np.int16) - b).mean() for o, b in zip(outs, base)])


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical distribution functions."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# Per op at magnitude 9, both signs: the mean over images of |DALI - timm| per pixel, in 0-255 levels. Exact where
# DALI can do PIL's arithmetic; warps are bilinear against timm's bicubic; Equalize is OpenCV's lookup table.
OP_TOLERANCE = {
    "AutoContrast": 0.05,
    "Equalize": 2.5,
    "Invert": 0.0,
    "Rotate": 2.0,
    "PosterizeIncreasing": 0.0,
    "SolarizeIncreasing": 0.0,
    "SolarizeAdd": 0.0,
    "ColorIncreasing": 0.02,
    "ContrastIncreasing": 0.02,
    "BrightnessIncreasing": 0.02,
    "SharpnessIncreasing": 0.2,
    "ShearX": 1.5,
    "ShearY": 1.5,
    "TranslateXRel": 0.8,
    "TranslateYRel": 0.8,
}


def timm_op(name: str, img: np.ndarray, sign: float, magnitude: float) -> np.ndarray:
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=dict(HPARAMS))
    seed = next(s for s in range(100) if (random.Random(s).random() > 0.5) == (sign < 0))  # timm's _randomly_negate
    random.seed(seed)
    return np.asarray(op(Image.fromarray(img)))


def test_the_op_set_is_timms():
    assert list(ours.OPS) == list(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert set(OP_TOLERANCE) == set(ours.OPS)
    assert FILL == (124, 116, 104)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.slow
def test_each_op_equals_timms_at_a_fixed_magnitude(sign):
    base, magnitude = images(40), 9.0
    for index, name in enumerate(ours.OPS):

        def graph(x, index=index):
            zero = fn.cast(fn.random.coin_flip(probability=0.0), dtype=types.FLOAT)  # a per-sample 0.0
            op = fn.cast(zero, dtype=types.INT32) + index
            return ours._apply(x, op, zero + magnitude, zero + sign, (SIDE, SIDE), FILL)

        got = run_dali(graph, base, batch=40)
        want = [timm_op(name, b, sign, magnitude) for b in base]
        gap = change(got, want).mean()
        assert gap <= OP_TOLERANCE[name], f"{name} (sign {sign:+}): {gap:.3f} levels from timm's"
        assert change(want, base).mean() > max(1.0, 5 * OP_TOLERANCE[name]), name  # the op really changes images


@pytest.mark.slow
def test_rand_augment_matches_timm_in_distribution():
    """600 images through both, seeded: the share left unchanged within 3 standard errors, and the distributions of
    the per-image change indistinguishable by a two-sample KS test at the 1% level (critical value 1.628 *
    sqrt(2 / 600) = 0.094). DALI's stock ``auto_aug.rand_augment`` (the code before) fails both."""
    base = images(600)
    want = change(timm_rand_augment(base), base)
    got = change(run_dali(lambda x: ours.rand_augment(x, 2, 9, (SIDE, SIDE), FILL), base), base)
    stock = change(
        run_dali(
            lambda x: dali_stock.rand_augment(
                x, n=2, m=9, num_magnitude_bins=11, shape=(SIDE, SIDE), max_translate_rel=0.45
            ),
            base,
        ),
        base,
    )
    critical = 1.628 * np.sqrt(2 / len(base))
    unchanged_se = np.sqrt(2 * 0.25 * 0.75 / len(base))
    assert 0.2 < (want == 0).mean() < 0.32  # timm: both ops skipped (p = 0.25) or without effect
    assert abs((got == 0).mean() - (want == 0).mean()) < 3 * unchanged_se
    assert ks_statistic(got, want) < critical
    assert abs(got.mean() - want.mean()) < 0.1 * want.mean()
    # the stock suite: both ops always applied (almost nothing left unchanged), a different distribution
    assert abs((stock == 0).mean() - (want == 0).mean()) > 3 * unchanged_se
    assert ks_statistic(stock, want) > critical


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dali-gpu"])
def test_the_gpu_graph_matches_timm_in_distribution(backend):
    """The same augmentation with the images on the GPU (the dali-gpu backend's graph): same checks as on CPU."""
    base = images(600)
    want = change(timm_rand_augment(base), base)
    got = change(run_dali(lambda x: ours.rand_augment(x, 2, 9, (SIDE, SIDE), FILL), base, gpu=True), base)
    assert abs((got == 0).mean() - (want == 0).mean()) < 3 * np.sqrt(2 * 0.25 * 0.75 / len(base))
    assert ks_statistic(got, want) < 1.628 * np.sqrt(2 / len(base))
