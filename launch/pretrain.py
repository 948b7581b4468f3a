#!/usr/bin/env python
"""ImageNet-22k pretraining: ``deepspeed launch/pretrain.py --variant l --data SHARDS --output runs/l22k``.

Also runs under ``torchrun`` and ``srun`` (rank variables from the launcher). See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from conv2former.engine.cli import add_train_arguments, resolve_config
from conv2former.errors import exit_on_user_error

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrain", "configs")


def configure(argv=None):
    """(args, the resolved TrainConfig) of this command line: what main() trains (tests/test_recipe.py reads it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    # per variant: variants/<v>.yaml (the demo's CPU sizes)
    cfg = resolve_config(args, [os.path.join(CONFIGS, "pretrain_22k.yaml")], os.path.join(CONFIGS, "variants"))
    return args, cfg


@exit_on_user_error
def main(argv=None) -> int:
    args, cfg = configure(argv)
    if args.plan_memory:
        from conv2former.engine.memory_plan import plan_memory_report

        print(json.dumps(plan_memory_report(cfg, args.ranks or 1, args.gpu_memory), indent=1))
        return 0
    from conv2former.engine.trainer import train

    result = train(cfg, dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps(result, indent=1))
    # 0: finished, dry run, or stopped by a signal after a checkpoint (the requeued job resumes); 3-6: a fault, whose
    # one line rank 0 printed (docs/training.md "When things go wrong")
    return int(result.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
