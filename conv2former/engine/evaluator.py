"""Top-1/top-5 over a split, every sample counted exactly once across ranks: the trainer's evaluation and
``launch/evaluate.py`` are this one code path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class EvalResult:
    top1: float
    top5: float
    num_samples: int
    per_class: torch.Tensor  # (classes, 3) float64 on the CPU: top-1 hits, top-5 hits, samples


class Evaluator:
    """Counts hits per class on the device (no host sync per batch) and all-reduces them once at the end.

    Labels are ``(B,)`` class indices, or ``(B, L)`` label sets padded with -1 (ImageNet-ReaL: a prediction is right
    when it is any of the sample's labels; per-class counts go to the first label). Padding samples (label -1, see
    ``conv2former.data.base``) are not counted. ``columns``: the logits scored, in label order (a set over a subset
    of the head's classes, e.g. ImageNet-A's 200 synsets, or a 1k set through a 22k head); all of them by default.
    """

    def __init__(self, num_classes: int, device: torch.device, columns: Optional[torch.Tensor] = None) -> None:
        self.num_classes, self.device = num_classes, device
        self.columns = None if columns is None else columns.to(device)
        if self.columns is not None and len(self.columns) != num_classes:
            raise ValueError(f"{len(self.columns)} columns for {num_classes} classes")

    @torch.no_grad()
    def run(
        self,
        model: torch.nn.Module,
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        input_dtype: torch.dtype = torch.float32,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> EvalResult:
        was_training = model.training
        model.eval()
        counts = torch.zeros(self.num_classes, 3, dtype=torch.float64, device=self.device)
        with torch.autocast(
            self.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            for images, labels in loader:
                logits = model(images.to(device=self.device, dtype=input_dtype)).float()
                if self.columns is not None:
                    logits = logits.index_select(1, self.columns)
                self._count(counts, logits, labels.to(self.device))
        if dist.is_initialized():
            dist.all_reduce(counts)
        model.train(was_training)
        totals = counts.sum(0)
        n = int(totals[2].item())
        return EvalResult(totals[0].item() / max(n, 1), totals[1].item() / max(n, 1), n, counts.cpu())

    @staticmethod
    def _count(counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        label_sets = labels.view(-1, 1) if labels.dim() == 1 else labels
        first = label_sets[:, 0]
        # padding (label -1) is weighted 0 rather than masked out: boolean indexing would wait for the
        # device every batch (its result's size is data-dependent)
        weight = (first >= 0).double()
        index = first.clamp(min=0)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = (top.unsqueeze(2) == label_sets.unsqueeze(1)).any(2)  # (B, k): prediction j is one of the labels
        counts[:, 0].index_add_(0, index, hits[:, 0].double() * weight)
        counts[:, 1].index_add_(0, index, hits.any(1).double() * weight)
        counts[:, 2].index_add_(0, index, weight)
