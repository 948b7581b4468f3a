"""A split's shards, checked and made local, and the rule that deals samples to ranks.

The rule (both backends follow it):
  * epoch ``e`` visits the shards in a permutation drawn from (seed, e);
  * concatenating the shards in that order gives N samples; rank r of W reads the contiguous range
    [N*r//W, N*(r+1)//W) (exactly what DALI's ``shard_id``/``num_shards`` does), through a shuffle buffer
    seeded by (seed, e, r);
  * training: every rank runs ``(N // W) // batch`` steps (full batches; the few samples at the end of a range
    wait for another epoch), so no rank waits for another at the epoch end;
  * evaluation: shards in their stored order, the same ranges, no shuffle, every rank runs
    ``ceil(ceil(N / W) / batch)`` steps; samples past a rank's range are padding with label -1, so each sample
    is counted exactly once across ranks.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import posixpath
import random
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import fsspec

from conv2former.data import shard_format as fmt
from conv2former.errors import UserError

Component = Tuple[int, int]  # (offset, size) of one member's data in the tar


@dataclass
class Shard:
    tar: str                     # local path DALI and the torch backend read
    index: str                   # local path of the (possibly tail-trimmed) DALI index
    samples: List[Dict[str, Component]]

    def __len__(self) -> int:
        return len(self.samples)

    @functools.cached_property
    def end(self) -> int:
        """The tar's bytes the index needs (the end of its last member's data)."""
        return max((o + n for s in self.samples for o, n in s.values()), default=0)


def shard_problem(shard: Shard) -> Optional[str]:
    """Why ``shard`` cannot be read now (deleted, or truncated below what its index needs), or None: one stat."""
    try:
        size = os.stat(shard.tar).st_size
    except OSError as err:
        return f"cannot be opened ({err.strerror})"
    if size < shard.end:
        return f"is truncated ({size} bytes; its index needs {shard.end})"
    return None


@dataclass
class SplitShards:
    root: str
    split: str
    num_classes: int
    shards: List[Shard]

    @property
    def num_samples(self) -> int:
        return sum(len(s) for s in self.shards)


def _parse_index(text: str, where: str) -> List[Dict[str, Component]]:
    lines = text.splitlines()
    try:
        count = fmt.index_sample_count(lines[0] if lines else "")
    except ValueError:
        raise UserError(f"{where}: not a DALI index (expected a '{fmt.INDEX_VERSION} N' first line)") from None
    samples = []
    for line in lines[1 : count + 1]:
        parts = line.split()
        samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)})
    if len(samples) != count:
        raise UserError(f"{where}: index announces {count} samples but lists {len(samples)}")
    return samples


def _local_copy(url: str, cache_dir: Optional[str]) -> str:
    """A local path for ``url``: itself when local, else a cached download (DALI reads local files only)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return path
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "conv2former", "shards")
    local = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + posixpath.basename(path))
    if not os.path.exists(local):
        os.makedirs(cache, exist_ok=True)
        fs.get_file(path, local + ".partial")
        os.replace(local + ".partial", local)
    return local


def _check_member_names(tar_path: str, samples: List[Dict[str, Component]], where: str) -> None:
    """The tar header before the first and last sample's first member must name that member."""
    with open(tar_path, "rb") as f:
        for sample in (samples[0], samples[-1]):
            ext, (offset, _) = next(iter(sample.items()))
            if offset < 512:
                raise UserError(f"{where}: index does not match its tar (offset {offset}); re-run shard.py")
            f.seek(offset - 512)
            name = f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")
            if not name.endswith("." + ext):
                raise UserError(f"{where}: index does not match its tar (member {name!r} at {offset - 512}); "
                                "re-run shard.py or recreate the index with wds2idx")


def open_split(root: str, split: str, cache_dir: Optional[str] = None, keep_missing: bool = False) -> SplitShards:
    """Read ``root``'s manifest for ``split``, check every shard against its index, and make them local.

    ``keep_missing`` (training with ``data.skip_bad_shards``): a local shard whose tar is gone but whose index is
    there is kept, with a warning, so the epoch's length and the schedule stay what they were; the loader skips it."""
    if not root:
        raise UserError("no data root given: pass --data DIR_OR_URL (a shard root made by data_prep/shard.py)")
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise UserError(f"data root not found: {root}")
    info = fmt.read_info(root)
    if split not in info.get("splits", {}):
        raise UserError(f"{root} has no {split!r} split (it has {', '.join(info.get('splits', {})) or 'none'})")
    split_info = info["splits"][split]
    if not split_info["filenames"]:
        raise UserError(f"{root}: split {split!r} has no shards")
    shards = []
    for filename, length in zip(split_info["filenames"], split_info["shard_lengths"]):
        tar_url = posixpath.join(root.rstrip("/"), filename)
        idx_url = tar_url[: -len(".tar")] + ".idx"
        tar_missing = not fs.exists(posixpath.join(path, filename))
        local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        if tar_missing and not (keep_missing and local):
            raise UserError(f"shard listed in {fmt.INFO_FILE} is missing: {tar_url}")
        if not fs.exists(posixpath.join(path, filename[: -len('.tar')] + ".idx")):
            raise UserError(f"index missing beside {tar_url}: re-run shard.py, or create it with wds2idx")
        tar_local = _local_copy(tar_url, cache_dir)
        idx_local = _local_copy(idx_url, cache_dir)
        with open(idx_local) as f:
            samples = _parse_index(f.read(), idx_url)
        if len(samples) != length:
            raise UserError(f"{idx_url}: index has {len(samples)} samples, {fmt.INFO_FILE} says {length}")
        if not samples:
            continue
        size = 0 if tar_missing else os.path.getsize(tar_local)
        complete = [s for s in samples if max(o + n for o, n in s.values()) <= size]
        if keep_missing and len(complete) < len(samples):
            what = "missing" if tar_missing else "truncated"
            warnings.warn(f"{tar_url} is {what}: keeping its place from its index (data.skip_bad_shards skips it)")
            shards.append(Shard(tar_local, idx_local, samples))
            continue
        if len(complete) < len(samples):
            warnings.warn(f"{tar_url} is truncated: using its first {len(complete)} of {len(samples)} samples")
            samples = complete  # a tar is truncated at its tail, so the complete samples are a prefix
            if not samples:
                continue
            idx_local = _trimmed_index(idx_local, samples, cache_dir)
        _check_member_names(tar_local, samples, tar_url)
        shards.append(Shard(tar_local, idx_local, samples))
    if not shards:
        raise UserError(f"{root}: split {split!r} holds no readable samples")
    return SplitShards(root, split, int(info["num_classes"]), shards)


def _trimmed_index(idx_local: str, samples: List[Dict[str, Component]], cache_dir: Optional[str]) -> str:
    rows = [[(ext, o, n, "x." + ext) for ext, (o, n) in s.items()] for s in samples]
    cache = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "conv2former", "shards")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"trimmed-{len(samples)}-{hashlib.sha1(idx_local.encode()).hexdigest()[:16]}.idx")
    with open(out, "w") as f:
        f.write(fmt.format_index(rows))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The dealing rule
# ----------------------------------------------------------------------------------------------------------------

def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    order = list(range(num_shards))
    random.Random(f"{seed}:{epoch}:shard-order").shuffle(order)
    return order


def rank_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    return total * rank // world_size, total * (rank + 1) // world_size


def train_steps(total: int, world_size: int, batch_size: int) -> int:
    return (total // world_size) // batch_size


def eval_steps(total: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(total / world_size) / batch_size)


def sample_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit seed for (seed, epoch, rank), for DALI and for the torch backend's buffer."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
