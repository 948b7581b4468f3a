"""Turn a listed source into a shard root: plan, guard against mixing runs, write in parallel, write the manifest."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import posixpath
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import fsspec
from tqdm import tqdm

from conv2former.data import shard_format as fmt
from conv2former.errors import UserError
from data_prep.items import synset_reader, view
from data_prep.sources import STREAMED, Listing, SourceItem, stream_targz_images
from data_prep.writer import (
    PROGRESS_DIR,
    ShardResult,
    ShardTask,
    WriteOptions,
    cut_into_shards,
    read_progress,
    seeded_shuffle,
    summarize_skips,
    write_shard,
)

PLAN_FILE = "_plan.json"


@dataclass
class BuildOptions:
    seed: int = 0
    samples_per_shard: Optional[int] = None
    shard_bytes: Optional[int] = 1 << 30
    workers: int = 1
    overwrite: bool = False
    resume: bool = True
    write: WriteOptions = WriteOptions()
    quiet: bool = False
    plan_only: bool = False  # stop after the plan (``--plan-only``)


def _digest(splits: Dict[str, List[Sequence[SourceItem]]]) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        for i, shard in enumerate(splits[split]):
            h.update(f"{split}/{i}:".encode())
            for item in shard:
                h.update(f"{item.synset}/{item.key}|{item.name}|{item.size};".encode())
    return h.hexdigest()


def _same_items(previous: Dict[str, object], plan: Dict[str, object]) -> bool:
    """Whether two plans differ only in where the source lives (same settings, same samples in the same shards)."""

    def without_location(p: Dict[str, object]) -> Dict[str, object]:
        source = p.get("source")
        return {**p, "source": {k: v for k, v in source.items() if k != "src"} if isinstance(source, dict) else source}

    return without_location(previous) == without_location(plan)


def _check_writable(fs: fsspec.AbstractFileSystem, out_path: str, out: str) -> None:
    try:
        fs.makedirs(out_path, exist_ok=True)
        probe = posixpath.join(out_path, ".write-probe")
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError, ValueError) as err:
        raise UserError(f"cannot write to output {out}: {err}") from None


def check_output(out: str) -> None:
    """One clear line now, before any image is read, when ``out`` cannot be written."""
    fs, out_path = fsspec.core.url_to_fs(str(out))
    _check_writable(fs, out_path.rstrip("/"), out)


def _clear_output(fs: fsspec.AbstractFileSystem, out_path: str) -> None:
    for name in ("train", "val", PROGRESS_DIR, "_spill", fmt.INFO_FILE, fmt.CLASSES_FILE, fmt.SKIPPED_FILE, PLAN_FILE):
        target = posixpath.join(out_path, name)
        if fs.exists(target):
            fs.rm(target, recursive=True)


def _spill_streamed(tasks: List[ShardTask], fs, out_path: str, quiet: bool) -> Optional[str]:
    """Images inside a .tar.gz cannot be read by offset: stream the archive once and append each planned image to
    its shard's local spill file, pointing the tasks' items there. Returns the spill folder (deleted at the end)."""
    wanted: Dict[str, tuple] = {}
    for t, task in enumerate(tasks):
        for j, (item, _) in enumerate(task.items):
            if item.offset == STREAMED:
                wanted[item.name] = (t, j)
    if not wanted:
        return None
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    spill_dir = posixpath.join(out_path, "_spill") if local else tempfile.mkdtemp(prefix="c2f-spill-")
    shutil.rmtree(spill_dir, ignore_errors=True)
    os.makedirs(spill_dir)
    archive = tasks[wanted[next(iter(wanted))][0]].items[0][0].path
    with tqdm(total=len(wanted), unit="img", desc="spill .tar.gz", disable=quiet, file=sys.stderr) as bar:
        for name, data in stream_targz_images(archive, wanted):
            t, j = wanted[name]
            task = tasks[t]
            item, label = task.items[j]
            spill = os.path.join(spill_dir, f"{task.split}-{task.index:06d}.bin")
            with open(spill, "ab") as f:
                offset = f.tell()
                f.write(data)
            task.items[j] = (SourceItem(item.key, item.synset, spill, offset, len(data), item.name), label)
            bar.update(1)
    for task in tasks:  # members the second pass did not find (a damaged archive) are skipped, not guessed
        task.items = [(item, label) for item, label in task.items if item.offset != STREAMED]
    return spill_dir


def build_shards(
    out: str,
    name: str,
    classes: Sequence[str],
    splits: Dict[str, Listing],
    source_description: Dict[str, object],
    options: BuildOptions,
) -> Dict[str, object]:
    """Write ``splits`` ({"train": Listing, "val": Listing}) to ``out`` and return the run summary (with
    ``options.plan_only``: plan, write ``_plan.json``, find the shards a resume keeps, and stop there)."""
    start = time.time()
    fs, out_path = fsspec.core.url_to_fs(str(out))
    out_path = out_path.rstrip("/")
    if not options.plan_only:
        _check_writable(fs, out_path, out)
    label_of = {synset: i for i, synset in enumerate(classes)}
    planned, listing_skips = _plan_splits(splits, label_of, options)
    plan = {
        "name": name,
        "source": source_description,
        "seed": options.seed,
        "samples_per_shard": options.samples_per_shard,
        "shard_bytes": None if options.samples_per_shard else options.shard_bytes,
        "write": asdict(options.write),
        "num_classes": len(classes),
        "shards": {split: len(shards) for split, shards in planned.items()},
        "digest": _digest(planned),
    }
    if options.plan_only:  # nothing is written or removed; a resume's kept shards are counted when the plan matches
        previous = _previous_plan(fs, out_path)
        kept = previous is not None and (previous == plan or _same_items(previous, plan))
        results, pending = _pending_shards(fs, out_path, planned, kept)
        return _plan_summary(out, planned, results, pending, listing_skips, time.time() - start)
    _settle_previous_plan(fs, out_path, out, plan, options)
    fs.makedirs(out_path, exist_ok=True)
    with fs.open(posixpath.join(out_path, PLAN_FILE), "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)
    with fs.open(posixpath.join(out_path, fmt.CLASSES_FILE), "w") as f:
        f.write("".join(f"{synset}\n" for synset in classes))
    for split in planned:  # temporary files of a killed run (never under a shard's final name)
        for stale in fs.glob(posixpath.join(out_path, split, ".*.partial")):
            fs.rm(stale)
    results, pending = _pending_shards(fs, out_path, planned, options.resume)
    total_images = sum(len(shard) for shards in planned.values() for shard in shards)

    def task(key: Tuple[str, int]) -> ShardTask:  # made when it is handed to a writer, not all at once
        split, index = key
        items = [(item, label_of[item.synset]) for item in planned[split][index]]
        return ShardTask(str(out).rstrip("/"), split, index, items, options.write)

    _write_tasks(fs, out_path, name, pending, task, results, listing_skips, total_images, options)
    all_results = [results[key] for key in sorted(results)]
    info = _write_manifest(fs, out_path, name, classes, source_description, planned, results, options.seed)
    with fs.open(posixpath.join(out_path, fmt.SKIPPED_FILE), "w") as f:
        for skip in listing_skips + [s for r in all_results for s in r.skipped]:
            f.write(json.dumps(skip, sort_keys=True) + "\n")
    return _run_summary(out, planned, info, results, pending, listing_skips, time.time() - start)


def _run_summary(out, planned, info, results, pending, listing_skips, seconds: float) -> Dict[str, object]:
    """What a run reports: images in, written, re-encoded, skipped (by reason), bytes, shards, speed."""
    all_results = [results[key] for key in sorted(results)]
    total_images = sum(len(shard) for shards in planned.values() for shard in shards)
    return {
        "output": str(out),
        "images_in": total_images + len(listing_skips),
        "written": sum(r.num_samples for r in all_results),
        "reencoded": sum(r.reencoded for r in all_results),
        "skipped": dict(summarize_skips(all_results, listing_skips)),
        "bytes": sum(r.num_bytes for r in all_results),
        "shards": {split: len(shards) for split, shards in planned.items()},
        "shards_reused": len(results) - len(pending),
        "samples": {split: info["splits"][split]["num_samples"] for split in planned},
        "seconds": round(seconds, 2),
        "images_per_second": round(sum(len(planned[s][i]) for s, i in pending) / seconds, 1) if seconds > 0 else None,
    }


def _plan_splits(
    splits: Dict[str, Listing], label_of: Dict[str, int], options: BuildOptions
) -> Tuple[Dict[str, List[Sequence[SourceItem]]], List[Dict[str, str]]]:
    """Each split's items in the label space, shuffled by seed and cut into shards (views of the listing: row
    numbers, data_prep/items.py); and the listing's skips."""
    listing_skips: List[Dict[str, str]] = []
    planned: Dict[str, List[Sequence[SourceItem]]] = {}
    for split, listing in splits.items():
        listing_skips += listing.skipped
        items, synset_at = listing.items, synset_reader(listing.items)
        kept = array("i")
        for i in range(len(items)):
            if synset_at(i) in label_of:
                kept.append(i)
            else:
                reason = f"synset {synset_at(i)} not in the class list"
                listing_skips.append({"source": items[i].name, "reason": reason})
        seeded_shuffle(kept, options.seed, split)
        shuffled = view(items, kept)
        planned[split] = cut_into_shards(shuffled, options.samples_per_shard, options.shard_bytes) if kept else []
    return planned, listing_skips


def _settle_previous_plan(fs, out_path: str, out: str, plan: Dict[str, object], options: BuildOptions) -> None:
    """Keep the output for a resume of the same plan, clear it for a fresh run, refuse to mix another plan's shards
    with this one's unless ``--overwrite``."""
    previous = _previous_plan(fs, out_path)
    if previous is not None:
        if previous != plan and _same_items(previous, plan):
            # the same images under another path (a moved checkout or mount): the shards stay valid
            if not options.quiet:
                print(
                    f"{out}: the source moved ({previous['source'].get('src')} -> {plan['source'].get('src')}); "
                    "the planned samples are identical, so the shards are reused"
                )
            previous = plan
        if previous != plan:
            if not options.overwrite:
                differs = sorted(k for k in plan if previous.get(k) != plan[k])
                raise UserError(
                    f"{out} already holds shards from a different source or settings ({', '.join(differs)} differ); "
                    "pass --overwrite to replace them, or choose another output"
                )
            _clear_output(fs, out_path)
        elif not options.resume:
            _clear_output(fs, out_path)
    elif fs.exists(posixpath.join(out_path, "train")) or fs.exists(posixpath.join(out_path, fmt.INFO_FILE)):
        if not options.overwrite:
            raise UserError(f"{out} already holds shards not written by this plan; pass --overwrite to replace them")
        _clear_output(fs, out_path)


def _previous_plan(fs, out_path: str) -> Optional[Dict[str, object]]:
    """The plan stored in ``out_path`` (None when there is none)."""
    plan_path = posixpath.join(out_path, PLAN_FILE)
    if not fs.exists(plan_path):
        return None
    with fs.open(plan_path, "r") as f:
        return json.load(f)


def _pending_shards(fs, out_path: str, planned, resume: bool) -> Tuple[Dict[tuple, ShardResult], List[tuple]]:
    """(the complete shards a resume keeps, the (split, index) of the others). A shard counts as complete when its
    commit record, tar size and index agree (``read_progress``: three small reads, run in threads for object stores)."""
    keys = [(split, index) for split, shards in planned.items() for index in range(len(shards))]
    results: Dict[tuple, ShardResult] = {}
    if resume and keys:
        with ThreadPoolExecutor(max_workers=16) as pool:
            done = pool.map(lambda key: read_progress(fs, out_path, *key), keys)
            results = {key: record for key, record in zip(keys, done) if record is not None}
    return results, [key for key in keys if key not in results]


def _write_tasks(
    fs, out_path, name, pending, task, results, listing_skips, total_images, options: BuildOptions
) -> None:
    """Write the pending shards (``task(key)`` makes each one's task; ``options.workers`` processes, at most two
    tasks each in flight) under a progress bar; fills ``results``."""
    bar = tqdm(
        total=total_images,
        initial=sum(r.images_in for r in results.values()),
        unit="img",
        desc=f"shards {name}",
        disable=options.quiet,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    skipped_count = len(listing_skips) + sum(len(r.skipped) for r in results.values())

    def collect(result: ShardResult) -> None:
        nonlocal skipped_count
        results[(result.split, result.index)] = result
        skipped_count += len(result.skipped)
        bar.update(result.images_in)
        bar.set_postfix(skipped=skipped_count)

    tasks = (task(key) for key in pending)
    spill_dir = None
    first = task(pending[0]) if pending else None
    if first is not None and first.items and first.items[0][0].offset == STREAMED:
        tasks = [task(key) for key in pending]  # a .tar.gz: one streaming pass fills every shard's spill file
        spill_dir = _spill_streamed(tasks, fs, out_path, options.quiet)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    # memory:// lives inside one process: workers could not hand their shards back.
    if options.workers <= 1 or "memory" in protocols:
        for one in tasks:
            collect(write_shard(one))
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=options.workers, mp_context=ctx) as pool:
            running = set()
            for one in tasks:
                running.add(pool.submit(write_shard, one))
                if len(running) >= 2 * options.workers:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        collect(future.result())
            for future in as_completed(running):
                collect(future.result())
    bar.close()
    if spill_dir is not None:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _write_manifest(fs, out_path, name, classes, source_description, planned, results, seed) -> Dict[str, object]:
    """``_info.json``: the format, and per split its shards and their lengths."""
    info = {
        "name": name,
        "num_classes": len(classes),
        "seed": seed,
        "source": source_description,
        "format": {
            "image": fmt.IMAGE_KEY,
            "class": fmt.CLASS_KEY,
            "label": fmt.LABEL_KEY + " (int64 LE)",
            "meta": fmt.META_KEY,
            "index": f"DALI {fmt.INDEX_VERSION}",
        },
        "splits": {},
    }
    for split, shards in planned.items():
        split_results = [results[(split, i)] for i in range(len(shards))]
        info["splits"][split] = {
            "name": split,
            "num_samples": sum(r.num_samples for r in split_results),
            "filenames": [f"{split}/{fmt.shard_name(split, i)}" for i in range(len(shards))],
            "shard_lengths": [r.num_samples for r in split_results],
        }
    with fs.open(posixpath.join(out_path, fmt.INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _plan_summary(out, planned, results, pending, listing_skips, seconds: float) -> Dict[str, object]:
    """What ``--plan-only`` reports: the shards and samples per split, their source bytes, what a run would write."""
    return {
        "output": str(out),
        "plan_only": True,
        "shards": {split: len(shards) for split, shards in planned.items()},
        "samples": {split: sum(len(shard) for shard in shards) for split, shards in planned.items()},
        "source_bytes": {split: sum(i.size for shard in shards for i in shard) for split, shards in planned.items()},
        "shards_complete": len(results),
        "shards_to_write": len(pending),
        "listing_skipped": len(listing_skips),
        "seconds": round(seconds, 2),
    }


def format_summary(summary: Dict[str, object]) -> str:
    if summary.get("plan_only"):
        return _format_plan(summary)
    skipped: Dict[str, int] = summary["skipped"]  # type: ignore[assignment]
    lines = [
        f"wrote {summary['output']}: {summary['written']} images in "
        + ", ".join(f"{split} {n} ({summary['shards'][split]} shards)" for split, n in summary["samples"].items()),
        f"  images in {summary['images_in']}, re-encoded {summary['reencoded']}, skipped {sum(skipped.values())}"
        + (": " + "; ".join(f"{reason} {n}" for reason, n in Counter(skipped).most_common()) if skipped else ""),
        f"  {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']} s ({summary['images_per_second']} img/s), "
        f"{summary['shards_reused']} complete shards reused",
    ]
    return "\n".join(lines)


def _format_plan(summary: Dict[str, object]) -> str:
    splits = ", ".join(
        f"{split} {n:,} images in {summary['shards'][split]:,} shards ({summary['source_bytes'][split] / 1e9:.2f} GB)"
        for split, n in summary["samples"].items()
    )
    return "\n".join(
        [
            f"plan for {summary['output']}: {splits}",
            f"  {summary['shards_complete']:,} complete shards a resume keeps, {summary['shards_to_write']:,} to write;"
            f" {summary['listing_skipped']:,} inputs skipped while listing; planned in {summary['seconds']} s",
            "  nothing was written (--plan-only)",
        ]
    )
