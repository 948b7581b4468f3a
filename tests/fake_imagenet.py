"""Generate small fake ImageNet-22k and ImageNet-1k trees in the real layouts, bad files included."""

from __future__ import annotations

import io
import os
import random
import tarfile
from typing import Dict, List

import numpy as np
from PIL import Image

from conv2former.data.shard_format import canonical_synsets
from data_prep.demo import render

SYNSETS_22K = [canonical_synsets("imagenet22k")[i] for i in (5, 1000, 7000, 15000)]
SYNSETS_1K = [canonical_synsets("imagenet1k")[i] for i in (0, 65, 500)]
PER_CLASS = 12

# What every bad input must become: (file name suffix, reason prefix recorded in skipped.jsonl, or "reencoded")
BAD_22K = {
    "not_image": "not an image",
    "empty": "empty file",
    "truncated": "undecodable or truncated image",
    "tiny": "too small",
    "cmyk": "reencoded",
    "png": "reencoded",
    "gray": "reencoded",
}


def jpeg(seed: int, mode: str = "RGB", size=(80, 64), fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def bad_file(kind: str) -> bytes:
    good = jpeg(1)
    return {
        "not_image": b"this is a text file, not an image\n",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "tiny": jpeg(2, size=(16, 16)),
        "cmyk": jpeg(3, mode="CMYK"),
        "png": jpeg(4, fmt="PNG"),
        "gray": jpeg(5, mode="L"),
    }[kind]


def class_images(synset: str, n: int = PER_CLASS) -> Dict[str, bytes]:
    rng = random.Random(synset)
    return {f"{synset}_{i + 1}.JPEG": render(i % 40, rng) for i in range(n)}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def make_22k_synset_tars(root: str, with_bad: bool = True) -> Dict[str, List[str]]:
    """root/nXXXXXXXX.tar per synset; the first synset also holds every bad file kind; an unknown synset and a
    truncated tar are added when ``with_bad``. Returns {synset: [good member names]}."""
    os.makedirs(root, exist_ok=True)
    good: Dict[str, List[str]] = {}
    for n, synset in enumerate(SYNSETS_22K):
        images = class_images(synset)
        with tarfile.open(os.path.join(root, f"{synset}.tar"), "w") as tar:
            for name, data in images.items():
                add_member(tar, name, data)
            if with_bad and n == 0:
                for kind in BAD_22K:
                    add_member(tar, f"{synset}_{kind}.JPEG", bad_file(kind))
        good[synset] = list(images)
    if with_bad:
        with tarfile.open(os.path.join(root, "n99999999.tar"), "w") as tar:  # a synset not in the class list
            add_member(tar, "n99999999_1.JPEG", jpeg(9))
    return good


def truncate_tar(path: str, keep_members: int) -> None:
    """Cut a tar in the middle of member number ``keep_members`` (0-based)."""
    with tarfile.open(path) as tar:
        members = [m for m in tar]
    cut = members[keep_members].offset_data + members[keep_members].size // 2
    with open(path, "r+b") as f:
        f.truncate(cut)


def make_outer_tar(synset_tar_dir: str, outer_path: str) -> None:
    with tarfile.open(outer_path, "w:gz" if outer_path.endswith(".gz") else "w") as tar:
        for name in sorted(os.listdir(synset_tar_dir)):
            tar.add(os.path.join(synset_tar_dir, name), arcname=f"fall11_whole/{name}")


def make_22k_folders(root: str) -> None:
    for synset in SYNSETS_22K:
        os.makedirs(os.path.join(root, synset), exist_ok=True)
        for name, data in class_images(synset).items():
            with open(os.path.join(root, synset, name), "wb") as f:
                f.write(data)


def make_1k(root: str, val_format: str, per_class: int = 6, val_per_class: int = 3) -> Dict[str, str]:
    """ImageNet-1k tree with val as 'folder', 'csv' (Kaggle) or 'devkit'. Returns {val image id: synset}."""
    for synset in SYNSETS_1K:
        folder = os.path.join(root, "train", synset)
        os.makedirs(folder, exist_ok=True)
        for name, data in class_images(synset, per_class).items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
    truth: Dict[str, str] = {}
    number = 0
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    for synset in SYNSETS_1K:
        for data in class_images(synset + "v", val_per_class).values():
            number += 1
            image_id = f"ILSVRC2012_val_{number:08d}"
            truth[image_id] = synset
            folder = os.path.join(root, "val", synset) if val_format == "folder" else os.path.join(root, "val")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{image_id}.JPEG"), "wb") as f:
                f.write(data)
    if val_format == "csv":
        with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
            f.write("ImageId,PredictionString\n")
            for image_id, synset in truth.items():
                f.write(f"{image_id},{synset} 10 10 50 50 {synset} 1 1 5 5\n")
    elif val_format == "devkit":
        write_devkit(os.path.join(root, "ILSVRC2012_devkit_t12", "data"), truth)
    return truth


def write_devkit(folder: str, truth: Dict[str, str]) -> None:
    """meta.mat with the devkit's ILSVRC2012_IDs (1..1000 in the devkit's own, non-sorted order) + ground truth."""
    from scipy.io import savemat

    os.makedirs(folder, exist_ok=True)
    in1k = list(canonical_synsets("imagenet1k"))
    devkit_order = in1k[::-1]  # any order that is not the sorted one proves the ids are mapped, not assumed
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i + 1, wnid, wnid, 0) for i, wnid in enumerate(devkit_order)] + [(1001, "n00001740", "entity", 5)]
    savemat(os.path.join(folder, "meta.mat"), {"synsets": np.array(rows, dtype=dtype)})
    id_of = {wnid: i + 1 for i, wnid in enumerate(devkit_order)}
    with open(os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        for image_id in sorted(truth):
            f.write(f"{id_of[truth[image_id]]}\n")
