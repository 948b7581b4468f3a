"""The built-in demo dataset: generated images in the real ImageNet on-disk layouts, no download.

* "22k": 40 classes (real synset ids, 10 of which are ImageNet-1k classes) as per-synset tars
  ``raw/in22k/nXXXXXXXX.tar`` holding ``nXXXXXXXX_N.JPEG``, the fall11_whole layout.
* "1k": those 10 classes as ``raw/in1k/train/nXXXXXXXX/*.JPEG`` and a flat ``raw/in1k/val/*.JPEG`` labelled by
  ``LOC_val_solution.csv`` (the Kaggle layout).

Each class is a shape drawn in a colour, on a textured noisy background, at a random place, size and angle, so a
small network learns it within minutes on a CPU, and the same synset looks the same in "22k" and "1k" (pretraining
transfers). Same seed, same bytes.
"""

from __future__ import annotations

import io
import math
import os
import random
import tarfile
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from conv2former.data.shard_format import canonical_synsets

SHAPES = ("disc", "square", "triangle", "cross", "ring")
HUES = 8  # 5 shapes x 8 colours = 40 distinct classes
NUM_22K = 40
NUM_1K = 10


def demo_synsets() -> Tuple[List[str], List[str]]:
    """(the 40 "22k" synsets in 22k order, the 10 of them that are ImageNet-1k classes in 1k order)."""
    in1k = canonical_synsets("imagenet1k")
    in22k = canonical_synsets("imagenet22k")
    chosen_1k = [in1k[i * len(in1k) // NUM_1K] for i in range(NUM_1K)]
    others = [s for s in in22k if s not in set(in1k)]
    step = len(others) // (NUM_22K - NUM_1K)
    chosen = set(chosen_1k) | set(others[i * step] for i in range(NUM_22K - NUM_1K))
    return [s for s in in22k if s in chosen], sorted(chosen_1k, key=in1k.index)


def _class_look(class_index: int) -> Tuple[str, Tuple[int, int, int]]:
    shape = SHAPES[class_index % len(SHAPES)]
    hue = (class_index // len(SHAPES)) % HUES
    angle = 2 * math.pi * hue / HUES
    red, green, blue = (int(127 + 120 * math.cos(angle + k * 2 * math.pi / 3)) for k in range(3))
    return shape, (red, green, blue)


def render(class_index: int, rng: random.Random) -> bytes:
    """One JPEG of a class: its shape and colour, randomly placed, scaled, rotated, on noise."""
    return render_with_mask(class_index, rng)[0]


def render_with_mask(class_index: int, rng: random.Random) -> Tuple[bytes, np.ndarray]:
    """``render`` and the shape's own pixels: (JPEG bytes, boolean (h, w) mask of the drawn shape). The mask is
    drawn with the same geometry and takes nothing from ``rng``, so the bytes equal ``render``'s."""
    w, h = rng.randint(72, 120), rng.randint(72, 120)
    np_rng = np.random.default_rng(rng.getrandbits(32))
    background = np_rng.integers(40, 200, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(background).resize((w, h), Image.Resampling.BILINEAR)
    mask = Image.new("L", (w, h), 0)
    shape, colour = _class_look(class_index)
    red, green, blue = (max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    colour = (red, green, blue)
    size = rng.uniform(0.3, 0.6) * min(w, h)
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    r = size / 2
    for canvas, fill in ((ImageDraw.Draw(img), colour), (ImageDraw.Draw(mask), 255)):
        if shape == "disc":
            canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "ring":
            canvas.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r / 3)))
    if shape not in ("disc", "ring"):
        theta = rng.uniform(0, 2 * math.pi)
        corners = _corners(shape, r)
        rot = [
            (cx + x * math.cos(theta) - y * math.sin(theta), cy + x * math.sin(theta) + y * math.cos(theta))
            for x, y in corners
        ]
        ImageDraw.Draw(img).polygon(rot, fill=colour)
        ImageDraw.Draw(mask).polygon(rot, fill=255)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))
    noisy = np.asarray(img, dtype=np.int16) + np_rng.integers(-12, 13, size=(h, w, 3))
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue(), np.asarray(mask) > 0


def _corners(shape: str, r: float) -> List[Tuple[float, float]]:
    if shape == "square":
        return [(r, r), (-r, r), (-r, -r), (r, -r)]
    if shape == "triangle":
        return [(r * math.cos(a), r * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    t = r / 3  # cross
    return [(t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t), (-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t)]


def held_out_images(count: int, seed: int = 1234) -> List[Tuple[str, bytes, np.ndarray]]:
    """``count`` fresh "1k" images that are in no split (another seed): (synset, JPEG bytes, shape mask)."""
    synsets_22k, synsets_1k = demo_synsets()
    rng = random.Random(f"{seed}:held-out")
    out = []
    for i in range(count):
        synset = synsets_1k[i % len(synsets_1k)]
        data, mask = render_with_mask(synsets_22k.index(synset), rng)
        out.append((synset, data, mask))
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def generate(raw_dir: str, seed: int = 0, per_class_22k: int = 60, train_1k: int = 100, val_1k: int = 30) -> None:
    """Write the raw demo dataset under ``raw_dir`` (``in22k/`` and ``in1k/``); a finished one is left alone."""
    done = os.path.join(raw_dir, ".complete")
    if os.path.exists(done):
        return
    synsets_22k, synsets_1k = demo_synsets()
    look = {synset: i for i, synset in enumerate(synsets_22k)}
    in22k = os.path.join(raw_dir, "in22k")
    os.makedirs(in22k, exist_ok=True)
    for synset in synsets_22k:
        rng = random.Random(f"{seed}:22k:{synset}")
        with tarfile.open(os.path.join(in22k, f"{synset}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for n in range(per_class_22k):
                _add_bytes(tar, f"{synset}_{n + 1}.JPEG", render(look[synset], rng))
    in1k = os.path.join(raw_dir, "in1k")
    val_rows = []
    val_images = []
    for synset in synsets_1k:
        rng = random.Random(f"{seed}:1k:{synset}")
        folder = os.path.join(in1k, "train", synset)
        os.makedirs(folder, exist_ok=True)
        for n in range(train_1k):
            with open(os.path.join(folder, f"{synset}_{n + 1}.JPEG"), "wb") as f:
                f.write(render(look[synset], rng))
        val_images += [(synset, render(look[synset], rng)) for _ in range(val_1k)]
    order = random.Random(f"{seed}:1k:val").sample(range(len(val_images)), len(val_images))
    os.makedirs(os.path.join(in1k, "val"), exist_ok=True)
    for number, i in enumerate(order, start=1):
        synset, data = val_images[i]
        image_id = f"ILSVRC2012_val_{number:08d}"
        with open(os.path.join(in1k, "val", f"{image_id}.JPEG"), "wb") as f:
            f.write(data)
        val_rows.append(f"{image_id},{synset} 1 1 10 10")
    with open(os.path.join(in1k, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n" + "\n".join(val_rows) + "\n")
    with open(done, "w") as f:
        f.write("ok\n")
