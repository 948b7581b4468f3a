"""Write a planned split to shards: parallel, deterministic, crash-safe and resumable.

The plan is a pure function of the listing and the options: items sorted by (synset, key), the train/val split,
a global shuffle by seed, and the cut into shards. Shard i therefore always holds the same samples in the same
order, and a worker can (re)write it alone. A shard is committed in three steps, the last being the marker:
the tar (written to a temporary local file and moved/uploaded whole), its DALI index, then
``OUT/_progress/{split}-NNNNNN.json`` with its length, size and skips. On resume, shards with a valid marker are
kept and the others are rewritten, so a killed run ends with exactly the shards of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import fsspec
import webdataset as wds

from conv2former.data import shard_format as fmt
from data_prep.images import SkipImage, clean_image
from data_prep.sources import SourceItem

PROGRESS_DIR = "_progress"


@dataclass(frozen=True)
class WriteOptions:
    max_side: Optional[int] = None
    min_side: int = 32
    check: str = "decode"


@dataclass
class ShardTask:
    out_root: str  # fsspec URL of OUT
    split: str
    index: int
    items: List[Tuple[SourceItem, int]]  # (item, label) in the order they are written
    options: WriteOptions


@dataclass
class ShardResult:
    split: str
    index: int
    num_samples: int
    num_bytes: int
    skipped: List[Dict[str, str]] = field(default_factory=list)
    reencoded: int = 0
    images_in: int = 0
    largest: List[int] = field(default_factory=lambda: [0, 0])  # [width, height] of the stored image with most pixels

    def to_json(self) -> Dict[str, Any]:
        return dict(
            split=self.split,
            index=self.index,
            num_samples=self.num_samples,
            num_bytes=self.num_bytes,
            skipped=self.skipped,
            reencoded=self.reencoded,
            images_in=self.images_in,
            largest=list(self.largest),
        )


def seeded_shuffle(rows: Any, seed: int, salt: str) -> Any:
    """Shuffle ``rows`` (a list, or an array of row numbers) in place by (seed, salt) and return it: the one seeded
    order of the plan (the split's global shuffle, salt = split) and of the held-out draw (salt = holdout:synset)."""
    random.Random(f"{seed}:{salt}").shuffle(rows)
    return rows


def cut_into_shards(
    items: Sequence[SourceItem], samples_per_shard: Optional[int], shard_bytes: Optional[int]
) -> List[Sequence[SourceItem]]:
    """Consecutive slices of ``items`` (views when ``items`` is a view): ``samples_per_shard`` each, or as many as
    fit in ``shard_bytes`` of source bytes (at least one)."""
    if samples_per_shard:
        return [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]
    size_at = getattr(items, "size_at", None) or (lambda i: items[i].size)
    shards, start, size = [], 0, 0
    for i in range(len(items)):
        item_size = size_at(i)
        if i > start and shard_bytes is not None and size + item_size > shard_bytes:
            shards.append(items[start:i])
            start, size = i, 0
        size += item_size
    if start < len(items):
        shards.append(items[start:])
    return shards


def _progress_path(out_root: str, split: str, index: int) -> str:
    return posixpath.join(out_root, PROGRESS_DIR, f"{split}-{index:06d}.json")


def read_progress(fs: fsspec.AbstractFileSystem, out_path: str, split: str, index: int) -> Optional[ShardResult]:
    """The commit record of a shard, if the shard, its index and the record all exist and agree."""
    record_path = _progress_path(out_path, split, index)
    tar_path = posixpath.join(out_path, split, fmt.shard_name(split, index))
    idx_path = posixpath.join(out_path, split, fmt.index_name(split, index))
    try:
        with fs.open(record_path, "r") as f:
            record = json.load(f)
        if fs.size(tar_path) != record["num_bytes"]:
            return None
        with fs.open(idx_path, "r") as f:
            if fmt.index_sample_count(f.readline()) != record["num_samples"]:
                return None
    except (FileNotFoundError, OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    record.pop("split", None)
    record.pop("index", None)
    return ShardResult(split=split, index=index, **record)


def build_index(tar_path: str) -> Tuple[str, int]:
    """DALI's index of a local shard (what ``wds2idx`` writes) and its sample count."""
    samples: List[List[Tuple[str, int, int, str]]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            if key != last_key:
                samples.append([])
                last_key = key
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    return fmt.format_index(samples), len(samples)


class _IndexTracker:
    """DALI's index of a shard, taken from the positions the tar writer reports while it writes.

    Each member is a 512-byte header then its data padded to 512 bytes, unless ``tarfile`` had to add an extended
    (pax) header, e.g. for a name over 100 bytes. Every sample's members are checked against the writer's offset;
    any mismatch marks the index unknown and the shard is indexed by reading it back (``build_index``).
    """

    def __init__(self, tarstream: tarfile.TarFile) -> None:
        self.tar = tarstream
        self.samples: List[List[Tuple[str, int, int, str]]] = []
        self.exact = True

    def write(self, writer: "wds.TarWriter", sample: Dict[str, object]) -> None:
        start, first = self.tar.offset, len(self.tar.getmembers())
        writer.write(sample)
        position, entries = start, []
        for member in self.tar.getmembers()[first:]:
            ext = member.name.split(".", 1)[1]
            entries.append((ext, position + tarfile.BLOCKSIZE, member.size, member.name))
            position += tarfile.BLOCKSIZE + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.exact = self.exact and position == self.tar.offset
        self.samples.append(entries)


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard (run in a worker process). Never leaves a partial shard under the final name."""
    fs, out_path = fsspec.core.url_to_fs(task.out_root)
    split_dir = posixpath.join(out_path, task.split)
    final_tar = posixpath.join(split_dir, fmt.shard_name(task.split, task.index))
    final_idx = posixpath.join(split_dir, fmt.index_name(task.split, task.index))
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    tmp_dir = split_dir if local else None
    if local:
        os.makedirs(split_dir, exist_ok=True)
    result = ShardResult(task.split, task.index, 0, 0, images_in=len(task.items))
    fd, tmp_tar = tempfile.mkstemp(prefix=f".{task.split}-{task.index:06d}-", suffix=".partial", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0, user="root", group="root", mode=0o444)
            index = _IndexTracker(writer.tarstream)
            _write_samples(task, writer, index, result)
            writer.close()
        if index.exact:  # the positions the writer reported (checked per sample), without reading the tar back
            index_text, count = fmt.format_index(index.samples), len(index.samples)
        else:
            index_text, count = build_index(tmp_tar) if result.num_samples else (fmt.format_index([]), 0)
        assert count == result.num_samples
        result.num_bytes = os.path.getsize(tmp_tar)
        if local:
            os.replace(tmp_tar, final_tar)
        else:
            fs.makedirs(split_dir, exist_ok=True)
            fs.put_file(tmp_tar, final_tar)  # object stores make an upload visible only once complete
        with fs.open(final_idx, "w") as f:
            f.write(index_text)
        fs.makedirs(posixpath.join(out_path, PROGRESS_DIR), exist_ok=True)
        record = result.to_json()
        with fs.open(_progress_path(out_path, task.split, task.index), "w") as f:
            json.dump({k: v for k, v in record.items() if k not in ("split", "index")}, f)
    finally:
        if os.path.exists(tmp_tar):
            os.remove(tmp_tar)
    return result


def _write_samples(task: ShardTask, writer: Any, index: Any, result: ShardResult) -> None:
    """Each of the task's images, cleaned (data_prep/images.py), as one sample of the shard; the skipped ones
    recorded with their reason."""
    src_fs_cache: Dict[str, Any] = {}  # one filesystem per source path
    for item, label in task.items:
        src_fs = src_fs_cache.get(item.path)
        if src_fs is None:
            src_fs = src_fs_cache[item.path] = fsspec.core.url_to_fs(item.path)[0]
        try:
            clean = clean_image(item.read(src_fs), task.options.max_side, task.options.min_side, task.options.check)
        except SkipImage as skip:
            result.skipped.append({"source": item.name, "reason": str(skip)})
            continue
        meta = {"synset": item.synset, "width": clean.width, "height": clean.height, "source": item.name}
        index.write(
            writer,
            {
                "__key__": item.key,
                fmt.IMAGE_KEY: clean.data,
                fmt.CLASS_KEY: str(label).encode("ascii"),
                fmt.LABEL_KEY: fmt.encode_label(label),
                fmt.META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8"),
            },
        )
        result.num_samples += 1
        result.reencoded += int(clean.reencoded)
        if clean.stored[0] * clean.stored[1] > result.largest[0] * result.largest[1]:
            result.largest = list(clean.stored)


def summarize_skips(results: Sequence[ShardResult], listing_skips: Sequence[Dict[str, str]]) -> "Counter[str]":
    reasons: "Counter[str]" = Counter()
    for skip in list(listing_skips) + [s for r in results for s in r.skipped]:
        reasons[skip["reason"].split(" (")[0]] += 1
    return reasons
