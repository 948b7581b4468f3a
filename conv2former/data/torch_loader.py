"""The ``torch`` backend, for machines without DALI: timm's transforms in a ``DataLoader`` with workers.

Samples are read by offset through the shard index (the same files DALI reads), which makes the data position
exact and cheap to restore: the order of an epoch is computed up front from (seed, epoch, rank) by the shared
dealing rule, batch ``b`` is a fixed list of samples, and each batch seeds its own augmentation RNGs, so a resumed
run reproduces the remaining batches bit for bit whatever the number of workers.
"""

from __future__ import annotations

import gc
import io
import random
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from conv2former.config import DataConfig
from conv2former.data import shard_format as fmt
from conv2former.data.base import ShardLoader
from conv2former.data.shards import SplitShards, sample_seed
from conv2former.data.size_schedule import SizeSchedule
from conv2former.errors import DataFault

PREFETCH = 2  # batches each DataLoader worker works ahead
SampleRef = Tuple[str, Tuple[int, int], Tuple[int, int]]  # (tar path, jpg (offset, size), cls (offset, size))


def buffer_shuffle(refs: List[SampleRef], buffer: int, rng: random.Random) -> List[SampleRef]:
    """The order a streaming shuffle buffer of ``buffer`` samples produces (what a sequential reader can do)."""
    out: List[SampleRef] = []
    pool: List[SampleRef] = []
    for ref in refs:
        if len(pool) < buffer:
            pool.append(ref)
            continue
        i = rng.randrange(len(pool))
        out.append(pool[i])
        pool[i] = ref
    rng.shuffle(pool)
    return out + pool


def timm_transform(cfg: DataConfig, train: bool, uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's train or eval transform of the recipe. ``uint8``: ending in uint8 CHW tensors (timm's prefetcher
    form, ``use_prefetcher=True``), normalized later (in the worker, or on a whole batch by ``normalize_batch``);
    else float, normalized."""
    aug = cfg.augment
    if train:
        auto_augment = f"rand-m{aug.randaugment_m}-n{aug.randaugment_n}-mstd0.5-inc1" if aug.randaugment else None
        return create_transform(
            cfg.image_size,
            is_training=True,
            scale=aug.scale,
            ratio=aug.ratio,
            hflip=aug.hflip,
            vflip=0.0,
            color_jitter=None,  # type: ignore[arg-type]  # no jitter (timm types the argument without None)
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=0.0,
            mean=cfg.mean,
            std=cfg.std,
            use_prefetcher=uint8,
        )
    return create_transform(
        cfg.image_size,
        is_training=False,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        interpolation="bicubic",
        mean=cfg.mean,
        std=cfg.std,
        use_prefetcher=uint8,
    )


def normalize_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch as float32 ``(x - 255 mean) / (255 std)``, as timm's PrefetchLoader does on the
    device (equal to ToTensor + Normalize up to float rounding)."""
    scale = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    shift = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    return images.float().sub_(shift).div_(scale)


def _batch_tensor(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch; inside a DataLoader worker in shared memory, as ``default_collate`` allocates it, so the batch
    reaches the training process without a copy."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return elem.new(storage).view(shape)


def read_sample(ref: SampleRef) -> Tuple[Image.Image, int]:
    """Decode one sample straight from its tar by offset; a deleted or truncated shard raises OSError."""
    path, (jpg_off, jpg_len), (cls_off, cls_len) = ref
    with open(path, "rb") as f:
        f.seek(cls_off)
        raw_label = f.read(cls_len)
        f.seek(jpg_off)
        data = f.read(jpg_len)
    if len(data) != jpg_len or len(raw_label) != cls_len:
        raise OSError(f"short read at offset {jpg_off}: the file ends early")
    return Image.open(io.BytesIO(data)).convert("RGB"), int(raw_label.decode("ascii"))


class _Batches(Dataset[Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]]):
    """Item ``b`` = batch ``b`` of the epoch: decoded, transformed and stacked in a worker, with the list of
    (shard, problem) for samples whose shard was unreadable (the main process reports them). When skipping, such a
    sample is replaced by the next readable one of the epoch; otherwise the batch ends there."""

    def __init__(
        self,
        refs: List[Optional[SampleRef]],
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        seed: int,
        skip: bool,
        normalize: Optional[Tuple[Sequence[float], Sequence[float]]],
    ) -> None:
        self.refs, self.batch_size, self.transform = refs, batch_size, transform
        self.image_size, self.seed, self.skip = image_size, seed, skip
        # given (mean, std): the transform's uint8 images are normalized here, each straight into its slot of the
        # batch, as timm's ToTensor + Normalize; None: the batch stacks what the transform returns
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        if normalize is not None:
            self.mean = torch.tensor(normalize[0], dtype=torch.float32).view(3, 1, 1)
            self.std = torch.tensor(normalize[1], dtype=torch.float32).view(3, 1, 1)
        self.bad: Dict[str, str] = {}  # shard -> problem, as this worker found them

    def __len__(self) -> int:
        return len(self.refs) // self.batch_size

    def __getitem__(self, b: int) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
        batch_seed = (self.seed * 1_000_003 + b) & 0xFFFFFFFF  # timm's transforms draw from random, numpy, torch
        random.seed(batch_seed)
        np.random.seed(batch_seed)
        torch.manual_seed(batch_seed)
        normalized = self._new_batch() if self.mean is not None else None
        images: List[Optional[torch.Tensor]] = []
        labels: List[int] = []
        problems: List[Tuple[str, str]] = []
        for k, i in enumerate(range(b * self.batch_size, (b + 1) * self.batch_size)):
            sample = self._sample(i, problems) if self.refs[i] is not None else None
            image = None if sample is None else self.transform(sample[0])  # None: eval padding, or an unreadable shard
            labels.append(-1 if sample is None else sample[1])
            if normalized is None:
                images.append(image)
            else:
                self.normalize_into(normalized[k], image)  # while the image is in cache
        batch = normalized if normalized is not None else self._stack(images)
        return batch, torch.tensor(labels, dtype=torch.int64), problems

    def _new_batch(self) -> torch.Tensor:
        return _batch_tensor((self.batch_size, 3, self.image_size, self.image_size), torch.float32)

    def normalize_into(self, slot: torch.Tensor, image: Optional[torch.Tensor]) -> None:
        """``slot`` = the uint8 ``image`` as float ``(x / 255 - mean) / std``, bit for bit what timm's ToTensor +
        Normalize compute (the same IEEE operations in the same order), written in place; zeros for padding (None)."""
        if image is None:
            slot.zero_()
        else:
            assert self.mean is not None and self.std is not None  # (normalizing: given at construction)
            torch.div(image, 255, out=slot).sub_(self.mean).div_(self.std)

    def _stack(self, images: List[Optional[torch.Tensor]]) -> torch.Tensor:
        """The batch (default_collate: in shared memory in a worker, no copy when it is sent); padding as zeros of
        the images' dtype."""
        dtype = next((x.dtype for x in images if x is not None), torch.float32)
        pad = torch.zeros(3, self.image_size, self.image_size, dtype=dtype)
        return default_collate([pad if x is None else x for x in images])

    def _sample(self, i: int, problems: List[Tuple[str, str]]) -> Optional[Tuple[Image.Image, int]]:
        ref = self.refs[i]
        assert ref is not None  # (padding is never read)
        tar = ref[0]
        sample = self._read(ref)
        if sample is not None:
            return sample
        problems.append((tar, self.bad[tar]))
        if not self.skip:
            return None
        for k in range(1, len(self.refs)):  # skipping: the next readable sample of the epoch instead
            sample = self._read(self.refs[(i + k) % len(self.refs)])
            if sample is not None:
                return sample
        return None

    def _read(self, ref: Optional[SampleRef]) -> Optional[Tuple[Image.Image, int]]:
        if ref is None or ref[0] in self.bad:
            return None
        try:
            return read_sample(ref)
        except (OSError, ValueError) as err:  # deleted, truncated, or garbage where the index points
            self.bad[ref[0]] = f"became unreadable ({type(err).__name__}: {str(err)[:120]})"
            return None


class TorchLoader(ShardLoader):
    """timm's transforms in a ``DataLoader`` whose items are whole batches (decoded and stacked into shared memory
    in a worker; uint8 and normalized on the device when it is a GPU, normalized in the worker on CPU). The next
    epoch's workers start while the current epoch's last batches are made."""

    reads_previous_epoch_late = True  # (the early start): a remote root's files of the last epoch stay held

    def __init__(
        self,
        cfg: DataConfig,
        shards: SplitShards,
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
        sizes: Optional[SizeSchedule] = None,
    ) -> None:
        super().__init__(cfg, shards, train, rank, world_size, device, "torch", sizes)
        # timm's transform ending in uint8 images (its prefetcher form). GPU: uint8 batches (a quarter of the bytes
        # through shared memory and PCIe), normalized on the device; CPU: each image normalized in the worker straight
        # into the shared batch (cache-resident, no stacking copy), so the training process does none of it.
        # (normalize_at None: the batches are stacked as the transform returns them, e.g. timm's float transform.)
        self.transform = timm_transform(cfg, train, uint8=True)  # at cfg.image_size
        # the size schedule's other (size, RandAugment magnitude) pairs
        self._sized_transforms: Dict[Tuple[int, int], Callable[[Image.Image], torch.Tensor]] = {}
        self.normalize_at: Optional[str] = "device" if device.type == "cuda" else "worker"
        self._iter: Optional[Iterator[Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]]] = None
        self._next_epoch: Optional[Tuple[int, Any]] = None  # (epoch, its iterator) started before this epoch ended

    def epoch_refs(self) -> List[Optional[SampleRef]]:
        """This rank's samples of the current epoch in order, cut (train) or padded (eval) to whole batches."""
        refs: List[SampleRef] = []
        for shard, first, stop in self.epoch_slices():
            refs += [(shard.tar, jpg, cls) for jpg, cls in shard.members((fmt.IMAGE_KEY, fmt.CLASS_KEY), first, stop)]
        if self.train:
            rng = random.Random(sample_seed(self.seed, self.epoch, self.rank))
            refs = buffer_shuffle(refs, self.cfg.shuffle_buffer, rng)
            need = self.steps * self.batch_size
            return list((refs * -(-need // len(refs)))[:need])  # shards skipped: the range is read again from its start
        return [*refs, *[None] * (self.steps * self.batch_size - len(refs))]

    def _loader(self) -> "DataLoader[Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]]":
        if self.cfg.workers and "nvidia.dali" in sys.modules:
            # the workers are forked: collect unreachable DALI pipelines (reference cycles) here first, or a
            # collection inside a worker runs their shutdown there, where their threads do not exist, and hangs
            # (a full collection takes ~0.2 s in a process with torch and timm loaded: only where DALI ran)
            gc.collect()
        cfg = self.epoch_cfg()  # the epoch's crop size (progressive resizing)
        dataset = _Batches(
            self.epoch_refs(),
            self.batch_size,
            self._transform(cfg),
            cfg.image_size,
            sample_seed(self.seed, self.epoch, self.rank),
            self.skip_bad_shards,
            (self.cfg.mean, self.cfg.std) if self.normalize_at == "worker" else None,
        )
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=range(self.step, self.steps),
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=PREFETCH if self.cfg.workers else None,
            persistent_workers=False,
        )

    def _transform(self, cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
        if cfg is self.cfg:
            return self.transform
        key = (cfg.image_size, cfg.augment.randaugment_m)
        if key not in self._sized_transforms:
            self._sized_transforms[key] = timm_transform(cfg, self.train, uint8=True)
        return self._sized_transforms[key]

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = self._take_next_epoch() or iter(self._loader())
        images, labels, problems = next(self._iter)
        if self.train and self.cfg.workers and self.step == max(0, self.steps - 1 - PREFETCH * self.cfg.workers):
            self._start_next_epoch()  # every remaining batch of this epoch is already given to a worker
        for tar, problem in problems:
            self.bad_shard(tar, problem, samples=1)  # raises unless skipping
        if self.train and bool((labels < 0).any()):
            raise DataFault(f"rank {self.rank}: no readable sample left in {self.shards.root} {self.shards.split}")
        images = images.to(self.device, non_blocking=True)
        if self.normalize_at == "device":
            images = normalize_batch(images, self.cfg.mean, self.cfg.std)
        return images, labels.to(self.device, non_blocking=True)

    def _start_next_epoch(self) -> None:
        """Once every batch of this epoch is in the workers' hands, start the next epoch's workers: they fork and fill
        their queue while the last batches are made and trained, so an epoch does not begin with a fork and an empty
        queue (the old workers have nothing left to start; the cores stay busy)."""
        epoch, step = self.epoch, self.step
        self.epoch, self.step = epoch + 1, 0
        self._apply_epoch_batch()
        try:
            self._next_epoch = (self.epoch, iter(self._loader()))
        except DataFault:
            pass  # an unreadable shard: the next epoch reports it when it begins, after this epoch's checkpoint
        finally:
            self.epoch, self.step = epoch, step
            self._apply_epoch_batch()

    def _take_next_epoch(self) -> Optional[Iterator[Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]]]:
        started, self._next_epoch = self._next_epoch, None
        if started is not None and started[0] == self.epoch and self.step == 0:
            return started[1]
        return None  # another epoch or position was asked for (set_epoch, a restored state): not this one

    def _reset(self) -> None:
        self._iter = None

    def _restore(self, state: Dict[str, Any]) -> None:
        self._iter = None  # the next batch is computed from (epoch, step) alone
        self._next_epoch = None
