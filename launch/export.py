#!/usr/bin/env python
"""Export a run: ``python launch/export.py RUN_DIR [--onnx]``.

Writes RUN_DIR/export/ from the newest complete checkpoint: model.safetensors (consolidated fp32, official key
names, via DeepSpeed's zero_to_fp32 for ZeRO 1-3 or the module states for stage 0), classes.txt, config.yaml,
timm's config.json (so ``timm.create_model("local-dir:RUN_DIR/export", pretrained=True)`` loads it) and
model_ema.safetensors when the run kept an EMA. Training does this by itself at the end; use this for a run that was
stopped or preempted. A run whose checkpoints are gone but whose export/ holds config.yaml gets its config.json
(re)written.

``--onnx`` also writes export/model.onnx (batch dimension dynamic) and export/onnx.json, after running the ONNX
model with onnxruntime on real eval images of the run's data (``--data`` to point elsewhere) and comparing it with
PyTorch: the largest absolute difference of the logits is printed and recorded. Needs the ``onnx`` extra.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

from conv2former.errors import UserError, exit_on_user_error
from conv2former.export_run import export_from_checkpoint, export_onnx_checked, export_remote_run
from conv2former.process_exit import exit_process


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory holding checkpoints/ (or an export/ to complete)")
    parser.add_argument("--onnx", action="store_true", help="also write export/model.onnx, checked with onnxruntime")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--data", help="shard root for the ONNX check (default: the run's own data root)")
    parser.add_argument("--split", default="val", help="split whose first images check the ONNX model")
    parser.add_argument("--images", type=int, default=32, help="how many eval images check the ONNX model")
    parser.add_argument("--staging-dir", help="a remote run (s3://...): the local folder it is brought into")
    args = parser.parse_args(argv)
    from conv2former.data.remote import is_remote

    onnx: Optional[Dict[str, Any]] = None
    if args.onnx:
        onnx = {"data": args.data, "split": args.split, "images": args.images, "opset": args.opset}
    if is_remote(args.run_dir):
        export_remote_run(args.run_dir, args.staging_dir, onnx)
        return 0
    if not os.path.isdir(args.run_dir):
        raise UserError(f"run directory not found: {args.run_dir}")
    if args.images < 1:
        raise UserError(f"--images must be at least 1, got {args.images}")
    if args.onnx:
        from conv2former.export import require_onnx

        require_onnx()  # before anything is written
    export_dir = export_from_checkpoint(args.run_dir)
    if onnx is not None:
        export_onnx_checked(export_dir, **onnx)
    return 0


if __name__ == "__main__":
    exit_process(main())
