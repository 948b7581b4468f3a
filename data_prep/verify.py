"""``shard.py verify URL``: read every shard and index back and decode every image (PIL, and DALI when installed);
``--quick`` checks the manifest, indexes and tar sizes and headers only (a few small reads per shard)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import posixpath
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

import fsspec
from PIL import Image
from tqdm import tqdm

from conv2former.data import shard_format as fmt

EXPECTED_EXTS = {fmt.IMAGE_KEY, fmt.CLASS_KEY, fmt.LABEL_KEY, fmt.META_KEY}


def _resolve(url: str) -> Tuple[fsspec.AbstractFileSystem, str, Optional[str]]:
    """(fs, shard root, split or None for all) for a shard root or one of its split folders."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if fs.exists(posixpath.join(path, fmt.INFO_FILE)):
        return fs, path, None
    parent = posixpath.dirname(path)
    if fs.exists(posixpath.join(parent, fmt.INFO_FILE)):
        return fs, parent, posixpath.basename(path)
    return fs, path, ""


def _check_shard(fs: Any, root: str, filename: str, num_classes: int, problems: List[str]) -> Tuple[int, List[int]]:
    """Check one shard against its index; returns (sample count, labels in order)."""
    tar_path = posixpath.join(root, filename)
    idx_path = tar_path[: -len(".tar")] + ".idx"
    labels: List[int] = []
    if not fs.exists(tar_path):
        problems.append(f"{filename}: missing")
        return 0, labels
    samples: Dict[str, Dict[str, bytes]] = {}
    order: List[str] = []
    index_rows: List[List[Tuple[str, int, int, str]]] = []
    try:
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                    index_rows.append([])
                data = tar.extractfile(member)
                samples[key][ext] = data.read() if data is not None else b""
                index_rows[-1].append((ext, member.offset_data, member.size, member.name))
    except (tarfile.TarError, EOFError, OSError) as err:
        problems.append(f"{filename}: unreadable tar ({err})")
        return 0, labels
    for key in order:
        sample = samples[key]
        where = f"{filename}:{key}"
        if set(sample) != EXPECTED_EXTS:
            problems.append(f"{where}: has {sorted(sample)}, expected {sorted(EXPECTED_EXTS)}")
            continue
        try:
            label = int(sample[fmt.CLASS_KEY].decode("ascii"))
        except ValueError:
            problems.append(f"{where}: cls is not an integer")
            continue
        if fmt.decode_label(sample[fmt.LABEL_KEY]) != label:
            problems.append(f"{where}: lbl {fmt.decode_label(sample[fmt.LABEL_KEY])} != cls {label}")
        if not 0 <= label < num_classes:
            problems.append(f"{where}: label {label} outside 0..{num_classes - 1}")
        labels.append(label)
        try:
            json.loads(sample[fmt.META_KEY])
            img = Image.open(io.BytesIO(sample[fmt.IMAGE_KEY]))
            if img.format != "JPEG" or img.mode != "RGB":
                problems.append(f"{where}: stored image is {img.format} {img.mode}, expected an RGB JPEG")
            img.load()
        except Exception as err:
            problems.append(f"{where}: does not decode ({type(err).__name__}: {err})")
    if not fs.exists(idx_path):
        problems.append(f"{filename}: index {posixpath.basename(idx_path)} missing")
    else:
        with fs.open(idx_path, "r") as f:
            if f.read() != fmt.format_index(index_rows):
                problems.append(f"{filename}: index does not match the tar")
    return len(order), labels


def _dali_labels(tar_path: str, idx_path: str) -> List[int]:
    """Decode every image of one local shard with a DALI CPU pipeline; returns the labels it read, in order."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=32, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def decode_all() -> Any:
        readers: Any = fn.readers  # (DALI's generated operators, read as Any)
        jpg, lbl = readers.webdataset(
            paths=[tar_path],
            index_paths=[idx_path],
            ext=[fmt.IMAGE_KEY, fmt.LABEL_KEY],
            dtypes=[types.UINT8, types.INT64],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl

    pipe = decode_all()
    pipe.build()
    total = pipe.epoch_size("reader")
    labels: List[int] = []
    while len(labels) < total:
        _, lbl = pipe.run()
        labels += [int(lbl.at(i)[0]) for i in range(len(lbl))]
    return labels[:total]


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def verify(url: str, use_dali: bool = True, quiet: bool = False, quick: bool = False, workers: int = 1) -> List[str]:
    """Return the list of problems (empty when every shard, index and image checks out). ``quick``: check only what
    the manifest, the indexes and the tars' sizes and member headers say (a few small reads per shard), not the
    images. Shards are checked in ``workers`` processes."""
    fs, root, only_split = _resolve(url)
    if only_split == "":
        return [f"{url}: no {fmt.INFO_FILE} here or in the parent folder (not a shard root or split folder)"]
    with fs.open(posixpath.join(root, fmt.INFO_FILE), "r") as f:
        info = json.load(f)
    problems: List[str] = []
    num_classes = int(info["num_classes"])
    classes_path = posixpath.join(root, fmt.CLASSES_FILE)
    if not fs.exists(classes_path):
        problems.append(f"{fmt.CLASSES_FILE} missing")
    else:
        with fs.open(classes_path, "r") as f:
            n = sum(1 for line in f if line.strip())
        if n != num_classes:
            problems.append(f"{fmt.CLASSES_FILE} lists {n} classes, {fmt.INFO_FILE} says {num_classes}")
    splits = [only_split] if only_split else list(info["splits"])
    if only_split and only_split not in info["splits"]:
        return [f"{url}: split {only_split!r} is not in {fmt.INFO_FILE} (has {', '.join(info['splits'])})"]
    dali = use_dali and not quick and _dali_available()
    for split in splits:
        split_info = info["splits"][split]
        filenames, lengths = split_info["filenames"], split_info["shard_lengths"]
        if sum(lengths) != split_info["num_samples"]:
            problems.append(f"{split}: shard lengths sum to {sum(lengths)}, num_samples is {split_info['num_samples']}")
        jobs = [
            (fs, root, filename, expected, num_classes, dali, quick) for filename, expected in zip(filenames, lengths)
        ]
        with tqdm(total=len(jobs), desc=f"verify {split}", unit="shard", disable=quiet) as bar:
            for shard_problems in _map_shards(jobs, workers):
                problems += shard_problems
                bar.update(1)
    return problems


def _map_shards(jobs: List[Tuple[Any, ...]], workers: int) -> Iterator[List[str]]:
    """``_verify_shard(*job)`` for every job, in order, in ``workers`` processes."""
    if workers <= 1 or len(jobs) < 2:
        yield from (_verify_shard(*job) for job in jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_verify_shard, *zip(*jobs))


def _verify_shard(
    fs: Any, root: str, filename: str, expected: int, num_classes: int, dali: bool, quick: bool
) -> List[str]:
    problems: List[str] = []
    if quick:
        count = _quick_check(fs, root, filename, problems)
    else:
        count, labels = _check_shard(fs, root, filename, num_classes, problems)
        if dali and count and count == len(labels):
            problems += _dali_check(fs, root, filename, labels)
    if count is not None and count != expected:
        problems.append(f"{filename}: {count} samples, {fmt.INFO_FILE} says {expected}")
    return problems


def _quick_check(fs: Any, root: str, filename: str, problems: List[str]) -> Optional[int]:
    """The index's sample count, after checking (without reading images) that the tar and its index exist, that the
    tar holds every byte the index points to, and that the first and last samples' headers name their members."""
    from conv2former.data.shards import check_member_names, index_ends, sample_end
    from conv2former.errors import UserError

    tar_path = posixpath.join(root, filename)
    idx_path = tar_path[: -len(".tar")] + ".idx"
    for path, what in ((tar_path, "missing"), (idx_path, f"index {posixpath.basename(idx_path)} missing")):
        if not fs.exists(path):
            problems.append(f"{filename}: {what}")
            return None
    try:
        count, first, last = index_ends(idx_path, filename, opener=fs.open)
        if count and first is not None and last is not None:
            size = fs.size(tar_path)
            if size < sample_end(last):
                problems.append(f"{filename}: truncated ({size} bytes; its index needs {sample_end(last)})")
                return count
            check_member_names(tar_path, (first, last), filename, opener=fs.open)
    except UserError as err:
        problems.append(str(err))
        return None
    return count


def _dali_check(fs: Any, root: str, filename: str, labels: List[int]) -> List[str]:
    tar_path = posixpath.join(root, filename)
    idx_path = tar_path[: -len(".tar")] + ".idx"
    with tempfile.TemporaryDirectory(prefix="c2f-verify-") as tmp:
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            local_tar, local_idx = tar_path, idx_path
        else:
            local_tar, local_idx = os.path.join(tmp, "s.tar"), os.path.join(tmp, "s.idx")
            fs.get_file(tar_path, local_tar)
            fs.get_file(idx_path, local_idx)
        try:
            dali_labels = _dali_labels(local_tar, local_idx)
        except Exception as err:  # DALI raises RuntimeError with its own multi-line report
            return [f"{filename}: DALI could not read or decode it ({str(err).strip().splitlines()[0][:200]})"]
    if dali_labels != labels:
        return [f"{filename}: DALI read different labels than cls"]
    return []
