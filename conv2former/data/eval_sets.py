"""The ImageNet robustness and re-labelled test sets, read in the layouts they are distributed in.

* ``real``: ImageNet-ReaL (Beyer et al. 2020): ``real.json``, a list over the 50,000 ILSVRC2012 val images in file
  order of their label sets (1k class indices), beside the val images (``ILSVRC2012_val_00000001.JPEG`` ...,
  flat or in synset folders). Images with an empty label set are left out, as the ReaL paper and timm do.
* ``v2``: ImageNetV2 (Recht et al. 2019): class-index folders ``0/`` ... ``999/`` (the 1k order).
* ``a`` and ``r``: ImageNet-A and -R: synset folders over 200 of the 1k classes; scored over those 200 only (the
  other logits masked), as their papers evaluate.
* ``sketch``: ImageNet-Sketch: synset folders over the 1k classes.

Each set is a list of image files with label sets over the set's own synsets; the model's logits are scored at those
synsets' columns, so a 22k head is evaluated through the synset mapping. Paths go through fsspec (local or remote).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import fsspec
import torch

from conv2former.data.shard_format import canonical_synsets
from conv2former.errors import UserError

__all__ = ["EVAL_SETS", "EvalSet", "load_eval_set", "find_set_root", "logit_columns"]

EVAL_SETS = ("real", "v2", "a", "r", "sketch")
FOLDER_NAMES: Dict[str, Tuple[str, ...]] = {
    "real": ("real", "imagenet-real"),
    "v2": ("v2", "imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "a": ("a", "imagenet-a"),
    "r": ("r", "imagenet-r"),
    "sketch": ("sketch", "imagenet-sketch"),
}
"""The folder names ``--eval-set all`` looks for under ``--eval-root`` (ours first, then the distributed ones)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNSET = re.compile(r"^n\d{8}$")
REAL_IMAGE = re.compile(r"^ILSVRC2012_val_(\d{8})\.jpe?g$", re.IGNORECASE)


@dataclass(frozen=True)
class EvalSet:
    name: str
    root: str
    synsets: Tuple[str, ...]  # the classes scored, in label order
    files: Tuple[str, ...]  # fsspec URLs of the images
    labels: Tuple[Tuple[int, ...], ...]  # each image's label set (indices into synsets); one label but for ReaL
    note: str = ""  # what a reader of the numbers should know (e.g. how many ReaL images were found)


def load_eval_set(name: str, root: str) -> EvalSet:
    """The set ``name`` (one of EVAL_SETS) at ``root``; a one-line UserError when ``root`` is not in its layout."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise UserError(f"--eval-root {root} is not a folder")
    if name == "real":
        return _real(fs, root, path)
    if name == "v2":
        return _class_index_folders(fs, root, path)
    return _synset_folders(name, fs, root, path)


def find_set_root(name: str, root: str) -> Optional[str]:
    """``root/<one of FOLDER_NAMES[name]>`` when it exists, else None."""
    fs, path = fsspec.core.url_to_fs(root)
    for folder in FOLDER_NAMES[name]:
        if fs.isdir(posixpath.join(path, folder)):
            return posixpath.join(root.rstrip("/"), folder)
    return None


def logit_columns(eval_set: EvalSet, head_classes: Sequence[str]) -> torch.Tensor:
    """The head's column of each of the set's synsets (int64), or a UserError naming the synsets the head lacks."""
    position = {synset: i for i, synset in enumerate(head_classes)}
    missing = [s for s in eval_set.synsets if s not in position]
    if missing:
        raise UserError(
            f"the model's {len(head_classes)}-class head lacks {len(missing)} of {eval_set.name}'s "
            f"{len(eval_set.synsets)} classes (e.g. {', '.join(missing[:3])}): evaluate a model trained on "
            "ImageNet-1k or -22k synsets"
        )
    return torch.tensor([position[s] for s in eval_set.synsets], dtype=torch.int64)


def _images(fs: fsspec.AbstractFileSystem, folder: str) -> List[str]:
    return sorted(p for p in fs.find(folder) if p.lower().endswith(IMAGE_EXTENSIONS))


def _urls(fs: fsspec.AbstractFileSystem, root: str, paths: List[str]) -> Tuple[str, ...]:
    return tuple(fs.unstrip_protocol(p) if "://" in root else p for p in paths)


def _subfolders(fs: fsspec.AbstractFileSystem, path: str) -> List[str]:
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _from_folders(
    name: str, fs: fsspec.AbstractFileSystem, root: str, path: str, folders: List[str], note: str
) -> EvalSet:
    files: List[str] = []
    labels: List[Tuple[int, ...]] = []
    for label, folder in enumerate(folders):
        found = _images(fs, posixpath.join(path, folder))
        files += found
        labels += [(label,)] * len(found)
    if not files:
        raise UserError(f"{root} holds no images ({'/'.join(IMAGE_EXTENSIONS)}) in its class folders")
    return EvalSet(name, root, tuple(folders), _urls(fs, root, files), tuple(labels), note)


def _synset_folders(name: str, fs: fsspec.AbstractFileSystem, root: str, path: str) -> EvalSet:
    folders = [f for f in _subfolders(fs, path) if SYNSET.match(f)]
    if not folders:
        raise UserError(
            f"{root} has no synset folders (n01440764/ ...): point --eval-root at the folder that holds "
            f"ImageNet-{name.upper() if len(name) == 1 else name.capitalize()}'s class folders"
        )
    known = set(canonical_synsets("imagenet1k"))
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise UserError(f"{root}: {len(unknown)} folders are not ImageNet-1k synsets (e.g. {unknown[0]})")
    note = f"scored over its {len(folders)} classes" if len(folders) < len(known) else ""
    return _from_folders(name, fs, root, path, folders, note)


def _class_index_folders(fs: fsspec.AbstractFileSystem, root: str, path: str) -> EvalSet:
    folders = [f for f in _subfolders(fs, path) if f.isdigit() and int(f) < 1000]
    if not folders:
        raise UserError(
            f"{root} has no class-index folders (0/ ... 999/): point --eval-root at ImageNetV2's "
            "imagenetv2-matched-frequency-format-val/ (or the other two V2 sets)"
        )
    synsets_1k = canonical_synsets("imagenet1k")
    folders.sort(key=int)
    files: List[str] = []
    labels: List[Tuple[int, ...]] = []
    for folder in folders:
        found = _images(fs, posixpath.join(path, folder))
        files += found
        labels += [(int(folder),)] * len(found)
    if not files:
        raise UserError(f"{root} holds no images in its class-index folders")
    note = "" if len(folders) == 1000 else f"{len(folders)} of the 1000 class folders present"
    return EvalSet("v2", root, synsets_1k, _urls(fs, root, files), tuple(labels), note)


def _real(fs: fsspec.AbstractFileSystem, root: str, path: str) -> EvalSet:
    labels_path = posixpath.join(path, "real.json")
    if not fs.isfile(labels_path):
        raise UserError(
            f"{root} has no real.json: put ReaL's real.json (github.com/google-research/reassessed-imagenet) "
            "beside the ILSVRC2012 val images"
        )
    with fs.open(labels_path, "r") as f:
        real = json.load(f)
    if not isinstance(real, list) or not all(isinstance(x, list) for x in real):
        raise UserError(f"{labels_path} is not ReaL's real.json (a list of label lists)")
    files: List[str] = []
    labels: List[Tuple[int, ...]] = []
    found = unlabelled = 0
    for image in _images(fs, path):
        match = REAL_IMAGE.match(posixpath.basename(image))
        if match is None:
            continue
        number = int(match.group(1))
        if not 1 <= number <= len(real):
            raise UserError(f"{image} is val image {number}, past real.json's {len(real)} entries")
        found += 1
        if not real[number - 1]:
            unlabelled += 1
            continue
        files.append(image)
        labels.append(tuple(int(c) for c in real[number - 1]))
    if not files:
        raise UserError(f"{root} holds no labelled ILSVRC2012_val_*.JPEG images beside real.json")
    note = f"{len(files)} labelled of {found} val images found ({unlabelled} without a ReaL label left out)"
    if found < len(real):
        note += f"; real.json covers {len(real)}"
    return EvalSet("real", root, canonical_synsets("imagenet1k"), _urls(fs, root, files), tuple(labels), note)
