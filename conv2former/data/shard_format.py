"""The shard format: the contract between ``data_prep/shard.py`` and every loader (docs/design.md, "Shard format").

    OUT/_info.json                 timm's wds format: {"name", "num_classes", "splits": {split: {"name",
                                   "num_samples", "filenames", "shard_lengths"}}} (+ our "seed", "source", ...)
    OUT/classes.txt                synsets in label order
    OUT/skipped.jsonl              {"source", "reason"} per input that was not written
    OUT/{split}/{split}-NNNNNN.tar a webdataset shard; samples in a global random order fixed by the seed
    OUT/{split}/{split}-NNNNNN.idx its DALI index (wds2idx "v1.2" format)

Each sample (key without dots) holds ``jpg`` (RGB JPEG that decodes with PIL and DALI), ``cls`` (ASCII class index,
the webdataset/timm convention), ``lbl`` (the class index as 8 little-endian bytes, int64, for DALI, which returns
``cls`` as raw text) and ``json`` ({"synset", "width", "height", "source"}: the original size and source name).
"""

from __future__ import annotations

import json
import posixpath
import struct
from functools import lru_cache
from typing import Any, Dict, List, Tuple

import fsspec

from conv2former.errors import UserError

IMAGE_KEY = "jpg"
CLASS_KEY = "cls"
LABEL_KEY = "lbl"
META_KEY = "json"
SAMPLE_KEYS = (CLASS_KEY, META_KEY, IMAGE_KEY, LABEL_KEY)  # the order webdataset's TarWriter writes them (sorted)

INFO_FILE = "_info.json"
CLASSES_FILE = "classes.txt"
SKIPPED_FILE = "skipped.jsonl"
INDEX_VERSION = "v1.2"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.idx"


def encode_label(label: int) -> bytes:
    return struct.pack("<q", label)


def decode_label(data: bytes) -> int:
    return struct.unpack("<q", bytes(data))[0]


@lru_cache(maxsize=None)
def canonical_synsets(dataset: str) -> Tuple[str, ...]:
    """timm's shipped class orders: ``imagenet22k`` (21841 sorted fall11 synsets) or ``imagenet1k`` (1000)."""
    from timm.data import ImageNetInfo

    subset = {"imagenet22k": "imagenet-22k", "imagenet1k": "imagenet-1k"}[dataset]
    return tuple(ImageNetInfo(subset).label_names())


def read_info(root: str) -> Dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(root)
    info_path = posixpath.join(path, INFO_FILE)
    if not fs.exists(info_path):
        raise UserError(f"{root} holds no {INFO_FILE}: point at a shard root written by data_prep/shard.py")
    with fs.open(info_path, "r") as f:
        return json.load(f)


def read_classes(root: str) -> List[str]:
    fs, path = fsspec.core.url_to_fs(root)
    with fs.open(posixpath.join(path, CLASSES_FILE), "r") as f:
        return [line.strip() for line in f if line.strip()]


def format_index(samples: List[List[Tuple[str, int, int, str]]]) -> str:
    """DALI's index text for a shard: one line per sample of ``ext offset size member_name`` groups."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def index_sample_count(index_text: str) -> int:
    header = index_text.split("\n", 1)[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise ValueError(f"not a {INDEX_VERSION} DALI index")
    return int(header[1])
