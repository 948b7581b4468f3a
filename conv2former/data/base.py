"""``ShardLoader``: what every backend shares: the data position, the dealing rule, eval padding.

Every loader is an iterable over the remaining steps of its current epoch, with ``len()`` = steps per epoch,
``set_epoch(e)``, and ``state_dict()/load_state_dict()`` holding the data position (epoch, step, and DALI's own
pipeline checkpoint), so a run resumed mid-epoch continues with the samples it had not seen, in the same order.
Training batches are full and every rank has the same number of them; evaluation batches keep a fixed shape and
mark padding with label -1 (see ``conv2former.data.shards`` for the exact dealing rule). The backends
(``dali_loader.DaliLoader``, ``torch_loader.TorchLoader``) produce the batches; ``loader.build_loader`` picks one.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch

from conv2former.config import DataConfig
from conv2former.data.shards import (
    Shard,
    SplitShards,
    epoch_shard_order,
    eval_steps,
    rank_range,
    shard_problem,
    train_steps,
)
from conv2former.data.size_schedule import SizeSchedule
from conv2former.errors import DataFault, UserError
from conv2former.units import human


def local_world_size() -> int:
    """The ranks of this node, from whichever launcher started them (torchrun, deepspeed, Slurm), else 1."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0].split(",")[0]
        if value.isdigit():
            return int(value)
    return 1


class ShardLoader(abc.ABC):
    """The state and the dealing rule every backend shares; subclasses produce the batches."""

    reads_previous_epoch_late = False  # a backend whose next epoch starts before the last one's files are read

    def __init__(
        self,
        cfg: DataConfig,
        shards: SplitShards,
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
        backend: str,
        sizes: Optional[SizeSchedule] = None,
    ) -> None:
        self.backend = backend  # "dali-gpu", "dali-cpu" or "torch": recorded in the data position
        self.cfg, self.shards, self.train = cfg, shards, train
        self.sizes = sizes if train else None  # progressive resizing (training only; evaluation: cfg.image_size)
        self.seed = 0 if cfg.seed is None else cfg.seed  # shard order and augmentation draws
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size = cfg.micro_batch() if train else (cfg.eval_batch_size or cfg.micro_batch())
        self.num_classes = shards.num_classes
        self.epoch, self.step = 0, 0
        self.skip_bad_shards = bool(cfg.skip_bad_shards) and train  # evaluation never skips: its counts would lie
        self.skipped_shards: List[str] = []  # shards found unreadable and skipped (this rank), kept across resumes
        self.skipped_samples = 0  # samples replaced because their shard was unreadable (this rank)
        total = shards.num_samples
        self.steps = (train_steps if train else eval_steps)(total, world_size, self.batch_size)
        self.base_batch, self.base_steps = self.batch_size, self.steps  # the final size's (what the schedule counts)
        self.per_rank_batch: Optional[int] = None  # set by scale_batch_with_size: micro-batch x accumulation
        self.even_batch = False
        if self.steps == 0:
            raise UserError(
                f"batch {self.batch_size} per rank x {world_size} ranks is more than the {total} samples of "
                f"{shards.root} {shards.split}: lower the micro-batch or use fewer ranks"
            )
        start, end = rank_range(total, rank, world_size)
        self.rank_samples = end - start
        self._previous_files: Set[str] = set()  # remote roots: the files of the epoch served before (still being read)
        self._fetched_once = False
        if shards.cache is not None and shards.cache.limit is not None:
            self._check_cache_limit()
        # channels_last batches make cuDNN pick its NHWC kernels; the model's parameters stay contiguous (DeepSpeed
        # flattens and broadcasts them and rejects channels_last ones)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"

    def __len__(self) -> int:
        return self.base_steps

    def scale_batch_with_size(self, per_rank_batch: int, even: bool) -> None:
        """With ``data.size_schedule_scale_batch``: each epoch's micro-batch from the size schedule (a divisor of
        ``per_rank_batch``; even when Mixup needs it), and its steps."""
        self.per_rank_batch, self.even_batch = per_rank_batch, even
        self._apply_epoch_batch()

    def epoch_batch(self, epoch: Optional[int] = None) -> int:
        """The micro-batch of ``epoch`` (default: the current one)."""
        if self.sizes is None or self.per_rank_batch is None:
            return self.base_batch
        epoch = self.epoch if epoch is None else epoch
        return self.sizes.micro_batch(epoch, self.base_batch, self.per_rank_batch, self.even_batch)

    def _apply_epoch_batch(self) -> None:
        """The current epoch's micro-batch and steps (unchanged without batch scaling)."""
        batch = self.epoch_batch()
        if batch != self.batch_size:
            self.batch_size = batch
            self.steps = train_steps(self.shards.num_samples, self.world_size, batch)

    def image_size(self, epoch: Optional[int] = None) -> int:
        """The crop side of ``epoch`` (default: the current one): the size schedule's, else ``cfg.image_size``."""
        return self.sizes.size(self.epoch if epoch is None else epoch) if self.sizes else self.cfg.image_size

    def epoch_cfg(self) -> DataConfig:
        """``cfg`` with the current epoch's crop size (and, with progressive regularization, its RandAugment
        magnitude, rounded as timm parses it): what the backends build the epoch's transforms from."""
        cfg = self.cfg
        size = self.image_size()
        if size != cfg.image_size:
            cfg = dataclasses.replace(cfg, image_size=size)
        strength = self.sizes.strength(self.epoch) if self.sizes else 1.0
        if strength != 1.0:
            magnitude = round(cfg.augment.randaugment_m * strength)
            cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, randaugment_m=magnitude))
        return cfg

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0
            self._apply_epoch_batch()
            self._reset()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while self.step < self.steps:
            images, labels = self._next_batch()
            if not self.train:  # eval: positions past this rank's range are padding
                valid = max(0, min(self.batch_size, self.rank_samples - self.step * self.batch_size))
                labels[valid:] = -1
            self.step += 1
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
        self.epoch, self.step = self.epoch + 1, 0
        self._apply_epoch_batch()
        self._reset()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "backend": self.backend,
            "epoch": self.epoch,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "image_size": self.image_size(),
            "skipped_shards": list(self.skipped_shards),
            "skipped_samples": self.skipped_samples,
            **self._extra_state(),
        }

    # unreadable shards
    def epoch_shards(self) -> List[Shard]:
        """The shards of the current epoch in reading order (training: the epoch's permutation), each checked with
        one stat; an unreadable one stops the run (``DataFault``) or, with ``data.skip_bad_shards``, is left out.
        Steps per epoch do not change: a rank whose range shrinks reads it again from the start."""
        order = (
            epoch_shard_order(len(self.shards.shards), self.seed, self.epoch)
            if self.train
            else range(len(self.shards.shards))
        )
        good = []
        for i in order:
            shard = self.shards.shards[i]
            if shard.tar in self.skipped_shards:
                continue
            problem = shard_problem(shard)
            if problem is None:
                good.append(shard)
            else:
                self.bad_shard(shard.tar, problem)
        if not good:
            raise DataFault(f"rank {self.rank}: every shard of {self.shards.root} {self.shards.split} is unreadable")
        return good

    def epoch_slices(self) -> List[Tuple[Shard, int, int]]:
        """``rank_slices(epoch_shards())`` with each of those shards local. Under a remote root they are fetched now
        (those the background has not fetched yet; a shard that cannot be fetched is an unreadable one,
        ``bad_shard``), the files of the epoch before stay held while its last batches are read, and the next
        epoch's start fetching in the background."""
        cache = self.shards.cache
        slices = self.rank_slices(self.epoch_shards())
        if cache is None:
            return slices
        cache.release({shard.tar for shard, _, _ in slices} | self._previous_files)  # the rest may be evicted now
        while True:
            bar = self._fetch_bar(slices)
            failed = cache.fetch([shard.wanted() for shard, _, _ in slices], bar.update if bar else None)
            if bar is not None:
                bar.close()
            if not failed:
                break
            for shard, _, _ in slices:
                if shard.url in failed:
                    self.bad_shard(shard.tar, f"({shard.url}) cannot be fetched: {failed[shard.url]}")
            slices = self.rank_slices(self.epoch_shards())
        self._fetched_once = True
        # the torch backend starts an epoch while workers still read the last one's files: those stay held
        self._previous_files = {shard.tar for shard, _, _ in slices} if self.reads_previous_epoch_late else set()
        if self.train:
            cache.prefetch(shard.wanted() for shard, _, _ in self._quiet_slices(self.epoch + 1))
        return slices

    def _quiet_slices(self, epoch: int) -> List[Tuple[Shard, int, int]]:
        """The slices of ``epoch`` as far as known now (nothing reported: that epoch reports when it starts)."""
        n = len(self.shards.shards)
        order = epoch_shard_order(n, self.seed, epoch) if self.train else range(n)
        good = [self.shards.shards[i] for i in order]
        good = [s for s in good if s.tar not in self.skipped_shards and shard_problem(s) is None]
        return self.rank_slices(good) if good else []

    def _fetch_bar(self, slices: List[Tuple[Shard, int, int]]) -> Any:
        """A progress bar on each node's first rank for a first fetch with something to download."""
        missing = [shard for shard, _, _ in slices if not os.path.exists(shard.tar)]
        if self._fetched_once or not missing or os.environ.get("LOCAL_RANK", "0") != "0":
            return None
        from tqdm import tqdm

        size = human(sum(shard.size for shard in missing))
        return tqdm(total=len(slices), unit="shard", file=sys.stderr, dynamic_ncols=True,
                    desc=f"fetch {self.shards.split} ({len(missing)} shards, {size})")  # fmt: skip

    def _check_cache_limit(self) -> None:
        """A limit below what the node's ranks read in one epoch can never work: one line now."""
        share = sum(shard.size for shard, _, _ in self._quiet_slices(self.epoch))
        ranks = local_world_size()
        need = share * ranks * (2 if self.reads_previous_epoch_late else 1)
        cache = self.shards.cache
        assert cache is not None and cache.limit is not None  # (checked only for a remote root with a limit)
        if cache.limit < need:
            raise UserError(
                f"data.cache_limit {human(cache.limit)} is smaller than one epoch of the "
                f"{self.shards.split} split for the {ranks} rank(s) of this node ({human(need)}): set it to at least "
                f"{human(need)} ({human(2 * need)} lets the next epoch be fetched during this one)"
            )

    def summary(self) -> Dict[str, Any]:
        """Its fields of the run summary: this rank's skipped shards (every rank warns for its own) and, from a remote
        root, its downloads and cache hits."""
        return {"skipped_shards": self.skipped_shards, "data_fetch": self.fetch_stats()}

    def fetch_stats(self) -> Dict[str, Any]:
        """What this loader's rank fetched from a remote root (files, bytes, cache hits, seconds), or {}."""
        return self.shards.cache.stats.as_dict() if self.shards.cache is not None else {}

    def rank_slices(self, shards: List[Shard]) -> List[Tuple[Shard, int, int]]:
        """This rank's part of the epoch's sample sequence (the shards in reading order, concatenated): the shards
        it overlaps, each with the [first, stop) range of its samples that belong to this rank. Only these are read:
        at 1,400 shards a rank of 8 opens ~175 indexes instead of every one."""
        start, end = rank_range(sum(len(shard) for shard in shards), self.rank, self.world_size)
        slices, first = [], 0  # first: the epoch position of the shard's first sample
        for shard in shards:
            if first < end and first + len(shard) > start:
                slices.append((shard, max(0, start - first), min(len(shard), end - first)))
            first += len(shard)
        return slices

    def bad_shard(self, tar: str, problem: str, samples: int = 0) -> None:
        """Report shard ``tar`` unreadable: raise ``DataFault`` naming it and the data position, or (skipping) warn
        once per shard and count it and the ``samples`` replaced."""
        where = f"epoch {self.epoch}, step {self.step} of the {self.shards.split} split"
        if not self.skip_bad_shards:
            raise DataFault(
                f"rank {self.rank}: shard {tar} {problem} at {where}; restore it (data_prep/shard.py verify names "
                "damaged shards) and relaunch to resume from the newest checkpoint, or skip unreadable shards with "
                "--set data.skip_bad_shards=true"
            )
        self.skipped_samples += samples
        if tar not in self.skipped_shards:
            self.skipped_shards.append(tar)
            logging.getLogger("conv2former").warning(
                f"warning: rank {self.rank}: skipping shard {tar}: it {problem} ({where}); "
                f"{len(self.skipped_shards)} shard(s) skipped so far"
            )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        same_dealing = (state.get("world_size"), state.get("seed"), state.get("backend")) == (
            self.world_size,
            self.seed,
            self.backend,
        )
        self.epoch = int(state["epoch"])
        self._apply_epoch_batch()
        saved_size = state.get("image_size")
        if saved_size is not None and int(saved_size) != self.image_size():
            warnings.warn(
                f"the data position was saved at {saved_size} px in epoch {self.epoch}; the size schedule now gives "
                f"{self.image_size()} px there (data.size_schedule or data.image_size changed): the rest of the "
                "epoch is cropped at the new size"
            )
        self.skipped_shards = list(state.get("skipped_shards", []))
        self.skipped_samples = int(state.get("skipped_samples", 0))
        if not same_dealing:
            warnings.warn(
                f"data position saved with {state.get('world_size')} ranks, seed {state.get('seed')}, backend "
                f"{state.get('backend')} cannot be replayed on {self.world_size} ranks, seed {self.seed}, backend "
                f"{self.backend}: epoch {self.epoch} restarts from its start"
            )
            self.step = 0
            self._reset()
            return
        self.step = int(state["step"])
        self._restore(state)

    # backend hooks
    @abc.abstractmethod
    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the current epoch, on the loader's device."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Forget the running epoch (the next batch starts ``self.epoch`` at ``self.step``)."""

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    @abc.abstractmethod
    def _restore(self, state: Dict[str, Any]) -> None:
        """Continue from ``state`` (``self.epoch``/``self.step`` are already set)."""
