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
    """One shard as opening the split found it: its local tar and DALI index, how many samples the index lists, and
    how many bytes of the tar they need. The members' offsets stay in the index file until a reader asks
    (``samples()``): at 1,400 shards x 10,000 samples, holding every offset would cost each rank gigabytes."""

    tar: str  # local path DALI and the torch backend read
    index: str  # local path of the (possibly tail-trimmed) DALI index
    num_samples: int
    end: int  # the tar's bytes the index needs (the end of its last member's data)

    def __len__(self) -> int:
        return self.num_samples

    def samples(self) -> List[Dict[str, Component]]:
        """Every sample's members as {ext: (offset, size)}, read from the index now."""
        with open(self.index) as f:
            return _parse_index(f.read(), self.index)

    def members(self, exts: Tuple[str, ...], first: int, stop: int) -> List[Tuple[Component, ...]]:
        """For samples [first, stop): the (offset, size) of each of ``exts``, in that order. The fast path of what
        a reader needs (each index line is split once; a line whose members are in another order is parsed whole)."""
        with open(self.index) as f:
            lines = [line for line in f.read().split("\n")[1:] if line.strip()]
        if len(lines) < self.num_samples:
            raise UserError(f"{self.index}: index announces {self.num_samples} samples but lists {len(lines)}; re-run shard.py")
        lines = lines[first:stop]
        parts = lines[0].split() if lines else []
        at = [parts.index(ext) if ext in parts else -1 for ext in exts]
        out = []
        for line in lines:
            parts = line.split()
            if all(i >= 0 and i + 2 < len(parts) and parts[i] == ext for i, ext in zip(at, exts)):
                out.append(tuple((int(parts[i + 1]), int(parts[i + 2])) for i in at))
            else:
                sample = _parse_sample(line)
                if any(ext not in sample for ext in exts):
                    raise UserError(f"{self.index}: a sample lacks one of {', '.join(exts)}; re-run shard.py")
                out.append(tuple(sample[ext] for ext in exts))
        return out

    def check_listed(self) -> None:
        """One clear line when the index lists fewer samples than its first line announces (opening the split reads
        only its first and last lines; DALI would otherwise fail inside its reader)."""
        with open(self.index, "rb") as f:
            listed = sum(1 for line in f.read().split(b"\n")[1:] if line.strip())
        if listed < self.num_samples:
            raise UserError(f"{self.index}: index announces {self.num_samples} samples but lists {listed}; re-run shard.py")


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
    count = _index_count(lines[0] if lines else "", where)
    samples = [_parse_sample(line) for line in lines[1 : count + 1]]
    if len(samples) != count:
        raise UserError(f"{where}: index announces {count} samples but lists {len(samples)}")
    return samples


def _index_count(header: str, where: str) -> int:
    try:
        return fmt.index_sample_count(header)
    except ValueError:
        raise UserError(f"{where}: not a DALI index (expected a '{fmt.INDEX_VERSION} N' first line)") from None


def _parse_sample(line: str) -> Dict[str, Component]:
    parts = line.split()
    return {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}


def sample_end(sample: Dict[str, Component]) -> int:
    return max(o + n for o, n in sample.values())


def index_ends(
    path: str, where: str, opener=open
) -> Tuple[int, Optional[Dict[str, Component]], Optional[Dict[str, Component]]]:
    """(sample count, first sample, last sample) of a DALI index, reading its head and tail only (``opener``: the
    builtin ``open`` or an fsspec filesystem's)."""
    with opener(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace").split("\n", 2)
        count = _index_count(head[0], where)
        if count == 0:
            return 0, None, None
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 16)))
        tail = [line for line in f.read().decode("utf-8", "replace").split("\n") if line.strip()]
    if len(head) < 2 or not head[1].strip() or not tail:
        raise UserError(f"{where}: index announces {count} samples but lists none")
    try:
        return count, _parse_sample(head[1]), _parse_sample(tail[-1])
    except (ValueError, IndexError):
        raise UserError(f"{where}: not a DALI index (a sample line does not parse)") from None


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


def check_member_names(tar_path: str, samples: Tuple[Dict[str, Component], ...], where: str, opener=open) -> None:
    """The tar header before each given sample's first member must name that member."""
    with opener(tar_path, "rb") as f:
        for sample in samples:
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
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    shards = []
    for filename, length in zip(split_info["filenames"], split_info["shard_lengths"]):
        tar_url = posixpath.join(root.rstrip("/"), filename)
        idx_url = tar_url[: -len(".tar")] + ".idx"
        tar_missing = not fs.exists(posixpath.join(path, filename))
        if tar_missing and not (keep_missing and local):
            raise UserError(f"shard listed in {fmt.INFO_FILE} is missing: {tar_url}")
        if not fs.exists(posixpath.join(path, filename[: -len(".tar")] + ".idx")):
            raise UserError(f"index missing beside {tar_url}: re-run shard.py, or create it with wds2idx")
        tar_local = _local_copy(tar_url, cache_dir)
        idx_local = _local_copy(idx_url, cache_dir)
        shard = _open_shard(tar_local, idx_local, length, tar_missing, keep_missing, tar_url, idx_url, cache_dir)
        if shard is not None:
            shards.append(shard)
    if not shards:
        raise UserError(f"{root}: split {split!r} holds no readable samples")
    return SplitShards(root, split, int(info["num_classes"]), shards)


def _open_shard(tar_local: str, idx_local: str, length: int, tar_missing: bool, keep_missing: bool, tar_url: str,
                idx_url: str, cache_dir: Optional[str]) -> Optional[Shard]:
    """A shard checked against its index (head and tail of it, one stat, two tar headers), or None when it holds
    no readable sample. A truncated tar keeps its complete samples (a prefix) through a trimmed index; with
    ``keep_missing`` a missing or truncated one keeps its place whole, for the loader to skip."""
    count, first, last = index_ends(idx_local, idx_url)
    if count != length:
        raise UserError(f"{idx_url}: index has {count} samples, {fmt.INFO_FILE} says {length}")
    if count == 0:
        return None
    end = sample_end(last)
    size = 0 if tar_missing else os.path.getsize(tar_local)
    if size < end and keep_missing:
        what = "missing" if tar_missing else "truncated"
        warnings.warn(f"{tar_url} is {what}: keeping its place from its index (data.skip_bad_shards skips it)")
        return Shard(tar_local, idx_local, count, end)
    if size < end:
        with open(idx_local) as f:
            samples = _parse_index(f.read(), idx_url)
        complete = [s for s in samples if sample_end(s) <= size]
        warnings.warn(f"{tar_url} is truncated: using its first {len(complete)} of {len(samples)} samples")
        if not complete:  # a tar is truncated at its tail, so the complete samples are a prefix
            return None
        idx_local = _trimmed_index(idx_local, complete, cache_dir)
        count, first, last, end = len(complete), complete[0], complete[-1], sample_end(complete[-1])
    check_member_names(tar_local, (first, last), tar_url)
    return Shard(tar_local, idx_local, count, end)


def slice_index(shard: Shard, first: int, stop: int, folder: str) -> str:
    """A DALI index of samples [first, stop) of ``shard`` (the shard's own index when that is all of it), written
    into ``folder``: the offsets stay absolute, so DALI reads just those samples from the same tar."""
    if first == 0 and stop == len(shard):
        return shard.index
    rows = [[(ext, o, n, "x." + ext) for ext, (o, n) in s.items()] for s in shard.samples()[first:stop]]
    out = os.path.join(folder, f"{hashlib.sha1(shard.index.encode()).hexdigest()[:16]}-{first}-{stop}.idx")
    with open(out, "w") as f:
        f.write(fmt.format_index(rows))
    return out


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
