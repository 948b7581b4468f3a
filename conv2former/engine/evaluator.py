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

    Padding samples (label -1, see ``conv2former.data.base``) are not counted.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes, self.device = num_classes, device

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
                labels = labels.to(self.device)
                # padding (label -1) is weighted 0 rather than masked out: boolean indexing would wait for the
                # device every batch (its result's size is data-dependent)
                weight = (labels >= 0).double()
                index = labels.clamp(min=0)
                hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == index.view(-1, 1)
                counts[:, 0].index_add_(0, index, hits[:, 0].double() * weight)
                counts[:, 1].index_add_(0, index, hits.any(1).double() * weight)
                counts[:, 2].index_add_(0, index, weight)
        if dist.is_initialized():
            dist.all_reduce(counts)
        model.train(was_training)
        totals = counts.sum(0)
        n = int(totals[2].item())
        return EvalResult(totals[0].item() / max(n, 1), totals[1].item() / max(n, 1), n, counts.cpu())
