"""The ImageNet-22k held-out split (``--val-per-class N``): exactly N valid images per class, chosen by seed.

ImageNet-22k has no validation split, so shard.py holds out N images of every class. Each class's images are put in
a seeded order (``holdout:{synset}``), and the first N *valid* ones are held out: candidates are checked in that
order with the writer's own test (``clean_image`` with the run's options), so a damaged file drawn into the held-out
split is replaced by the next valid image, never left as a gap that the training split then fills. A class with at
most N valid images holds out all but one of them (one stays for training). A bad candidate goes to neither split;
it is recorded in ``skipped.jsonl`` like any other skipped input.

The checks run in rounds: each round checks, for every class still short, as many next candidates as it still needs
(N + 1 valid: the one after the held-out ones proves a valid image is left for training), in parallel by offset, or in
one pass of the archive for a ``.tar.gz`` source. Without bad files one round suffices and the split is exactly the
first N of the seeded order. Cost: N + 1 image reads and checks per class (about 240,000 for N = 10 on 22k).
"""

from __future__ import annotations

import multiprocessing
import sys
from array import array
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fsspec
from tqdm import tqdm

from data_prep.images import SkipImage, clean_image
from data_prep.items import synset_reader, view
from data_prep.sources import STREAMED, SourceItem, stream_targz_images
from data_prep.writer import WriteOptions, seeded_shuffle

Verdicts = Dict[str, Optional[str]]  # source name -> why the image would be skipped, or None when it is valid
CheckFn = Callable[[List[SourceItem]], Verdicts]


def split_holdout(
    items: Sequence[SourceItem], per_class: int, seed: int, check: CheckFn
) -> Tuple[Sequence[SourceItem], Sequence[SourceItem], List[Dict[str, str]]]:
    """(train, held out, skipped candidates) for ``items`` sorted by (synset, key) (as list_22k gives them): the first
    ``per_class`` valid images of each class in its seeded order are held out (at most all valid but one); bad
    candidates go to neither split. The splits are views of ``items`` (row numbers, not copies: data_prep/items.py)."""
    synset_at = synset_reader(items)
    rows_of: Dict[str, "array[int]"] = {}
    for i in range(len(items)):
        rows_of.setdefault(synset_at(i), array("i")).append(i)
    for synset, rows in rows_of.items():
        seeded_shuffle(rows, seed, f"holdout:{synset}")
    checked = {synset: 0 for synset in rows_of}  # how many candidates of the order were checked
    valid: Dict[str, List[int]] = {synset: [] for synset in rows_of}
    bad: List[Tuple[int, str]] = []
    short = sorted(rows_of) if per_class > 0 else []
    while short:
        batch: List[int] = []
        for synset in short:
            want = per_class + 1 - len(valid[synset])
            batch += rows_of[synset][checked[synset] : checked[synset] + want]
            checked[synset] += want
        verdicts = check([items[i] for i in batch])
        for i in batch:
            item = items[i]
            reason = verdicts[item.name]
            if reason is None:
                valid[item.synset].append(i)
            else:
                bad.append((i, reason))
        short = [s for s in short if len(valid[s]) <= per_class and checked[s] < len(rows_of[s])]
    held = sorted(i for synset in rows_of for i in valid[synset][: max(0, min(per_class, len(valid[synset]) - 1))])
    excluded = set(held) | {i for i, _ in bad}
    skipped = [{"source": items[i].name, "reason": f"{reason} (a held-out candidate)"} for i, reason in bad]
    train = view(items, (i for i in range(len(items)) if i not in excluded))
    return train, view(items, held), skipped


_FS: Dict[str, fsspec.AbstractFileSystem] = {}  # per worker process: one filesystem per source path


def _verdict(data: bytes, options: WriteOptions) -> Optional[str]:
    try:
        clean_image(data, options.max_side, options.min_side, options.check)
    except SkipImage as skip:
        return str(skip)
    return None


def _check_one(item: SourceItem, options: WriteOptions) -> Tuple[str, Optional[str]]:
    fs = _FS.get(item.path)
    if fs is None:
        fs = _FS[item.path] = fsspec.core.url_to_fs(item.path)[0]
    return item.name, _verdict(item.read(fs), options)


def image_checker(options: WriteOptions, workers: int, quiet: bool = False) -> CheckFn:
    """The check ``split_holdout`` uses: the writer's test on each candidate, ``workers`` processes for images read
    by offset, one streaming pass for images inside a ``.tar.gz``."""

    def check(batch: List[SourceItem]) -> Verdicts:
        streamed = [item for item in batch if item.offset == STREAMED]
        direct = [item for item in batch if item.offset != STREAMED]
        verdicts: Verdicts = {}
        with tqdm(total=len(batch), unit="img", desc="check held-out", disable=quiet, file=sys.stderr) as bar:
            if workers > 1 and len(direct) > 1:
                ctx = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    chunk = max(1, len(direct) // (workers * 16))
                    for name, reason in pool.map(_check_one, direct, [options] * len(direct), chunksize=chunk):
                        verdicts[name] = reason
                        bar.update(1)
            else:
                for item in direct:
                    name, verdicts[name] = _check_one(item, options)
                    bar.update(1)
            if streamed:
                wanted = {item.name: item for item in streamed}
                for name, data in stream_targz_images(streamed[0].path, wanted):
                    verdicts[name] = _verdict(data, options)
                    bar.update(1)
                for item in streamed:
                    verdicts.setdefault(item.name, "not found when the archive was read again")
        return verdicts

    return check
