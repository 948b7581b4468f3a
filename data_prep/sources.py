"""Readers for ImageNet as users downloaded it. Each lists ``SourceItem``s (what to read, and its synset) in sorted
order; bytes are read later, in the workers, straight from the files or from inside tar archives (in memory: tar
members are never extracted to paths named by the archive).

ImageNet-22k (fall11_whole / winter21_whole), detected from SRC:
  synset-tars      SRC/nXXXXXXXX.tar, each holding nXXXXXXXX_N.JPEG (the release's inner tars)
  outer-tar        SRC itself is the release's outer .tar of per-synset tars (read by offset, never unpacked)
  outer-targz      SRC is the gzip-compressed outer archive (winter21_whole.tar.gz): listed by streaming it, then
                   streamed once more while each image is appended to its shard's local spill file (never to a
                   path named by the archive); the spill is deleted when every shard is complete
  synset-folders   SRC/nXXXXXXXX/*.JPEG (already extracted)
ImageNet-1k:
  SRC/train/nXXXXXXXX/*.JPEG, and val as SRC/val/nXXXXXXXX/*.JPEG, or flat SRC/val/*.JPEG labelled by
  LOC_val_solution.csv (Kaggle) or by the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat.
  Kaggle's SRC/ILSVRC/Data/CLS-LOC/{train,val} is found too.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import posixpath
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import fsspec

from conv2former.errors import UserError

FileSystem = Any  # an fsspec.AbstractFileSystem (fsspec ships no type information)

if TYPE_CHECKING:
    from data_prep.items import ItemTable

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_IMAGE_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
SYNSET_RE = re.compile(r"^n\d{8}$")
STREAMED = -2  # SourceItem.offset of a member inside a compressed archive: readable only by streaming it


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image: its sample key, synset, and where its bytes are (a file, or a range inside a tar)."""

    key: str
    synset: str
    path: str  # fsspec path of the file, or of the tar holding it
    offset: int  # -1 for a plain file; STREAMED inside a .tar.gz; else the member's data offset in ``path``
    size: int
    name: str  # the source name recorded in the sample's json and in skipped.jsonl

    def read(self, fs: fsspec.AbstractFileSystem) -> bytes:
        if self.offset == STREAMED:
            raise RuntimeError(f"{self.name} lies inside a compressed archive: spill it first (data_prep.build)")
        with fs.open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class Listing:
    items: Sequence[SourceItem]  # a list, or (ImageNet-22k) an ItemTable view: data_prep/items.py
    skipped: List[Dict[str, str]]  # {"source", "reason"} for inputs rejected while listing


def sample_key(filename: str) -> str:
    """The webdataset key of a source file: its base name without extension, dots replaced (keys hold no dots)."""
    stem = posixpath.basename(filename)
    base, dot, ext = stem.rpartition(".")
    if dot and f".{ext.lower()}" in _IMAGE_EXTENSION_SET:
        stem = base
    return stem.replace(".", "_")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_fs(src: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(src))
    if not fs.exists(path):
        raise UserError(f"source not found: {src}")
    return fs, path.rstrip("/") or "/"


def _tar_members(fileobj: IO[bytes], base_offset: int = 0) -> Iterable[Tuple[str, int, int]]:
    """(member name, absolute data offset, size) of the regular files of a tar read from ``fileobj``."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, base_offset + member.offset_data, member.size


class _RangeFile(io.RawIOBase):
    """A read-only, seekable window [start, start+size) of a larger file: an inner tar inside the outer tar."""

    def __init__(self, f: IO[bytes], start: int, size: int) -> None:
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _items_from_tar(
    fs: FileSystem, tar_path: str, synset: str, shown: str, fileobj: Optional[IO[bytes]] = None, base: int = 0
) -> Listing:
    items: List[SourceItem] = []
    skipped: List[Dict[str, str]] = []
    try:
        f = fileobj if fileobj is not None else fs.open(tar_path, "rb")
        try:
            for name, offset, size in _tar_members(f, base):
                source = f"{shown}:{name}"
                if not _is_image_name(name):
                    skipped.append({"source": source, "reason": "not an image file name"})
                    continue
                items.append(SourceItem(sample_key(name), synset, tar_path, offset, size, source))
        finally:
            if fileobj is None:
                f.close()
    except (tarfile.TarError, EOFError, OSError) as err:
        # A truncated tar: keep the members read before the damage, record the rest as lost.
        skipped.append({"source": shown, "reason": f"damaged tar, later members lost ({type(err).__name__}: {err})"})
    return Listing(items, skipped)


def detect_22k_layout(src: str) -> str:
    fs, path = _open_fs(src)
    if fs.isfile(path):
        if path.endswith((".tar.gz", ".tgz")):
            return "outer-targz"
        if path.endswith(".tar"):
            return "outer-tar"
        raise UserError(f"{src} is a file but not a .tar archive of per-synset tars")
    names = [posixpath.basename(p) for p in fs.ls(path, detail=False)]
    if not names:
        raise UserError(f"source folder is empty: {src}")
    if any(n.endswith(".tar") and SYNSET_RE.match(n[:-4]) for n in names):
        return "synset-tars"
    if any(SYNSET_RE.match(n) and fs.isdir(posixpath.join(path, n)) for n in names):
        return "synset-folders"
    raise UserError(f"{src} holds neither nXXXXXXXX.tar files nor nXXXXXXXX/ folders (an ImageNet-22k release)")


def _list_each(fn: Callable[..., Listing], jobs: List[Tuple[Any, ...]], workers: int) -> Iterator[Listing]:
    """``fn(*job)`` for every job, yielded in order as they come, in ``workers`` processes (reading tar headers is
    Python work: threads would share one core)."""
    if workers <= 1 or len(jobs) < 2:
        yield from (fn(*job) for job in jobs)
        return
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(fn, *zip(*jobs), chunksize=max(1, min(64, len(jobs) // (workers * 8))))


def _list_synset_tars(fs: FileSystem, path: str, table: ItemTable, skipped: List[Dict[str, str]], workers: int) -> None:
    """A folder of nXXXXXXXX.tar files (the release unpacked once), listed in ``workers`` processes."""
    jobs = []
    for tar_path in sorted(fs.glob(posixpath.join(path, "*.tar"))):
        synset = posixpath.basename(tar_path)[:-4]
        shown = posixpath.basename(tar_path)
        if not SYNSET_RE.match(synset):
            skipped.append({"source": shown, "reason": "not a per-synset tar (name is not nXXXXXXXX.tar)"})
            continue
        jobs.append((fs, tar_path, synset, shown))
    for (_, tar_path, synset, shown), listing in zip(jobs, _list_each(_items_from_tar, jobs, workers)):
        table.add(listing.items, synset, tar_path, f"{shown}:")
        skipped += listing.skipped


def _list_outer_tar(fs: FileSystem, path: str, table: ItemTable, skipped: List[Dict[str, str]], workers: int) -> None:
    """One uncompressed tar of per-synset tars (the release as downloaded, decompressed): read by offset."""
    with fs.open(path, "rb") as outer:
        try:
            inner_tars = list(_tar_members(outer))
        except (tarfile.TarError, EOFError, OSError) as err:
            local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
            shown = path if local else fs.unstrip_protocol(path)
            raise UserError(f"cannot read {shown} as a tar archive: {err}") from None
        for name, offset, size in inner_tars:
            base = posixpath.basename(name)
            synset = base[:-4] if base.endswith(".tar") else ""
            if not SYNSET_RE.match(synset):
                skipped.append({"source": name, "reason": "not a per-synset tar (name is not nXXXXXXXX.tar)"})
                continue
            window = io.BufferedReader(_RangeFile(outer, offset, size))
            shown = f"{posixpath.basename(path)}:{name}"
            listing = _items_from_tar(fs, path, synset, shown, window, offset)
            table.add(listing.items, synset, path, f"{shown}:")
            skipped += listing.skipped


def _list_synset_folders(
    fs: FileSystem, path: str, table: ItemTable, skipped: List[Dict[str, str]], workers: int
) -> None:
    """A folder of nXXXXXXXX/ folders of image files, listed in ``workers`` processes."""
    jobs = []
    for folder in sorted(fs.ls(path, detail=False)):
        synset = posixpath.basename(folder)
        if SYNSET_RE.match(synset) and fs.isdir(folder):
            jobs.append((fs, folder, synset, synset))
    for (_, folder, synset, _), listing in zip(jobs, _list_each(_list_folder, jobs, workers)):
        table.add(listing.items, synset, folder, f"{synset}/", files=True)
        skipped += listing.skipped


def list_22k(src: str, layout: Optional[str] = None, workers: int = 1) -> Tuple[str, Listing]:
    """List an ImageNet-22k source; returns (layout, listing). Items are sorted by (synset, key); the layout is
    ``detect_22k_layout``'s unless given, and each layout's lister is in ``LISTERS_22K``."""
    layout = layout or detect_22k_layout(src)
    if layout not in LAYOUTS_22K:
        raise UserError(f"unknown ImageNet-22k layout {layout!r}: choose one of {', '.join(LAYOUTS_22K)}")
    from data_prep.items import ItemTable  # (items.py builds on this module's SourceItem)

    fs, path = _open_fs(src)
    table = ItemTable()  # 14.2M images: columns, not one object each (data_prep/items.py)
    skipped: List[Dict[str, str]] = []
    LISTERS_22K[layout](fs, path, table, skipped, workers)
    return layout, Listing(table.ordered(), skipped)


def _list_targz(fs: FileSystem, path: str, table: ItemTable, skipped: List[Dict[str, str]], workers: int = 1) -> None:
    """The images of a gzip-compressed outer tar, in one streaming pass (their bytes are read later by streaming)."""
    base = posixpath.basename(path)
    try:
        for name, synset, inner in _stream_inner_tars(fs, path, skipped):
            items: List[SourceItem] = []
            try:
                for member in inner:
                    if not member.isfile():
                        continue
                    source = f"{base}:{name}:{member.name}"
                    if not _is_image_name(member.name):
                        skipped.append({"source": source, "reason": "not an image file name"})
                        continue
                    items.append(SourceItem(sample_key(member.name), synset, path, STREAMED, member.size, source))
            except (tarfile.TarError, EOFError, OSError) as err:
                reason = f"damaged tar, later members lost ({type(err).__name__}: {err})"
                skipped.append({"source": f"{base}:{name}", "reason": reason})
            table.add(items, synset, path, f"{base}:{name}:")
    except (tarfile.TarError, EOFError, OSError) as err:
        skipped.append({"source": base, "reason": f"damaged archive, later members lost ({type(err).__name__}: {err})"})


# The ImageNet-22k layouts shard.py reads, each with its lister (``detect_22k_layout`` tells them apart).
LISTERS_22K: Dict[str, Callable[..., None]] = {
    "synset-tars": _list_synset_tars,
    "outer-tar": _list_outer_tar,
    "outer-targz": _list_targz,  # one streaming pass; the images are read later by streaming again
    "synset-folders": _list_synset_folders,
}
LAYOUTS_22K = tuple(LISTERS_22K)


def _stream_inner_tars(
    fs: FileSystem, path: str, skipped: List[Dict[str, str]]
) -> Iterator[Tuple[str, str, tarfile.TarFile]]:
    """(outer member name, synset, streaming TarFile of it) for each per-synset tar of a .tar.gz, in archive order."""
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as outer:
        for member in outer:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            synset = base[:-4] if base.endswith(".tar") else ""
            if not SYNSET_RE.match(synset):
                skipped.append({"source": member.name, "reason": "not a per-synset tar (name is not nXXXXXXXX.tar)"})
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                yield member.name, synset, inner


def stream_targz_images(path: str, wanted: Mapping[str, object]) -> Iterator[Tuple[str, bytes]]:
    """Yield (source name, bytes) for the members of a .tar.gz whose source names are in ``wanted``, in one pass."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    base = posixpath.basename(fs_path)
    for name, _, inner in _stream_inner_tars(fs, fs_path, []):
        try:
            for member in inner:
                source = f"{base}:{name}:{member.name}"
                data = inner.extractfile(member) if member.isfile() and source in wanted else None
                if data is not None:
                    yield source, data.read()
        except (tarfile.TarError, EOFError, OSError):
            continue  # recorded when listing


def _list_folder(fs: FileSystem, folder: str, synset: str, prefix: str) -> Listing:
    items: List[SourceItem] = []
    skipped: List[Dict[str, str]] = []
    for file_path, info in sorted(fs.find(folder, detail=True).items()):
        shown = f"{prefix}/{posixpath.relpath(file_path, folder)}"
        if not _is_image_name(file_path):
            skipped.append({"source": shown, "reason": "not an image file name"})
            continue
        items.append(SourceItem(sample_key(file_path), synset, file_path, -1, int(info.get("size") or 0), shown))
    return Listing(items, skipped)


# ------------------------------------------------------------------------------------------------------------------
# ImageNet-1k
# ------------------------------------------------------------------------------------------------------------------


def _find_1k_root(fs: FileSystem, path: str, src: str) -> str:
    for candidate in (path, posixpath.join(path, "ILSVRC", "Data", "CLS-LOC")):
        if fs.isdir(posixpath.join(candidate, "train")):
            return candidate
    if not fs.ls(path, detail=False):
        raise UserError(f"source folder is empty: {src}")
    raise UserError(f"{src} has no train/ folder (expected ImageNet-1k as train/nXXXXXXXX/*.JPEG and val/)")


def list_1k(src: str) -> Dict[str, Listing]:
    """List ImageNet-1k train and val; returns {"train": Listing, "val": Listing} (val may be empty if absent)."""
    fs, path = _open_fs(src)
    if fs.isfile(path):
        raise UserError(f"{src} is a file: give the ImageNet-1k folder holding train/ and val/")
    root = _find_1k_root(fs, path, src)
    out = {"train": _list_synset_tree(fs, posixpath.join(root, "train"), "train")}
    val = posixpath.join(root, "val")
    if not fs.isdir(val):
        out["val"] = Listing([], [])
        return out
    entries = fs.ls(val, detail=False)
    if not entries:  # an empty val/ is no val split
        out["val"] = Listing([], [])
        return out
    if any(SYNSET_RE.match(posixpath.basename(e)) and fs.isdir(e) for e in entries):
        out["val"] = _list_synset_tree(fs, val, "val")
    else:
        out["val"] = _list_flat_val(fs, val, [root, path] + _ancestors(root, 3), src)
    return out


def _ancestors(path: str, n: int) -> List[str]:
    out = []
    for _ in range(n):
        parent = posixpath.dirname(path.rstrip("/"))
        if not parent or parent == path:
            break
        out.append(parent)
        path = parent
    return out


def _list_synset_tree(fs: FileSystem, folder: str, prefix: str) -> Listing:
    items: List[SourceItem] = []
    skipped: List[Dict[str, str]] = []
    for sub in sorted(fs.ls(folder, detail=False)):
        synset = posixpath.basename(sub)
        if not fs.isdir(sub):
            skipped.append({"source": f"{prefix}/{synset}", "reason": "file outside a synset folder"})
            continue
        if not SYNSET_RE.match(synset):
            skipped.append({"source": f"{prefix}/{synset}", "reason": "folder name is not a synset id"})
            continue
        listing = _list_folder(fs, sub, synset, prefix=f"{prefix}/{synset}")
        items += listing.items
        skipped += listing.skipped
    items.sort(key=lambda it: (it.synset, it.key))
    return Listing(items, skipped)


def _find_file(fs: FileSystem, names: Sequence[str], folders: Sequence[str]) -> Optional[str]:
    for folder in folders:
        for sub in ("", "ILSVRC2012_devkit_t12/data", "data"):
            for name in names:
                candidate = posixpath.join(folder, sub, name) if sub else posixpath.join(folder, name)
                if fs.exists(candidate):
                    return candidate
    return None


def _val_labels_from_csv(fs: FileSystem, csv_path: str) -> Dict[str, str]:
    labels = {}
    with fs.open(csv_path, "r") as f:
        for row in csv.DictReader(f):
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
    return labels


def _val_labels_from_devkit(fs: FileSystem, truth_path: str, meta_path: str) -> Dict[str, str]:
    """Devkit ground truth holds ILSVRC2012_IDs (1..1000, not sorted by synset); meta.mat maps them to WNIDs."""
    from scipy.io import loadmat

    with fs.open(meta_path, "rb") as f:
        synsets = loadmat(io.BytesIO(f.read()), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    with fs.open(truth_path, "r") as f:
        ids = [int(line) for line in f if line.strip()]
    return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[label] for i, label in enumerate(ids)}


def _list_flat_val(fs: FileSystem, val: str, search: List[str], src: str) -> Listing:
    csv_path = _find_file(fs, ["LOC_val_solution.csv"], search)
    truth = _find_file(fs, ["ILSVRC2012_validation_ground_truth.txt"], search)
    meta = _find_file(fs, ["meta.mat"], search)
    if csv_path:
        labels = _val_labels_from_csv(fs, csv_path)
    elif truth and meta:
        labels = _val_labels_from_devkit(fs, truth, meta)
    else:
        raise UserError(
            f"{src}: val/ is flat but no labels were found: put LOC_val_solution.csv (Kaggle) or the devkit's "
            "ILSVRC2012_validation_ground_truth.txt and meta.mat in the source folder"
        )
    items: List[SourceItem] = []
    skipped: List[Dict[str, str]] = []
    for file_path, info in sorted(fs.find(val, detail=True).items()):
        shown = f"val/{posixpath.relpath(file_path, val)}"
        if not _is_image_name(file_path):
            skipped.append({"source": shown, "reason": "not an image file name"})
            continue
        key = sample_key(file_path)
        synset = labels.get(key)
        if synset is None:
            skipped.append({"source": shown, "reason": "no label for this validation image"})
            continue
        items.append(SourceItem(key, synset, file_path, -1, int(info.get("size") or 0), shown))
    items.sort(key=lambda it: (it.synset, it.key))
    return Listing(items, skipped)
