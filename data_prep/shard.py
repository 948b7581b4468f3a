#!/usr/bin/env python
"""Turn ImageNet-22k / ImageNet-1k (as downloaded) into WebDataset shards, or verify shards.

    python data_prep/shard.py                                # build the demo dataset into ./data/demo
    python data_prep/shard.py imagenet22k SRC OUT [--val-per-class 10] [--max-side 512] ...
    python data_prep/shard.py imagenet1k  SRC OUT [...]
    python data_prep/shard.py verify OUT[/train]             # exit 0 only if everything checks out

OUT is a local path or any fsspec URL (s3://bucket/prefix, ...). See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Set

from conv2former.checkout import checkout_first

checkout_first(__file__)  # data_prep runs from the checkout

from conv2former.data.shard_format import canonical_synsets  # noqa: E402
from conv2former.errors import UserError, exit_on_user_error  # noqa: E402
from conv2former.units import parse_bytes  # noqa: E402
from data_prep.build import BuildOptions, build_shards, check_output, format_summary  # noqa: E402
from data_prep.holdout import image_checker, split_holdout  # noqa: E402
from data_prep.items import synset_reader  # noqa: E402
from data_prep.sources import LAYOUTS_22K, Listing, list_1k, list_22k  # noqa: E402
from data_prep.writer import WriteOptions  # noqa: E402

DEMO_DIR = os.path.join("data", "demo")


def parse_size(text: str) -> int:
    """--shard-size: conv2former.units' one meaning (GB = 10^9, GiB = 2^30); a bad value is argparse's one line."""
    try:
        return int(parse_bytes(text, "--shard-size") or 0)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the dataset as downloaded (folder, or the 22k outer .tar)")
    p.add_argument("out", help="output root (local path or fsspec URL); splits go to OUT/train and OUT/val")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--samples-per-shard", type=int, help="a fixed number of samples per shard")
    sizes.add_argument(
        "--shard-size",
        type=parse_size,
        default=parse_size("1GB"),
        help="target shard size in bytes of source images (default 1GB)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        help="downscale images whose longer side exceeds this (default: keep; 512 recommended for 22k throughput)",
    )
    p.add_argument("--min-side", type=int, default=32, help="skip images with a side under this (default 32)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel writer processes")
    p.add_argument("--seed", type=int, default=0, help="shuffle (and 22k hold-out) seed (default 0)")
    p.add_argument(
        "--classes",
        default="full",
        help="label space: 'full' (timm's class list), 'present' (only the synsets found, in the same "
        "order), or a file with one synset per line (default full)",
    )
    p.add_argument(
        "--check",
        choices=["decode", "header"],
        default="decode",
        help="decode every kept JPEG (default), or trust a parsed header with an end-of-image marker",
    )
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different source or settings")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="rewrite every shard instead of keeping the complete ones",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="list, draw the held-out split and plan the shards, print the plan, and write nothing",
    )
    p.add_argument("--name", help="dataset name in _info.json (default: imagenet-22k / imagenet-1k)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shard.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="generate the demo dataset and shard it (the default)")
    demo.add_argument("--out", default=DEMO_DIR, help=f"where to build it (default {DEMO_DIR})")
    demo.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    demo.add_argument("--quiet", action="store_true")
    p22 = sub.add_parser("imagenet22k", help="ImageNet-22k (fall11_whole / winter21_whole) with a held-out val split")
    _add_common(p22)
    p22.add_argument("--layout", choices=LAYOUTS_22K, help="source layout (default: detected)")
    p22.add_argument(
        "--val-per-class",
        type=int,
        default=10,
        help="valid images held out per class for val, exactly (default 10: ~218k images, 1.5%% of 22k; docs/data.md)",
    )
    p1 = sub.add_parser("imagenet1k", help="ImageNet-1k train/ and val/ (folder, Kaggle csv or devkit labels)")
    _add_common(p1)
    verify = sub.add_parser("verify", help="read back every shard, index and image; exit 1 on any problem")
    verify.add_argument("url", help="a shard root or one of its split folders (OUT or OUT/train)")
    verify.add_argument("--no-dali", dest="dali", action="store_false", help="decode with PIL only")
    verify.add_argument(
        "--quick",
        action="store_true",
        help="check the manifest, indexes and tar sizes and headers only (a few small reads per shard; no decoding)",
    )
    verify.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="shards checked in parallel")
    verify.add_argument("--quiet", action="store_true")
    return parser


def resolve_classes(spec: str, dataset: str, splits: Dict[str, Any]) -> List[str]:
    canonical = list(canonical_synsets(dataset))
    if spec == "full":
        return canonical
    if spec == "present":
        present: Set[str] = set()
        for listing in splits.values():
            synset_at = synset_reader(listing.items)
            present.update(synset_at(i) for i in range(len(listing.items)))
        return [s for s in canonical if s in present]
    if not os.path.exists(spec):
        raise UserError(f"--classes: {spec!r} is neither 'full', 'present' nor an existing file of synsets")
    with open(spec) as f:
        return [line.strip() for line in f if line.strip()]


def run_imagenet22k(args: argparse.Namespace) -> Dict[str, Any]:
    layout, listing = list_22k(args.src, args.layout, args.workers)
    if not listing.items:
        raise UserError(f"no images found in {args.src} (layout {layout})")
    if not args.plan_only:
        check_output(args.out)  # before the held-out candidates are read
    check = image_checker(_write_options(args), args.workers, args.quiet)
    train, val, rejected = split_holdout(listing.items, args.val_per_class, args.seed, check)
    splits = {"train": Listing(train, listing.skipped + rejected), "val": Listing(val, [])}
    source = {
        "dataset": "imagenet22k",
        "src": os.path.abspath(args.src) if "://" not in args.src else args.src,
        "layout": layout,
        "val_per_class": args.val_per_class,
    }
    return _build(args, "imagenet22k", args.name or "imagenet-22k", splits, source)


def run_imagenet1k(args: argparse.Namespace) -> Dict[str, Any]:
    splits = list_1k(args.src)
    if not splits["train"].items:
        raise UserError(f"no training images found in {args.src}/train")
    source = {"dataset": "imagenet1k", "src": os.path.abspath(args.src) if "://" not in args.src else args.src}
    return _build(args, "imagenet1k", args.name or "imagenet-1k", splits, source)


def _write_options(args: argparse.Namespace) -> WriteOptions:
    return WriteOptions(max_side=args.max_side, min_side=args.min_side, check=args.check)


def _build(
    args: argparse.Namespace, dataset: str, name: str, splits: Dict[str, Any], source: Dict[str, Any]
) -> Dict[str, Any]:
    classes = resolve_classes(args.classes, dataset, splits)
    options = BuildOptions(
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        shard_bytes=None if args.samples_per_shard else args.shard_size,
        workers=args.workers,
        overwrite=args.overwrite,
        resume=args.resume,
        quiet=args.quiet,
        write=_write_options(args),
        plan_only=args.plan_only,
    )
    summary = build_shards(args.out, name, classes, splits, source, options)
    print(format_summary(summary))
    return summary


def run_demo(out: str, workers: int, quiet: bool) -> None:
    from data_prep.demo import generate

    raw = os.path.join(out, "raw")
    print(f"demo dataset: generating images in {raw} (reused when present)")
    generate(raw)
    common = ["--samples-per-shard", "250", "--classes", "present", "--workers", str(workers)]
    common += ["--quiet"] if quiet else []
    parser = build_parser()
    run_imagenet22k(
        parser.parse_args(
            ["imagenet22k", os.path.join(raw, "in22k"), os.path.join(out, "in22k"), "--val-per-class", "10", *common]
        )
    )
    run_imagenet1k(parser.parse_args(["imagenet1k", os.path.join(raw, "in1k"), os.path.join(out, "in1k"), *common]))


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv or ["demo"])
    if args.command == "demo":
        run_demo(args.out, args.workers, args.quiet)
    elif args.command == "imagenet22k":
        run_imagenet22k(args)
    elif args.command == "imagenet1k":
        run_imagenet1k(args)
    elif args.command == "verify":
        from data_prep.verify import verify

        problems = verify(args.url, use_dali=args.dali, quiet=args.quiet, quick=args.quick, workers=args.workers)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            print(f"verify {args.url}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        what = "shard and index (sizes and headers; --quick)" if args.quick else "shard, index and image"
        print(f"verify {args.url}: every {what} checks out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
