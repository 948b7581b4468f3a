"""The ``torch`` backend, for machines without DALI: timm's transforms in a ``DataLoader`` with workers.

Samples are read by offset through the shard index (the same files DALI reads), which makes the data position
exact and cheap to restore: the order of an epoch is computed up front from (seed, epoch, rank) by the shared
dealing rule, batch ``b`` is a fixed list of samples, and each batch seeds its own augmentation RNGs, so a resumed
run reproduces the remaining batches bit for bit whatever the number of workers.
"""
from __future__ import annotations

import io
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from conv2former.config import DataConfig
from conv2former.data import shard_format as fmt
from conv2former.data.base import ShardLoader
from conv2former.data.shards import SplitShards, epoch_shard_order, rank_range, sample_seed

SampleRef = Tuple[str, Tuple[int, int], Tuple[int, int]]  # (tar path, jpg (offset, size), cls (offset, size))


def buffer_shuffle(refs: List[SampleRef], buffer: int, rng: random.Random) -> List[SampleRef]:
    """The order a streaming shuffle buffer of ``buffer`` samples produces (what a sequential reader can do)."""
    out, pool = [], []
    for ref in refs:
        if len(pool) < buffer:
            pool.append(ref)
            continue
        i = rng.randrange(len(pool))
        out.append(pool[i])
        pool[i] = ref
    rng.shuffle(pool)
    return out + pool


def timm_transform(cfg: DataConfig, train: bool):
    aug = cfg.augment
    if train:
        auto_augment = f"rand-m{aug.randaugment_m}-n{aug.randaugment_n}-mstd0.5-inc1" if aug.randaugment else None
        return create_transform(cfg.image_size, is_training=True, scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip,
                                vflip=0.0, color_jitter=None, auto_augment=auto_augment, interpolation="bicubic",
                                re_prob=0.0, mean=cfg.mean, std=cfg.std)
    return create_transform(cfg.image_size, is_training=False, crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode,
                            interpolation="bicubic", mean=cfg.mean, std=cfg.std)


class _Batches(Dataset):
    """Item ``b`` = batch ``b`` of the epoch: decoded, transformed and stacked in a worker."""

    def __init__(self, refs: List[Optional[SampleRef]], batch_size: int, transform, image_size: int, seed: int) -> None:
        self.refs, self.batch_size, self.transform = refs, batch_size, transform
        self.image_size, self.seed = image_size, seed

    def __len__(self) -> int:
        return len(self.refs) // self.batch_size

    def __getitem__(self, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_seed = (self.seed * 1_000_003 + b) & 0xFFFFFFFF  # timm's transforms draw from random, numpy, torch
        random.seed(batch_seed)
        np.random.seed(batch_seed)
        torch.manual_seed(batch_seed)
        images, labels = [], []
        for ref in self.refs[b * self.batch_size:(b + 1) * self.batch_size]:
            if ref is None:  # eval padding
                images.append(torch.zeros(3, self.image_size, self.image_size))
                labels.append(-1)
                continue
            path, (jpg_off, jpg_len), (cls_off, cls_len) = ref
            with open(path, "rb") as f:
                f.seek(cls_off)
                label = int(f.read(cls_len).decode("ascii"))
                f.seek(jpg_off)
                data = f.read(jpg_len)
            images.append(self.transform(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class TorchLoader(ShardLoader):
    """timm's transforms in a ``DataLoader`` whose items are whole batches (decoded and stacked in a worker)."""

    def __init__(self, cfg: DataConfig, shards: SplitShards, train: bool, rank: int, world_size: int,
                 device: torch.device) -> None:
        super().__init__(cfg, shards, train, rank, world_size, device, backend="torch")
        self.transform = timm_transform(cfg, train)
        self._iter = None

    def epoch_refs(self) -> List[Optional[SampleRef]]:
        """This rank's samples of the current epoch in order, cut (train) or padded (eval) to whole batches."""
        shards = self.shards.shards
        order = epoch_shard_order(len(shards), self.seed, self.epoch) if self.train else range(len(shards))
        refs: List[Optional[SampleRef]] = []
        for i in order:
            shard = shards[i]
            refs += [(shard.tar, s[fmt.IMAGE_KEY], s[fmt.CLASS_KEY]) for s in shard.samples]
        start, end = rank_range(len(refs), self.rank, self.world_size)
        refs = refs[start:end]
        if self.train:
            rng = random.Random(sample_seed(self.seed, self.epoch, self.rank))
            refs = buffer_shuffle(refs, self.cfg.shuffle_buffer, rng)
            return refs[: self.steps * self.batch_size]
        return refs + [None] * (self.steps * self.batch_size - len(refs))

    def _loader(self) -> DataLoader:
        dataset = _Batches(self.epoch_refs(), self.batch_size, self.transform, self.cfg.image_size,
                           sample_seed(self.seed, self.epoch, self.rank))
        return DataLoader(dataset, batch_size=None, sampler=range(self.step, self.steps),
                          num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=2 if self.cfg.workers else None, persistent_workers=False)

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader())
        images, labels = next(self._iter)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _reset(self) -> None:
        self._iter = None

    def _restore(self, state: Dict[str, Any]) -> None:
        self._iter = None  # the next batch is computed from (epoch, step) alone
