"""Parameter and MAC counts of the Conv2Former variants, measured, next to the paper's figures.

MACs are measured with ``torch.utils.flop_counter`` (which counts 2 FLOPs per multiply-add of convolutions and
matrix products, nothing for element-wise ops) and halved, the convention of the paper's "FLOPs" column.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from conv2former.model import PAPER_FIGURES, VARIANTS

__all__ = ["count_params", "count_gmacs", "table_rows", "format_table"]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, resolution: int) -> float:
    """Multiply-accumulates (in units of 1e9) of one forward pass of one ``resolution``² image."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # a model built on the "meta" device is counted without computing
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, resolution, resolution, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def table_rows(variants: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    rows = []
    for name in variants or list(VARIANTS):
        with torch.device("meta"):
            model = timm.create_model(name)
        paper_params, paper_224, paper_384 = PAPER_FIGURES.get(name, (None, None, None))
        rows.append(
            dict(
                variant=name,
                params_m=count_params(model) / 1e6,
                gmacs_224=count_gmacs(model, 224),
                gmacs_384=count_gmacs(model, 384),
                paper_params_m=paper_params,
                paper_gmacs_224=paper_224,
                paper_gmacs_384=paper_384,
            )
        )
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    def fig(value: object, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    lines = [
        "| variant | params (M) | paper | GMACs 224 | paper | GMACs 384 | paper |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['params_m']:.2f} | {fig(r['paper_params_m'], 'g')} | {r['gmacs_224']:.2f} | "
            f"{fig(r['paper_gmacs_224'], 'g')} | {r['gmacs_384']:.2f} | {fig(r['paper_gmacs_384'], 'g')} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and MACs of every Conv2Former variant vs. the paper.")
    parser.add_argument("--table", action="store_true", help="print the table (the default action)")
    parser.add_argument("--variants", nargs="*", help=f"subset of: {' '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants or [] if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    print("Conv2Former variants, 1000 classes; MACs = multiply-adds of conv/linear (torch.utils.flop_counter / 2)")
    print(format_table(table_rows(args.variants)))


if __name__ == "__main__":
    main()
