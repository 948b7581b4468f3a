"""The command line shared by the training entry points: flags -> a resolved ``TrainConfig``."""

from __future__ import annotations

import argparse
import os
from typing import Any, List, Optional, Sequence

import timm

from conv2former.config import TrainConfig, apply_overrides, describe_config, load_yaml, parse_set
from conv2former.errors import UserError

SHORT_VARIANTS = ("n", "t", "s", "b", "b_22k", "l", "demo")


def variant_name(name: str) -> str:
    full = name if name.startswith("conv2former_") else f"conv2former_{name}"
    import conv2former  # noqa: F401  (registers the variants)

    if full not in timm.list_models("conv2former_*"):
        raise UserError(
            f"unknown variant {name!r}: choose one of {', '.join(SHORT_VARIANTS)} "
            "(or a full name such as conv2former_l)"
        )
    return full


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help=f"{', '.join(SHORT_VARIANTS)} or a full timm name")
    parser.add_argument("--data", help="shard root holding train/ and val/ (local path or fsspec URL)")
    parser.add_argument("--output", help="run directory: checkpoints/, export/, tb/, log.jsonl")
    parser.add_argument("--config", action="append", default=[], help="YAML file of overrides (repeatable)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.base_lr=2e-3 (repeatable)",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument(
        "--max-steps", type=int, help="stop after this optimizer step; the schedule still follows --epochs"
    )
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--micro-batch", type=int, help="per rank")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    parser.add_argument("--backend", choices=["auto", "dali-gpu", "dali-cpu", "torch"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (and at each epoch end)")
    parser.add_argument("--workers", type=int, help="loader threads/workers per rank")
    parser.add_argument("--dry-run", action="store_true", help="print the derived schedule and exit")
    parser.add_argument(
        "--plan-memory",
        action="store_true",
        help="print what one rank's GPU holds for this config (weights, gradients, optimizer, EMA, activations "
        "measured on the real model) and the largest micro-batch that fits, without a GPU; exit",
    )
    parser.add_argument(
        "--gpu-memory",
        help="with --plan-memory: the GPU memory per rank to plan for, e.g. 80GB (default: this GPU's free)",
    )
    parser.add_argument(
        "--ranks",
        type=int,
        help="with --plan-memory: how many ranks the run will have (ZeRO shards over them; default 1)",
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config field as this command line resolves it (key = value  # meaning), exit",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher


def _merge(args: argparse.Namespace, files: Sequence[str]) -> TrainConfig:
    """YAML files in order, then the flags, then --set: the last word wins."""
    cfg = TrainConfig()
    for path in files:
        apply_overrides(cfg, load_yaml(path))
    flags = {
        ("model", "variant"): variant_name(args.variant) if args.variant else None,
        ("data", "root"): args.data,
        ("output",): args.output,
        ("schedule", "epochs"): args.epochs,
        ("schedule", "max_steps"): args.max_steps,
        ("schedule", "global_batch"): args.global_batch,
        ("data", "batch_size"): args.micro_batch,
        ("data", "image_size"): args.image_size,
        ("deepspeed", "zero_stage"): args.zero_stage,
        ("data", "backend"): args.backend,
        ("seed",): args.seed,
        ("checkpoint", "save_every"): args.save_every,
        ("data", "workers"): args.workers,
    }
    for keys, value in flags.items():
        if value is None:
            continue
        target = cfg
        for part in keys[:-1]:
            target = getattr(target, part)
        setattr(target, keys[-1], value)
    apply_overrides(cfg, parse_set(args.overrides))
    cfg.model.variant = variant_name(cfg.model.variant)
    return cfg


def variant_recipe_paths(folder: Optional[str], variant: str, suffixes: Sequence[str] = ("",)) -> List[str]:
    """The per-variant recipe files that exist: ``folder/<short name><suffix>.yaml`` (e.g. variants/l_384.yaml)."""
    if folder is None:
        return []
    short = variant[len("conv2former_") :] if variant.startswith("conv2former_") else variant
    return stage_config_paths(folder, [f"{short}{suffix}.yaml" for suffix in suffixes])


def resolve_config(
    args: argparse.Namespace,
    stage_defaults: Sequence[str],
    variant_folder: Optional[str] = None,
    variant_suffixes: Sequence[str] = ("",),
) -> TrainConfig:
    """The documented precedence: stage YAML (then its per-variant files) < --config files < flags < --set.

    The variant is whatever the whole chain ends with; its recipe files (``variant_folder``) join the stage
    defaults, so a --config, flag or --set always beats them."""
    variant = _merge(args, list(stage_defaults) + list(args.config)).model.variant
    defaults = list(stage_defaults) + variant_recipe_paths(variant_folder, variant, variant_suffixes)
    cfg = _merge(args, defaults + list(args.config))
    if getattr(args, "help_config", False):
        print(describe_config(cfg))
        raise SystemExit(0)
    if cfg.model.variant != variant:
        raise UserError(
            f"the variant's recipe file sets model.variant={cfg.model.variant}, not {variant}: fix "
            f"{variant_recipe_paths(variant_folder, variant, variant_suffixes)}"
        )
    cfg.validate()  # (the config's one judge: a mistake fails here, before anything starts; engine/run.py again)
    return cfg


def run_stage(args: argparse.Namespace, cfg: TrainConfig, init_weights: Optional[Any] = None) -> int:
    """The training launchers' ``main`` after their own flags: ``--plan-memory`` or ``--dry-run`` (printed as JSON),
    else the stage itself. The exit code: 0 finished, dry run, or stopped by a signal after a checkpoint (the requeued
    job resumes); 3-6 a fault, whose one line rank 0 printed (docs/training.md "When things go wrong")."""
    import json

    if args.plan_memory:
        from conv2former.engine.memory_plan import plan_memory_report

        print(json.dumps(plan_memory_report(cfg, args.ranks or 1, args.gpu_memory), indent=1))
        return 0
    from conv2former.engine.trainer import train

    result = train(cfg, dry_run=args.dry_run, init_weights=None if args.dry_run else init_weights)
    if args.dry_run:
        print(json.dumps(result, indent=1))
    return int(result.get("exit_code", 0))


def stage_config_paths(folder: str, names: List[str]) -> List[str]:
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
