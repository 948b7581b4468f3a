#!/usr/bin/env python
"""Fine-tuning (22k -> 1k): ``deepspeed launch/finetune.py --variant l --pretrained runs/l22k --data IN1K
--resolution 224 --output runs/l1k-224``, and ``--resolution 384`` from the same 22k run (the paper's chain).

The same engine and flags as pretraining, plus --pretrained (a run dir, an exported model.safetensors, a DeepSpeed
checkpoint dir or an official .pth), --resolution, --recipe {224,384} and --head {synset,reinit}. ``--max-steps 0``
writes the transferred model to OUTPUT/export/ without training.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Tuple

from conv2former.config import TrainConfig
from conv2former.data.eval_crop import recipe_for
from conv2former.engine.cli import add_train_arguments, resolve_config, run_stage
from conv2former.errors import exit_on_user_error
from conv2former.process_exit import exit_process

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "finetune", "configs")


def configure(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, TrainConfig]:
    """(args, the resolved TrainConfig) of this command line: what main() trains (tests/test_recipe.py reads it)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_train_arguments(parser)
    parser.add_argument(
        "--pretrained", required=True, help="run dir, model.safetensors, DeepSpeed checkpoint dir or .pth"
    )
    parser.add_argument("--resolution", type=int, default=224, help="training and evaluation image size")
    parser.add_argument("--recipe", choices=["224", "384"], help="eval crop recipe (default: 384 above 256 px)")
    parser.add_argument(
        "--head",
        choices=["synset", "reinit"],
        help="map the pretrained head rows by synset (default) or start a fresh head (= --set finetune.head=...)",
    )
    args = parser.parse_args(argv)
    if args.head:  # a flag: below --set in the precedence
        args.overrides = [f"finetune.head={args.head}", *args.overrides]
    args.overrides = [f"stage=finetune-{args.resolution}", *args.overrides]  # (so --help-config shows it)
    recipe = args.recipe or recipe_for(args.resolution)
    defaults = [os.path.join(CONFIGS, "finetune_224.yaml")]
    if recipe == "384":
        defaults.append(os.path.join(CONFIGS, "finetune_384.yaml"))
    if args.image_size is None:
        args.image_size = args.resolution
    # per variant: variants/<v>.yaml (drop path, the demo's CPU sizes), and at 384 variants/<v>_384.yaml
    cfg = resolve_config(args, defaults, os.path.join(CONFIGS, "variants"), ("", "_384") if recipe == "384" else ("",))
    return args, cfg


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
    args, cfg = configure(argv)
    init_weights = None
    if not args.plan_memory:
        from conv2former.head_transfer import pretrained_init

        init_weights = pretrained_init(args.pretrained, cfg, int(os.environ.get("RANK", 0)))  # bad paths fail fast
    return run_stage(args, cfg, init_weights)


if __name__ == "__main__":
    exit_process(main())
