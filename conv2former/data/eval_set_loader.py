"""Batches of an evaluation set read from its image folders (``conv2former.data.eval_sets``): each rank reads every
world-th image, decoded with PIL through timm's eval transform (validate.py's path: these sets are image folders,
not shards, so the shard loaders' DALI pipelines do not apply)."""

from __future__ import annotations

from typing import Iterator, List, Tuple

import fsspec
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conv2former.config import DataConfig
from conv2former.data.eval_sets import EvalSet
from conv2former.data.torch_loader import timm_transform
from conv2former.errors import UserError

__all__ = ["eval_set_batches"]


class _Images(Dataset[Tuple[torch.Tensor, torch.Tensor, str]]):
    """This rank's images of the set: (image, label set padded with -1, problem or "")."""

    def __init__(self, eval_set: EvalSet, cfg: DataConfig, rank: int, world: int) -> None:
        self.files = eval_set.files[rank::world]
        self.labels = eval_set.labels[rank::world]
        self.width = max(len(labels) for labels in eval_set.labels)
        self.transform = timm_transform(cfg, train=False)
        self.size = cfg.image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
        labels = torch.full((self.width,), -1, dtype=torch.int64)
        labels[: len(self.labels[i])] = torch.tensor(self.labels[i])
        try:
            with fsspec.open(self.files[i], "rb") as f:
                image = Image.open(f).convert("RGB")
            return self.transform(image), labels, ""
        except (OSError, ValueError) as err:  # PIL raises OSError/UnidentifiedImageError for bad files
            return torch.zeros(3, self.size, self.size), labels, f"{self.files[i]}: {err}"


def eval_set_batches(
    eval_set: EvalSet, cfg: DataConfig, rank: int, world: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, label sets) batches of this rank's share; a one-line UserError names an image that does not
    decode."""
    loader: DataLoader[Tuple[torch.Tensor, torch.Tensor, str]] = DataLoader(
        _Images(eval_set, cfg, rank, world),
        batch_size=cfg.micro_batch(),
        num_workers=cfg.workers,
        persistent_workers=False,
    )
    for images, labels, problems in loader:
        bad: List[str] = [p for p in problems if p]
        if bad:
            raise UserError(f"cannot decode {bad[0]}: remove the file or re-download {eval_set.name}")
        yield images, labels
