"""The memory planner's table for Conv2Former-L (docs/training.md "Which micro-batch fits"): per rank, at 224 px
(22k pretraining, 21,841 classes, 128 ranks) and 384 px (1k fine-tuning, 1,000 classes, 32 ranks), bf16, ZeRO-1, with
and without activation checkpointing, and the largest micro-batch that fits a 40, 80 and 141 GB GPU.

    python benchmarks/memory_table.py [--record]

Activations are measured on the real model with fake tensors (conv2former/engine/memory_plan.py); no GPU needed.
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any, Dict, List

from conv2former.checkout import checkout_first

REPO = checkout_first(__file__)
from results import machine, record, versions  # noqa: E402  (benchmarks/results.py)

from conv2former.config import TrainConfig  # noqa: E402
from conv2former.engine.memory_plan import GiB, plan_memory  # noqa: E402

GPUS_GB = (40, 80, 141)
CASES = [  # (what, image size, classes, ranks, EMA)
    ("22k pretraining", 224, 21841, 128, False),
    ("1k fine-tuning", 384, 1000, 32, True),
]


def rows() -> List[Dict[str, Any]]:
    out = []
    for what, size, classes, ranks, ema in CASES:
        for checkpointing in (False, True):
            cfg = TrainConfig()
            cfg.model.variant, cfg.data.image_size, cfg.ema = "conv2former_l", size, ema
            cfg.model.grad_checkpointing, cfg.deepspeed.zero_stage = checkpointing, 1
            start = time.perf_counter()
            plan = plan_memory(cfg, classes, ranks, "bf16")
            out.append({
                "what": what, "image_size": size, "ranks": ranks, "grad_checkpointing": checkpointing,
                "state_gib": round(sum(plan.state_bytes.values()) / GiB, 2),
                "activation_gib_fixed": round(plan.activation_fixed / GiB, 2),
                "activation_gib_per_sample": round(plan.activation_per_sample / GiB, 4),
                **{f"fits_{gb}gb": plan.largest_fitting(gb * GiB) for gb in GPUS_GB},
                "plan_seconds": round(time.perf_counter() - start, 1),
            })  # fmt: skip
    return out


COLUMNS = ["date", "machine", "stage", "px", "act. ckpt", "state GiB", "activations GiB fixed",
           "activations GiB/sample", "fits 40 GB", "fits 80 GB", "fits 141 GB", "versions"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/memory_table.jsonl")
    args = parser.parse_args()
    lines = []
    for r in rows():
        ckpt = "on" if r["grad_checkpointing"] else "off"
        lines.append(
            f"| {datetime.date.today().isoformat()} | {machine()} | {r['what']} | {r['image_size']} | {ckpt} | "
            f"{r['state_gib']} | {r['activation_gib_fixed']} | {r['activation_gib_per_sample']} | {r['fits_40gb']} | "
            f"{r['fits_80gb']} | {r['fits_141gb']} | {versions('torch', 'timm')} |"
        )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    print("\n".join(lines))
    if args.record:
        record("memory_table.py", lines, columns=COLUMNS)


if __name__ == "__main__":
    main()
