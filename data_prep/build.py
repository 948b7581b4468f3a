"""Turn a listed source into a shard root: ``ShardPlan`` (what will be written, decided first) and ``ShardBuild``
(guard against mixing runs, write in parallel, write the manifest); ``build_shards`` runs the two."""

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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

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


def _spill_streamed(tasks: List[ShardTask], fs: Any, out_path: str, quiet: bool) -> Optional[str]:
    """Images inside a .tar.gz cannot be read by offset: stream the archive once and append each planned image to
    its shard's local spill file, pointing the tasks' items there. Returns the spill folder (deleted at the end)."""
    wanted: Dict[str, Tuple[Any, ...]] = {}
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


class ShardPlan:
    """What a build writes, decided before anything is written: each split's items in the label space, shuffled by
    seed and cut into shards (views of the listing: row numbers, data_prep/items.py), the listing's skips, and the
    plan record (``_plan.json``) that a later run compares with its own."""

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        splits: Dict[str, Listing],
        source: Dict[str, object],
        options: BuildOptions,
    ) -> None:
        self.name, self.classes, self.source, self.options = name, list(classes), source, options
        self.label_of = {synset: i for i, synset in enumerate(self.classes)}
        self.listing_skips: List[Dict[str, str]] = []
        self.shards: Dict[str, List[Sequence[SourceItem]]] = {
            split: self._cut(split, listing) for split, listing in splits.items()
        }
        self.record: Dict[str, object] = {
            "name": name,
            "source": source,
            "seed": options.seed,
            "samples_per_shard": options.samples_per_shard,
            "shard_bytes": None if options.samples_per_shard else options.shard_bytes,
            "write": asdict(options.write),
            "num_classes": len(self.classes),
            "shards": {split: len(shards) for split, shards in self.shards.items()},
            "digest": _digest(self.shards),
        }

    def _cut(self, split: str, listing: Listing) -> List[Sequence[SourceItem]]:
        self.listing_skips += listing.skipped
        items, synset_at = listing.items, synset_reader(listing.items)
        kept = array("i")
        for i in range(len(items)):
            if synset_at(i) in self.label_of:
                kept.append(i)
            else:
                reason = f"synset {synset_at(i)} not in the class list"
                self.listing_skips.append({"source": items[i].name, "reason": reason})
        seeded_shuffle(kept, self.options.seed, split)
        return (
            cut_into_shards(view(items, kept), self.options.samples_per_shard, self.options.shard_bytes) if kept else []
        )

    def keys(self) -> List[Tuple[str, int]]:
        return [(split, index) for split, shards in self.shards.items() for index in range(len(shards))]

    @property
    def total_images(self) -> int:
        return sum(len(shard) for shards in self.shards.values() for shard in shards)

    def task(self, out: str, key: Tuple[str, int]) -> ShardTask:
        """The writer's task for one shard (made when it is handed to a writer, not all at once)."""
        split, index = key
        items = [(item, self.label_of[item.synset]) for item in self.shards[split][index]]
        return ShardTask(out.rstrip("/"), split, index, items, self.options.write)


class ShardBuild:
    """One plan written into one output (a local folder or any fsspec URL): settle what a previous run left there
    (resume the same plan, refuse another one's shards), write the pending shards in parallel, then the manifest
    (``_info.json``), the class list and the skips; or, for ``--plan-only``, report what a run would do."""

    def __init__(self, out: str, plan: ShardPlan, started: Optional[float] = None) -> None:
        self.out, self.plan, self.options = str(out), plan, plan.options
        self.started = time.time() if started is None else started  # the summary's seconds count from here
        self.fs, path = fsspec.core.url_to_fs(self.out)
        self.path = path.rstrip("/")
        self.results: Dict[Tuple[str, int], ShardResult] = {}  # complete shards, kept or written
        self.pending: List[Tuple[str, int]] = []

    def preview(self) -> Dict[str, object]:
        """What ``--plan-only`` reports; nothing is written or removed (a resume's kept shards are counted when the
        stored plan matches)."""
        previous = self._previous_plan()
        kept = previous is not None and (previous == self.plan.record or _same_items(previous, self.plan.record))
        self._find_complete(kept)
        shards = self.plan.shards
        return {
            "output": self.out,
            "plan_only": True,
            "shards": {split: len(s) for split, s in shards.items()},
            "samples": {split: sum(len(shard) for shard in s) for split, s in shards.items()},
            "source_bytes": {split: sum(i.size for shard in s for i in shard) for split, s in shards.items()},
            "shards_complete": len(self.results),
            "shards_to_write": len(self.pending),
            "listing_skipped": len(self.plan.listing_skips),
            "seconds": round(time.time() - self.started, 2),
        }

    def run(self) -> Dict[str, object]:
        """Write the shards and the manifest; returns the run summary."""
        self._settle_previous_plan()
        self._write_header_files()
        self._find_complete(self.options.resume)
        self._write_pending()
        info = self._write_manifest()
        with self.fs.open(posixpath.join(self.path, fmt.SKIPPED_FILE), "w") as f:
            for skip in self.plan.listing_skips + [
                s for key in sorted(self.results) for s in self.results[key].skipped
            ]:
                f.write(json.dumps(skip, sort_keys=True) + "\n")
        return self._summary(info, time.time() - self.started)

    def _summary(self, info: Dict[str, object], seconds: float) -> Dict[str, object]:
        """What a run reports: images in, written, re-encoded, skipped (by reason), bytes, shards, speed."""
        results = [self.results[key] for key in sorted(self.results)]
        shards, skips = self.plan.shards, self.plan.listing_skips
        written_now = sum(len(shards[split][index]) for split, index in self.pending)
        return {
            "output": self.out,
            "images_in": self.plan.total_images + len(skips),
            "written": sum(r.num_samples for r in results),
            "reencoded": sum(r.reencoded for r in results),
            "skipped": dict(summarize_skips(results, skips)),
            "bytes": sum(r.num_bytes for r in results),
            "shards": {split: len(s) for split, s in shards.items()},
            "shards_reused": len(self.results) - len(self.pending),
            "samples": {split: info["splits"][split]["num_samples"] for split in shards},  # type: ignore[index]
            "seconds": round(seconds, 2),
            "images_per_second": round(written_now / seconds, 1) if seconds > 0 else None,
        }

    def _settle_previous_plan(self) -> None:
        """Keep the output for a resume of the same plan, clear it for a fresh run, refuse to mix another plan's
        shards with this one's unless ``--overwrite``."""
        fs, path, out, plan = self.fs, self.path, self.out, self.plan.record
        previous = self._previous_plan()
        if previous is not None:
            if previous != plan and _same_items(previous, plan):
                # the same images under another path (a moved checkout or mount): the shards stay valid
                if not self.options.quiet:
                    print(
                        f"{out}: the source moved ({previous['source'].get('src')} -> {plan['source'].get('src')}); "  # type: ignore[attr-defined]
                        "the planned samples are identical, so the shards are reused"
                    )
                previous = plan
            if previous != plan:
                if not self.options.overwrite:
                    differs = sorted(k for k in plan if previous.get(k) != plan[k])
                    raise UserError(
                        f"{out} already holds shards from a different source or settings ({', '.join(differs)} "
                        "differ); pass --overwrite to replace them, or choose another output"
                    )
                _clear_output(fs, path)
            elif not self.options.resume:
                _clear_output(fs, path)
        elif fs.exists(posixpath.join(path, "train")) or fs.exists(posixpath.join(path, fmt.INFO_FILE)):
            if not self.options.overwrite:
                raise UserError(
                    f"{out} already holds shards not written by this plan; pass --overwrite to replace them"
                )
            _clear_output(fs, path)

    def _previous_plan(self) -> Optional[Dict[str, object]]:
        """The plan stored in the output (None when there is none)."""
        plan_path = posixpath.join(self.path, PLAN_FILE)
        if not self.fs.exists(plan_path):
            return None
        with self.fs.open(plan_path, "r") as f:
            return json.load(f)

    def _write_header_files(self) -> None:
        """The plan and the class list first; temporary files of a killed run (never under a final name) removed."""
        self.fs.makedirs(self.path, exist_ok=True)
        with self.fs.open(posixpath.join(self.path, PLAN_FILE), "w") as f:
            json.dump(self.plan.record, f, indent=1, sort_keys=True)
        with self.fs.open(posixpath.join(self.path, fmt.CLASSES_FILE), "w") as f:
            f.write("".join(f"{synset}\n" for synset in self.plan.classes))
        for split in self.plan.shards:
            for stale in self.fs.glob(posixpath.join(self.path, split, ".*.partial")):
                self.fs.rm(stale)

    def _find_complete(self, resume: bool) -> None:
        """The complete shards a resume keeps (``results``) and the others (``pending``). A shard counts as complete
        when its commit record, tar size and index agree (``read_progress``: three small reads, in threads for
        object stores)."""
        keys = self.plan.keys()
        if resume and keys:
            with ThreadPoolExecutor(max_workers=16) as pool:
                done = pool.map(lambda key: read_progress(self.fs, self.path, *key), keys)
                self.results = {key: record for key, record in zip(keys, done) if record is not None}
        self.pending = [key for key in keys if key not in self.results]

    def _write_pending(self) -> None:
        """Write the pending shards (``options.workers`` processes, at most two tasks each in flight) under a
        progress bar; each result goes into ``results``."""
        options, results = self.options, self.results
        bar = tqdm(total=self.plan.total_images, initial=sum(r.images_in for r in results.values()), unit="img",
                   desc=f"shards {self.plan.name}", disable=options.quiet, dynamic_ncols=True, file=sys.stderr)  # fmt: skip
        skipped_count = len(self.plan.listing_skips) + sum(len(r.skipped) for r in results.values())

        def collect(result: ShardResult) -> None:
            nonlocal skipped_count
            results[(result.split, result.index)] = result
            skipped_count += len(result.skipped)
            bar.update(result.images_in)
            bar.set_postfix(skipped=skipped_count)

        tasks: Iterable[ShardTask] = (self.plan.task(self.out, key) for key in self.pending)
        spill_dir = None
        first = self.plan.task(self.out, self.pending[0]) if self.pending else None
        if first is not None and first.items and first.items[0][0].offset == STREAMED:
            tasks = [self.plan.task(self.out, key) for key in self.pending]  # a .tar.gz: one streaming pass
            spill_dir = _spill_streamed(tasks, self.fs, self.path, options.quiet)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if options.workers <= 1 or "memory" in protocols:  # memory:// lives in one process: workers could not write it
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

    def _write_manifest(self) -> Dict[str, object]:
        """``_info.json``: the format, and per split its shards and their lengths."""
        plan = self.plan
        splits: Dict[str, object] = {}
        for split, shards in plan.shards.items():
            split_results = [self.results[(split, i)] for i in range(len(shards))]
            entry: Dict[str, object] = {
                "name": split,
                "num_samples": sum(r.num_samples for r in split_results),
                "filenames": [f"{split}/{fmt.shard_name(split, i)}" for i in range(len(shards))],
                "shard_lengths": [r.num_samples for r in split_results],
            }
            if split_results and all(r.largest[0] for r in split_results if r.num_samples):  # (older shards: unknown)
                # [width, height] of the stored image with the most pixels: the GPU decoder's buffers are sized to it
                entry["largest_image"] = max((r.largest for r in split_results), key=lambda wh: wh[0] * wh[1])
            splits[split] = entry
        info = {
            "name": plan.name,
            "num_classes": len(plan.classes),
            "seed": self.options.seed,
            "source": plan.source,
            "format": {
                "image": fmt.IMAGE_KEY,
                "class": fmt.CLASS_KEY,
                "label": fmt.LABEL_KEY + " (int64 LE)",
                "meta": fmt.META_KEY,
                "index": f"DALI {fmt.INDEX_VERSION}",
            },
            "splits": splits,
        }
        with self.fs.open(posixpath.join(self.path, fmt.INFO_FILE), "w") as f:
            json.dump(info, f, indent=1)
        return info


def build_shards(
    out: str,
    name: str,
    classes: Sequence[str],
    splits: Dict[str, Listing],
    source_description: Dict[str, object],
    options: BuildOptions,
) -> Dict[str, object]:
    """Write ``splits`` ({"train": Listing, "val": Listing}) to ``out`` and return the run summary (with
    ``options.plan_only``: plan, find the shards a resume keeps, and stop there)."""
    started = time.time()
    if not options.plan_only:
        check_output(out)  # before the (long, at 22k scale) plan
    build = ShardBuild(out, ShardPlan(name, classes, splits, source_description, options), started)
    return build.preview() if options.plan_only else build.run()


def format_summary(summary: Dict[str, Any]) -> str:
    if summary.get("plan_only"):
        return _format_plan(summary)
    skipped: Dict[str, int] = summary["skipped"]
    lines = [
        f"wrote {summary['output']}: {summary['written']} images in "
        + ", ".join(f"{split} {n} ({summary['shards'][split]} shards)" for split, n in summary["samples"].items()),
        f"  images in {summary['images_in']}, re-encoded {summary['reencoded']}, skipped {sum(skipped.values())}"
        + (": " + "; ".join(f"{reason} {n}" for reason, n in Counter(skipped).most_common()) if skipped else ""),
        f"  {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']} s ({summary['images_per_second']} img/s), "
        f"{summary['shards_reused']} complete shards reused",
    ]
    return "\n".join(lines)


def _format_plan(summary: Dict[str, Any]) -> str:
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
