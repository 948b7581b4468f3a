#!/usr/bin/env python
"""ImageNet-22k pretraining: ``deepspeed launch/pretrain.py --variant l --data SHARDS --output runs/l22k``.

Also runs under ``torchrun`` and ``srun`` (rank variables from the launcher). See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Tuple

from conv2former.config import TrainConfig
from conv2former.engine.cli import add_train_arguments, resolve_config, run_stage
from conv2former.errors import exit_on_user_error
from conv2former.process_exit import exit_process

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain", "configs")


def configure(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, TrainConfig]:
    """(args, the resolved TrainConfig) of this command line: what main() trains (tests/test_recipe.py reads it)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    # per variant: variants/<v>.yaml (the demo's CPU sizes)
    cfg = resolve_config(args, [os.path.join(CONFIGS, "pretrain_22k.yaml")], os.path.join(CONFIGS, "variants"))
    return args, cfg


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
    return run_stage(*configure(argv))


if __name__ == "__main__":
    exit_process(main())
