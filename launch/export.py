#!/usr/bin/env python
"""Export a run's newest complete checkpoint: ``python launch/export.py RUN_DIR``.

Writes RUN_DIR/export/: model.safetensors (consolidated fp32, official key names, via DeepSpeed's zero_to_fp32 for
ZeRO 1-3 or the module states for stage 0), classes.txt, config.yaml, and model_ema.safetensors when the run kept an
EMA. Training does this by itself at the end; use this for a run that was stopped or preempted.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conv2former.errors import UserError, exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory holding checkpoints/")
    args = parser.parse_args(argv)
    import torch

    from conv2former.engine.checkpoint import COMPLETE, export, list_tags
    from conv2former.weights import read_weights

    ckpt_dir = os.path.join(args.run_dir, "checkpoints")
    tags = [t for t in list_tags(ckpt_dir) if os.path.exists(os.path.join(ckpt_dir, t, COMPLETE))]
    if not tags:
        raise UserError(f"{args.run_dir} holds no complete checkpoint under checkpoints/")
    tag_dir = os.path.join(ckpt_dir, tags[-1])
    weights = read_weights(tag_dir)
    states = [f for f in sorted(os.listdir(tag_dir)) if f.endswith("model_states.pt")]
    client = torch.load(os.path.join(tag_dir, states[0]), map_location="cpu", weights_only=True)
    out = export(args.run_dir, weights.state_dict, client.get("classes") or weights.classes or [],
                 client.get("config") or {}, client.get("ema"))
    print(f"exported {tags[-1]} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
