"""Where the training loaders' time goes, stage by stage: the DALI pipeline cut after each stage (and single ops), and
the torch backend's per-image stages.

    python benchmarks/loader_breakdown.py [--backend dali|torch|both] [--device cpu|gpu] [--batch 64] [--threads 2]
        [--seconds 10] [--record]

Runs on the shards loader_speed.py generates (data/bench/shards). Stages, cumulative, as in
conv2former/data/dali_loader.py's train graph: read + fused decode/random-resized-crop; + bicubic antialiased
resize to 224; + normalize/flip (crop_mirror_normalize); + RandAugment n=2 m=9 (= the full graph). Then the full
graph without RandAugment plus one op each (rotate, shear, brightness, equalize) to see which RandAugment ops cost.
torch: one process, one thread, each stage of conv2former/data/torch_loader.py timed per image on the same samples:
read the bytes from the tar by offset, PIL decode, timm's random-resized-crop (bicubic), flip, RandAugment
(rand-m9-mstd0.5-inc1), then either uint8 CHW (what the backend's workers hand over) or ToTensor + Normalize (what
the ImageFolder baseline's workers do, then stack 64 of them into a fresh batch) or the uint8 tensor normalized into
its slot of a fresh 64-batch (what the backend's workers do on CPU); and per image of a 64-batch, the stacking and batch
normalization of the GPU form (here on CPU). Writing a fresh batch costs its page faults (~0.25 ms per image).
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings
from typing import Callable, Optional

from results import machine, record, versions

from conv2former.checkout import checkout_first

checkout_first(__file__)


def pipeline_rate(stage: str, extra: Optional[str], args: argparse.Namespace, paths, index_paths) -> float:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    gpu = args.device == "gpu"
    extras: dict[str, Callable] = {
        "rotate": lambda im: fn.rotate(im, angle=fn.random.uniform(range=[-30, 30]), keep_size=True, fill_value=128),
        "shear": lambda im: fn.warp_affine(im, matrix=[1, 0.3, 0, 0, 1, 0], fill_value=128, inverse_map=False),
        "brightness": lambda im: fn.brightness(im, brightness=fn.random.uniform(range=[0.5, 1.5])),
        "equalize": lambda im: fn.equalize(im),
    }

    @pipeline_def(enable_conditionals=True)
    def pipe():
        jpg, _ = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            random_shuffle=True,
            initial_fill=1024,
        )
        images = fn.decoders.image_random_crop(
            jpg,
            device="mixed" if gpu else "cpu",
            output_type=types.RGB,
            random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
            num_attempts=10,
        )
        if stage == "decode":
            return images
        images = fn.resize(images, resize_x=224, resize_y=224, interp_type=types.INTERP_CUBIC, antialias=True)
        if stage == "resize":
            return images
        if stage == "randaugment":
            images = rand_augment.rand_augment(images, n=2, m=9, num_magnitude_bins=11)
        if extra:
            images = extras[extra](images)
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=fn.random.coin_flip())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = pipe(
            batch_size=args.batch,
            num_threads=args.threads,
            device_id=0 if gpu else None,
            seed=1,
            prefetch_queue_depth=2,
            exec_dynamic=True,
        )
        p.build()
        for _ in range(3):
            p.run()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            p.run()
            count += args.batch
    return count / (time.perf_counter() - start)


def torch_stage_ms(split, images: int) -> dict:
    """Milliseconds per image of each stage of the torch backend's train transform, one thread."""
    import torch
    from torchvision import transforms

    from conv2former.config import DataConfig
    from conv2former.data import shard_format as fmt
    from conv2former.data.torch_loader import _Batches, normalize_batch, read_sample, timm_transform

    torch.set_num_threads(1)
    cfg = DataConfig(image_size=224)
    crop, flip, randaugment, to_uint8 = timm_transform(cfg, True, uint8=True).transforms
    to_float = transforms.Compose(timm_transform(cfg, True).transforms[3:])  # ToTensor + Normalize
    refs = [
        (s.tar, jpg, cls) for s in split.shards for jpg, cls in s.members((fmt.IMAGE_KEY, fmt.CLASS_KEY), 0, len(s))
    ]
    refs = (refs * -(-images // len(refs)))[:images]
    ms = {
        name: 0.0
        for name in (
            "read + decode",
            "random-resized-crop",
            "flip",
            "RandAugment",
            "to uint8 tensor",
            "ToTensor + Normalize (baseline)",
            "stack the float images (baseline, per image)",
            "normalize into the batch (CPU form)",
            "stack + normalize a batch (GPU form, per image)",
        )
    }
    worker = _Batches([], 64, None, cfg.image_size, 0, False, (cfg.mean, cfg.std))
    normalized = worker._new_batch()

    def timed(name, fn, value):
        start = time.perf_counter()
        out = fn(value)
        ms[name] += (time.perf_counter() - start) * 1e3 / len(refs)
        return out

    batch, floats = [], []
    for ref in refs:
        image = timed("read + decode", lambda r: read_sample(r)[0].convert("RGB"), ref)
        image.load()
        image = timed("flip", flip, timed("random-resized-crop", crop, image))
        image = timed("RandAugment", randaugment, image)
        batch.append(timed("to uint8 tensor", to_uint8, image))
        floats.append(timed("ToTensor + Normalize (baseline)", to_float, image))
        timed(
            "normalize into the batch (CPU form)",
            lambda x: worker.normalize_into(normalized[len(batch) - 1], x),
            batch[-1],
        )
        if len(batch) == 64:
            normalized = worker._new_batch()
            timed("stack the float images (baseline, per image)", torch.stack, floats)
            floats = []
            timed(
                "stack + normalize a batch (GPU form, per image)",
                lambda b: normalize_batch(torch.stack(b), cfg.mean, cfg.std),
                batch,
            )
            batch = []
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["dali", "torch", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--images", type=int, default=2000, help="images to generate if data/bench is absent")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    from loader_speed import prepare

    from conv2former.data.shards import open_split

    split = open_split(str(prepare(args.images) / "shards"), "train")
    rows = []
    if args.backend in ("torch", "both"):
        for stage, ms in torch_stage_ms(split, 640).items():
            print(f"torch {stage:<45} {ms:6.2f} ms per image (one thread)")
            rows.append(
                f"| {datetime.date.today()} | {machine(1)} | torch | {stage} | 64 | 1 | — | {ms:.2f} | "
                f"{versions('torch', 'pillow', 'timm')} |"
            )
    if args.backend in ("dali", "both"):
        rows += dali_rows(split, args)
    if args.record:
        record("loader_breakdown.py", rows)


def dali_rows(split, args: argparse.Namespace) -> list:
    paths, index_paths = [s.tar for s in split.shards], [s.index for s in split.shards]
    runs = [
        ("read + decode/random crop", "decode", None),
        ("+ resize to 224 (bicubic, antialias)", "resize", None),
        ("+ flip, normalize to float CHW", "normalize", None),
        ("+ RandAugment n=2 m=9 (full graph)", "randaugment", None),
    ]
    runs += [(f"no RandAugment, + {op} only", "normalize", op) for op in ("rotate", "shear", "brightness", "equalize")]
    rows = []
    for label, stage, extra in runs:
        rate = pipeline_rate(stage, extra, args, paths, index_paths)
        print(f"{label:<40} {rate:8.0f} images/s  ({1e3 * args.threads / rate:.2f} ms per image per thread)")
        rows.append(
            f"| {datetime.date.today()} | {machine()} | dali-{args.device} | {label} | {args.batch} | "
            f"{args.threads} | {rate:.0f} | {1e3 * args.threads / rate:.2f} | {versions('dali')} |"
        )
    return rows


if __name__ == "__main__":
    main()
