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
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fsspec

from conv2former.data import shard_format as fmt
from conv2former.data.remote import DEFAULT_CACHE, ShardCache, Wanted, is_remote, remote_problem
from conv2former.errors import UserError
from conv2former.units import parse_bytes

Component = Tuple[int, int]  # (offset, size) of one member's data in the tar


@dataclass
class Shard:
    """One shard as opening the split found it: its local tar and DALI index, how many samples the index lists, and
    how many bytes of the tar they need. The members' offsets stay in the index file until a reader asks
    (``samples()``): at 1,400 shards x 10,000 samples, holding every offset would cost each rank gigabytes."""

    tar: str  # local path DALI and the torch backend read (remote roots: in the cache, once fetched)
    index: str  # local path of the (possibly tail-trimmed) DALI index
    num_samples: int
    end: int  # the tar's bytes the index needs (the end of its last member's data)
    url: Optional[str] = None  # remote roots: the tar's URL (fetched per epoch by the ranks that read it)
    size: int = 0  # remote roots: the remote tar's size
    ends: Tuple[Dict[str, Component], ...] = ()  # remote roots: its first and last samples (checked once fetched)

    def wanted(self) -> Wanted:
        """What fetching this remote shard means: its URL, cache path, bytes needed, the member-name check."""
        ends, url = self.ends, self.url
        assert url is not None  # (a remote root's shard)
        return Wanted(url, self.tar, self.end, self.size, lambda path: check_member_names(path, ends, url))

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
            raise UserError(
                f"{self.index}: index announces {self.num_samples} samples but lists {len(lines)}; re-run shard.py"
            )
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
            raise UserError(
                f"{self.index}: index announces {self.num_samples} samples but lists {listed}; re-run shard.py"
            )


def shard_problem(shard: Shard) -> Optional[str]:
    """Why ``shard`` cannot be read now (deleted, or truncated below what its index needs), or None: one stat. A
    remote shard not fetched yet is judged by its remote size (known when the split was opened)."""
    if shard.url is not None and not os.path.exists(shard.tar):
        if shard.size < shard.end:
            return f"is truncated remotely ({shard.size} bytes; its index needs {shard.end})"
        return None
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
    cache: Optional[ShardCache] = None  # remote roots: where this process's ranks fetch the shards they read
    largest_image: Optional[Tuple[int, int]] = None  # (width, height) from the manifest (shards made before: None)

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
    path: str, where: str, opener: Callable[..., Any] = open
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


def check_member_names(
    tar_path: str, samples: Tuple[Dict[str, Component], ...], where: str, opener: Callable[..., Any] = open
) -> None:
    """The tar header before each given sample's first member must name that member."""
    with opener(tar_path, "rb") as f:
        for sample in samples:
            ext, (offset, _) = next(iter(sample.items()))
            if offset < 512:
                raise UserError(f"{where}: index does not match its tar (offset {offset}); re-run shard.py")
            f.seek(offset - 512)
            name = f.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")
            if not name.endswith("." + ext):
                raise UserError(
                    f"{where}: index does not match its tar (member {name!r} at {offset - 512}); "
                    "re-run shard.py or recreate the index with wds2idx"
                )


def reachable_root(root: str) -> Tuple[Any, str]:
    """(filesystem, path) of a shard root that exists and can be read; one-line errors for a missing root, a missing
    fsspec package, missing credentials or refused access (naming the URL and the protocol)."""
    if not root:
        raise UserError("no data root given: pass --data DIR_OR_URL (a shard root made by data_prep/shard.py)")
    try:
        fs, path = fsspec.core.url_to_fs(root)
        exists = fs.exists(path)
    except ImportError as err:
        raise UserError(f"reading {root} needs the package {err.name}: pip install -e '.[s3]' (s3fs)") from None
    except Exception as err:  # noqa: BLE001 - credentials, access: one line naming the URL and the protocol
        raise UserError(f"data root: {remote_problem(root, err)}") from None
    if not exists:
        raise UserError(f"data root not found: {root}")
    return fs, path


def open_split(root: str, split: str, cache_dir: Optional[str] = None, keep_missing: bool = False,
               cache_limit: Union[None, int, str] = None, cache_workers: int = 8) -> SplitShards:  # fmt: skip
    """Read ``root``'s manifest for ``split`` and check every shard against its index. A remote root's indexes are
    fetched now and its tars by the loaders, per rank and epoch (``conv2former.data.remote``).

    ``keep_missing`` (training with ``data.skip_bad_shards``): a local shard whose tar is gone but whose index is
    there is kept, with a warning, so the epoch's length and the schedule stay what they were; the loader skips it."""
    fs, path = reachable_root(root)
    if is_remote(root):
        return _open_remote_split(root, split, fs, path, cache_dir, cache_limit, cache_workers, keep_missing)
    info = fmt.read_info(root)
    filenames, lengths = _split_files(info, root, split)
    shards = []
    for filename, length in zip(filenames, lengths):
        tar_url = posixpath.join(root.rstrip("/"), filename)
        idx_url = tar_url[: -len(".tar")] + ".idx"
        tar_missing = not fs.exists(posixpath.join(path, filename))
        if tar_missing and not keep_missing:
            raise UserError(f"shard listed in {fmt.INFO_FILE} is missing: {tar_url}")
        if not fs.exists(posixpath.join(path, filename[: -len(".tar")] + ".idx")):
            raise UserError(f"index missing beside {tar_url}: re-run shard.py, or create it with wds2idx")
        tar_local, idx_local = posixpath.join(path, filename), posixpath.join(path, filename[: -len(".tar")] + ".idx")
        shard = _open_shard(tar_local, idx_local, length, tar_missing, keep_missing, tar_url, idx_url, cache_dir)
        if shard is not None:
            shards.append(shard)
    if not shards:
        raise UserError(f"{root}: split {split!r} holds no readable samples")
    return SplitShards(root, split, int(info["num_classes"]), shards, largest_image=_largest_image(info, split))


def _largest_image(info: Dict[str, Any], split: str) -> Optional[Tuple[int, int]]:
    """The manifest's ``largest_image`` of ``split`` ([width, height] of the stored image with the most pixels)."""
    largest = info["splits"].get(split, {}).get("largest_image")
    return (int(largest[0]), int(largest[1])) if largest else None


def _split_files(info: Dict[str, Any], root: str, split: str) -> Tuple[List[str], List[int]]:
    """The split's shard file names and sample counts from the manifest ``info``, or a one-line error."""
    if split not in info.get("splits", {}):
        raise UserError(f"{root} has no {split!r} split (it has {', '.join(info.get('splits', {})) or 'none'})")
    split_info = info["splits"][split]
    if not split_info["filenames"]:
        raise UserError(f"{root}: split {split!r} has no shards")
    return split_info["filenames"], split_info["shard_lengths"]


def _open_remote_split(root: str, split: str, fs: Any, path: str, cache_dir: Optional[str], cache_limit: Union[None, int, str],
                       workers: int, keep_missing: bool) -> SplitShards:  # fmt: skip
    """A remote split: one listing per folder gives every tar's size, the indexes are fetched into the cache (in
    parallel, one download per node), and each shard is checked against its index; the tars stay remote until a
    loader fetches the ones its rank reads."""
    info = fmt.read_info(root)
    filenames, lengths = _split_files(info, root, split)
    sizes: Dict[str, int] = {}
    for folder in sorted({posixpath.dirname(f) for f in filenames}):
        try:
            listing = fs.ls(posixpath.join(path, folder), detail=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"data root: {remote_problem(posixpath.join(root, folder), err)}") from None
        for entry in listing:
            sizes[posixpath.join(folder, posixpath.basename(entry["name"].rstrip("/")))] = int(entry.get("size") or 0)
    cache = ShardCache(cache_dir, parse_bytes(cache_limit, "data.cache_limit"), workers)
    indexes = []
    for filename in filenames:
        tar_url = posixpath.join(root.rstrip("/"), filename)
        idx_name = filename[: -len(".tar")] + ".idx"
        if filename not in sizes and not keep_missing:
            raise UserError(f"shard listed in {fmt.INFO_FILE} is missing: {tar_url}")
        if idx_name not in sizes:
            raise UserError(f"index missing beside {tar_url}: re-run shard.py, or create it with wds2idx")
        idx_url = posixpath.join(root.rstrip("/"), idx_name)
        indexes.append(Wanted(idx_url, cache.local_path(idx_url), sizes[idx_name], sizes[idx_name]))
    index_bytes = sum(w.size for w in indexes)
    if cache.limit is not None and cache.limit < index_bytes:
        raise UserError(
            f"data.cache_limit {cache_limit} is smaller than the indexes of {root} {split} alone "
            f"({index_bytes} bytes): raise it (it must also hold one epoch of the node's shards)"
        )
    failed = cache.fetch(indexes, pin=True)
    if failed:
        url, problem = next(iter(failed.items()))
        raise UserError(f"{len(failed)} index(es) of {root} {split} could not be fetched, e.g. {url}: {problem}")
    shards = []
    for filename, length, idx in zip(filenames, lengths, indexes):
        tar_url = posixpath.join(root.rstrip("/"), filename)
        shard = _open_shard(cache.local_path(tar_url), idx.local, length, False, True, tar_url, idx.url, cache.dir,
                            remote_size=sizes.get(filename, 0))  # fmt: skip
        if shard is not None:
            shards.append(shard)
    if not shards:
        raise UserError(f"{root}: split {split!r} holds no readable samples")
    return SplitShards(root, split, int(info["num_classes"]), shards, cache, _largest_image(info, split))


def _open_shard(
    tar_local: str,
    idx_local: str,
    length: int,
    tar_missing: bool,
    keep_missing: bool,
    tar_url: str,
    idx_url: str,
    cache_dir: Optional[str],
    remote_size: Optional[int] = None,
) -> Optional[Shard]:
    """A shard checked against its index (head and tail of it, one stat, two tar headers), or None when it holds
    no readable sample. A truncated tar keeps its complete samples (a prefix) through a trimmed index; with
    ``keep_missing`` a missing or truncated one keeps its place whole, for the loader to skip."""
    count, first, last = index_ends(idx_local, idx_url)
    if count != length:
        raise UserError(f"{idx_url}: index has {count} samples, {fmt.INFO_FILE} says {length}")
    if count == 0:
        return None
    assert first is not None and last is not None  # (a non-empty index has both)
    end = sample_end(last)
    if remote_size is not None:  # a remote tar: checked against its index once fetched (Shard.wanted)
        if remote_size < end:
            warnings.warn(f"{tar_url} is truncated remotely ({remote_size} bytes, its index needs {end}): its rank "
                          "reports it when its epoch starts")  # fmt: skip
        return Shard(tar_local, idx_local, count, end, tar_url, remote_size, (first, last))
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
    cache = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE), "trimmed")  # apart from the bounded cache
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
