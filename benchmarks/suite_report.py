"""The report of benchmarks/gpu_suite.sh: tables from its results.jsonl and the projected cost of a full pretraining.

    python benchmarks/suite_report.py runs/gpu_suite/DATE/results.jsonl [--output report.md] [--gpus 8 64 256]

Reads the JSON lines written by loader_speed.py, model_speed.py and train_speed.py (``--json``) and prints:
the data path (images/s per backend and the ratio to ImageFolder), the model next to its baseline (images/s, ratio,
MFU, memory), the end-to-end runs (images/s, data wait, MFU per ZeRO stage), and the projected wall time of
90 epochs of ImageNet-22k (docs/design.md: ~14.2M images) on 8/64/256 GPUs. The projection takes the best measured
end-to-end images/s per GPU (else the model-only rate, said so) and assumes linear scaling: it is the lower bound
on wall time, before inter-node gradient traffic; measure a multi-node run with launch/slurm to correct it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

IMAGENET_22K_IMAGES = 14_197_122  # fall11 release, all 21,841 classes
EPOCHS = 90


@dataclass
class Network:
    """What the projection assumes about the model and the cluster (command-line flags)."""

    params: float = 198.89e6  # Conv2Former-L
    grad_bytes_per_param: int = 2  # bf16 gradients
    global_batch: int = 4096  # the 22k recipe
    gpus_per_node: int = 8
    intra_node_gbs: float = 300.0  # NVLink, effective all-reduce bus bandwidth per GPU (GB/s)
    inter_node_gbps: float = 400.0  # one 400 Gb/s NIC per GPU (InfiniBand NDR)


def load(path: Path) -> List[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; give the results.jsonl written by benchmarks/gpu_suite.sh")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SystemExit(f"error: {path}:{number} is not a JSON line ({err.msg}); was the suite cut off?")
    return rows


def pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1%}"


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def per_gpu_rate(results: List[dict]) -> Tuple[Optional[float], str]:
    """The best measured images/s per GPU for the projection, and where it came from."""
    train = [r for r in results if "stage" in r and r.get("image_size") == 224]
    if train:
        best = max(train, key=lambda r: r["images_per_s"] / r["ranks"])
        return best["images_per_s"] / best["ranks"], (
            f"end to end (DALI + engine), ZeRO-{best['stage']}, {best['ranks']} rank(s), conv2former_{best['variant']}"
        )
    model = [r for r in results if "model" in r and r.get("resolution") == 224 and "plain depthwise" not in r["model"]]
    if model:
        best = max(model, key=lambda r: r["images_per_s"])
        return best["images_per_s"], f"model only (synthetic input), {best['model']}, {best['setting']}"
    return None, "no 224 training measurement"


def report(results: List[dict], gpus: List[int], net: Optional[Network] = None) -> str:
    net = net or Network()
    out: List[str] = ["# Benchmark suite report", ""]
    loaders = [r for r in results if "backend" in r]
    if loaders:
        out += ["## Data path (images/s)", ""]
        rows = []
        for r in loaders:
            base = next(
                (
                    b["images_per_s"]
                    for b in loaders
                    if b["backend"] == "imagefolder" and b["mode"] == r["mode"] and b.get("suite") == r.get("suite")
                ),
                None,
            )
            rows.append(
                [
                    r["backend"],
                    r["mode"],
                    str(r.get("image_size", "")),
                    str(r.get("batch", "")),
                    str(r.get("workers", "")),
                    f"{r['images_per_s']:.0f}",
                    f"{r['images_per_s'] / base:.2f}×" if base else "—",
                ]
            )
        out += table(["backend", "mode", "size", "batch", "workers", "images/s", "vs ImageFolder"], rows) + [""]
    models = [r for r in results if "model" in r]
    if models:
        out += ["## Model training step (synthetic input)", ""]
        rows = [
            [
                r["model"],
                r["baseline"],
                str(r["resolution"]),
                str(r["batch"]),
                r["setting"],
                f"{r['images_per_s']:.1f}",
                f"{r['baseline_images_per_s']:.1f}",
                f"{r['ratio']:.2f}×",
                pct(r.get("mfu")),
                pct(r.get("baseline_mfu")),
                "—" if r.get("memory_mb") is None else f"{r['memory_mb']:.0f}",
            ]
            for r in models
        ]
        out += table(
            [
                "ours",
                "baseline",
                "res",
                "batch",
                "setting",
                "ours img/s",
                "baseline img/s",
                "ratio",
                "MFU",
                "baseline MFU",
                "peak MB",
            ],
            rows,
        ) + [""]
    train = [r for r in results if "stage" in r]
    if train:
        out += ["## End to end: loader feeding the engine", ""]
        rows = [
            [
                f"conv2former_{r['variant']}",
                str(r["image_size"]),
                str(r["ranks"]),
                str(r["stage"]),
                f"{r['images_per_s']:.0f}",
                f"{r['images_per_s'] / r['ranks']:.0f}",
                pct(r["data_wait"]),
                pct(r.get("mfu")),
                f"{r['memory_mb']:.0f}",
            ]
            for r in train
        ]
        out += table(
            ["model", "res", "ranks", "ZeRO", "images/s", "per GPU", "data wait", "MFU", "peak MB/rank"], rows
        ) + [""]
    convs = [r for r in results if "depthwise_model" in r]
    if convs:
        out += ["## Depthwise convolutions: every CUDA candidate, the chosen one (gpu.depthwise=measure)", ""]
        rows = [
            [r["depthwise_model"], f"{r['kernel']}×{r['kernel']}", "×".join(map(str, r["shape"])), r["layout"],
             r["dtype"], ", ".join(r["chosen"]), f"{r['chosen_ms']:.3f}", f"{r['plain_ms']:.3f}",
             f"{r['plain_ms'] / r['chosen_ms']:.2f}×"]
            for r in convs
        ]  # fmt: skip
        header = ["model", "kernel", "input", "layout", "dtype", "chosen (fwd, grad in, grad w)", "chosen ms",
                  "PyTorch's own ms", "gain"]  # fmt: skip
        out += table(header, rows) + [""]
    resizing = [r for r in results if "time_vs_224" in r]
    if resizing:
        out += ["## Progressive resizing (the paper run's schedule: 60/20/20% of the epochs at 160/192/224 px)", ""]
        rows = [
            [f"conv2former_{r['variant']}", str(r["batch"]), *(str(r.get(f"img_s_{s}", "—")) for s in (160, 192, 224)),
             f"{r['pixels_vs_224']:.3f}", f"{r['time_vs_224']:.3f}", r["saving"]]
            for r in resizing
        ]  # fmt: skip
        header = ["model", "batch", "img/s 160", "img/s 192", "img/s 224", "pixels vs 224", "time vs 224", "saving"]
        out += table(header, rows) + [""]
    rate, source = per_gpu_rate(results)
    out += [f"## Projected wall time: {EPOCHS} epochs of ImageNet-22k ({IMAGENET_22K_IMAGES:,} images)", ""]
    if rate is None:
        out += ["No 224 training measurement in the results: nothing to project.", ""]
    else:
        out += projection(rate, source, gpus, net) + [""]
    return "\n".join(out)


def allreduce_seconds(grad_bytes: float, gpus: int, net: Network) -> float:
    """Ring all-reduce time of the gradients per optimizer step: 2 (N-1)/N x bytes over the slowest link per GPU."""
    if gpus <= 1:
        return 0.0
    bandwidth = net.intra_node_gbs if gpus <= net.gpus_per_node else net.inter_node_gbps / 8
    return 2 * (gpus - 1) / gpus * grad_bytes / (bandwidth * 1e9)


def projection(rate: float, source: str, gpus: List[int], net: Network) -> List[str]:
    """Wall time of the run at each GPU count: linear scaling, and with the gradient all-reduce of every optimizer
    step added (not overlapped with the backward pass) or hidden (fully overlapped)."""
    images = EPOCHS * IMAGENET_22K_IMAGES
    grad_bytes = net.params * net.grad_bytes_per_param
    rows = []
    for n in gpus:
        per_gpu = net.global_batch / n
        compute = per_gpu / rate
        comm = allreduce_seconds(grad_bytes, n, net)
        steps = images / net.global_batch
        hours = lambda step_s: steps * step_s / 3600  # noqa: E731
        rows.append(
            [
                str(n),
                f"{per_gpu:,.0f}",
                f"{compute * 1e3:,.1f}",
                f"{comm * 1e3:,.1f}",
                f"{hours(compute):,.1f}",
                f"{hours(max(compute, comm)):,.1f} – {hours(compute + comm):,.1f}",
                f"{compute / (compute + comm):.0%}",
                f"{n * hours(compute + comm):,.0f}",
            ]
        )
    return [
        f"From {rate:,.0f} images/s per GPU ({source}); global batch {net.global_batch} (one gradient all-reduce per "
        f"optimizer step, accumulation inside it); {net.params / 1e6:.1f}M parameters with "
        f"{net.grad_bytes_per_param}-byte gradients; ring all-reduce at {net.intra_node_gbs:g} GB/s per GPU within a "
        f'node of {net.gpus_per_node} and {net.inter_node_gbps:g} Gb/s per GPU across nodes. "with all-reduce" '
        "spans fully overlapped (DeepSpeed overlap_comm, on in our config) to not overlapped; efficiency = compute / (compute + "
        "all-reduce). Inputs, not measurements: check them against your cluster with a multi-node run.",
        "",
    ] + table(
        [
            "GPUs",
            "per-GPU batch",
            "compute ms/step",
            "all-reduce ms/step",
            "hours, linear",
            "hours with all-reduce",
            "efficiency, not overlapped",
            "GPU-hours, not overlapped",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--global-batch", type=int, default=Network.global_batch)
    parser.add_argument("--params", type=float, default=Network.params, help="model parameters (default: L)")
    parser.add_argument("--gpus-per-node", type=int, default=Network.gpus_per_node)
    parser.add_argument(
        "--intra-node-gbs",
        type=float,
        default=Network.intra_node_gbs,
        help="all-reduce bandwidth per GPU inside a node, GB/s",
    )
    parser.add_argument(
        "--inter-node-gbps",
        type=float,
        default=Network.inter_node_gbps,
        help="network bandwidth per GPU across nodes, Gb/s",
    )
    args = parser.parse_args()
    net = Network(
        params=args.params,
        global_batch=args.global_batch,
        gpus_per_node=args.gpus_per_node,
        intra_node_gbs=args.intra_node_gbs,
        inter_node_gbps=args.inter_node_gbps,
    )
    text = report(load(args.results), args.gpus, net)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
