"""Effective receptive fields per stage (paper Table 5 and Fig. 4), by the method of RepLKNet that the paper uses.

For each image and each stage: the stage's output map ``y`` (C, h, w) for an input ``x`` (3, H, W); the score
``sum_c y[c, h//2, w//2]`` (the central point, summed over channels); its gradient with respect to ``x``. The
contribution map of the stage is ``|grad|`` summed over the 3 input channels and over the images: (H, W), one
value per input pixel. (RepLKNet applies ReLU to the central point and to the gradient; we keep every
contribution, positive or negative, as absolute values.)

Metrics (computed on the map as the paper's source does: ``m = log10(map + 1)``, then ``m / max(m)``):

* ``side_length(t)``: the side s (odd, in input pixels) of the smallest square centred on the input's centre whose
  sum holds at least the fraction ``t`` of the whole map's sum;
* ``area_ratio(t) = s^2 / (H * W)``: how much of the input that square covers;
* Table 5's columns: both at t = 0.5 and t = 0.75, and their mean over t = 0.50, 0.55, ..., 0.90.

A larger side length or area ratio means the stage draws on a wider region of the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch
import torch.nn as nn

from conv2former.errors import UserError

TABLE5_THRESHOLDS = (0.5, 0.75)
MEAN_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.50 ... 0.90


def side_length(scores: np.ndarray, threshold: float) -> int:
    """The smallest odd side of a centred square holding at least ``threshold`` of ``scores``' sum."""
    h, w = scores.shape
    total = float(scores.sum())
    if total <= 0:
        return 0
    cy, cx = h // 2, w // 2
    # the sum inside the centred square of half-width r, for every r at once, from a summed-area table
    table = np.pad(scores, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    for r in range(0, max(h, w)):
        top, bottom, left, right = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        inside = table[bottom, right] - table[top, right] - table[bottom, left] + table[top, left]
        if inside >= threshold * total * (1 - 1e-12):
            return 2 * r + 1
    return 2 * (max(h, w) // 2) + 1


def normalised(scores: np.ndarray) -> np.ndarray:
    """What the metrics and the figure use: log10(scores + 1), rescaled to a maximum of 1."""
    logged = np.log10(scores.astype(np.float64) + 1.0)
    peak = logged.max()
    return logged / peak if peak > 0 else logged


@dataclass
class StageErf:
    """One stage's accumulated contribution map and its Table 5 metrics."""

    stage: int
    scores: np.ndarray  # (H, W): |d central point / d input| summed over input channels and images
    images: int
    metrics: Dict[str, float] = field(default_factory=dict)

    def compute_metrics(self) -> Dict[str, float]:
        m = normalised(self.scores)
        area = float(m.shape[0] * m.shape[1])
        out: Dict[str, float] = {}
        for t in TABLE5_THRESHOLDS:
            s = side_length(m, t)
            out[f"side_{t:g}"], out[f"area_{t:g}"] = s, s * s / area
        sides = [side_length(m, t) for t in MEAN_THRESHOLDS]
        out["side_mean"] = float(np.mean(sides))
        out["area_mean"] = float(np.mean([s * s / area for s in sides]))
        self.metrics = out
        return out


class ErfMeter:
    """Accumulates the contribution maps of every stage of a ``features_only`` model over images."""

    def __init__(self, model: nn.Module, stages: Sequence[int]) -> None:
        self.model, self.stages = model, list(stages)
        self.sums: Dict[int, np.ndarray] = {}
        self.images = 0

    def add(self, images: torch.Tensor) -> None:
        """One batch (N, 3, H, W): each image's gradients are taken separately (the central point is per image)."""
        for image in images:
            x = image[None].detach().clone().requires_grad_(True)
            features = self.model(x)
            for i, stage in enumerate(self.stages):
                y = features[i]
                h, w = y.shape[-2:]
                centre = y[0, :, h // 2, w // 2].sum()
                (grad,) = torch.autograd.grad(centre, x, retain_graph=i + 1 < len(self.stages))
                contribution = grad[0].abs().sum(0).double().cpu().numpy()
                self.sums[stage] = self.sums.get(stage, 0) + contribution
            self.images += 1

    def result(self) -> List[StageErf]:
        if not self.images:
            raise UserError("no images were measured: give --images 1 or more and a split that holds images")
        out = [StageErf(stage, self.sums[stage], self.images) for stage in self.stages]
        for erf in out:
            erf.compute_metrics()
        return out


def measure(model: nn.Module, batches: Iterable[torch.Tensor], stages: Sequence[int]) -> List[StageErf]:
    """The ERF of each stage of ``model`` (a timm ``features_only`` model, eval mode) over the given batches."""
    meter = ErfMeter(model, stages)
    for images in batches:
        meter.add(images)
    return meter.result()
