"""Augmentations on the device batch, shared by every backend: random erasing, then Mixup/CutMix (timm's)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from conv2former.config import AugmentConfig
from conv2former.errors import UserError


class BatchAugment:
    """``(images, labels) -> (images, soft targets)`` on the device the batch lives on.

    Targets are always (B, num_classes) probability rows (smoothed one-hot when Mixup/CutMix are off), so the loss
    is the same soft-target cross-entropy in every configuration.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.erase = (
            RandomErasing(cfg.random_erasing, mode="pixel", device=str(device)) if cfg.random_erasing > 0 else None
        )
        self.mixup: Optional[Mixup] = None
        self.alphas = (cfg.mixup, cfg.cutmix)  # the configured Mixup and CutMix alphas (strength 1)
        self.smoothing = cfg.label_smoothing
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                mode="batch",
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )

    def set_strength(self, strength: float) -> None:
        """Mixup and CutMix alphas at ``strength`` times the configured ones (progressive regularization)."""
        if self.mixup is not None:
            self.mixup.mixup_alpha = self.alphas[0] * strength
            self.mixup.cutmix_alpha = self.alphas[1] * strength

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise UserError(
                    f"Mixup/CutMix need an even batch per rank, got {images.shape[0]}: change the "
                    "micro-batch or turn mixup and cutmix off"
                )
            return self.mixup(images, labels)
        off = self.smoothing / self.num_classes
        targets = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return images, targets.scatter_(1, labels.view(-1, 1), 1.0 - self.smoothing + off)
