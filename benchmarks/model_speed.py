"""Training-step throughput (forward + backward + optimizer step) of a Conv2Former variant next to timm's ConvNeXt.

    python benchmarks/model_speed.py --variant conv2former_t --baseline convnext_tiny --resolution 224 --batch 8

CPU: fp32, NCHW and channels_last. GPU: bf16 autocast + channels_last (and ``--compile`` for torch.compile).
Both models run in the same process, alternating, so the ratio is fair. ``--record`` appends a row to
docs/PERFORMANCE.md with the date, machine, versions and command.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import timm
import torch

import conv2former  # noqa: F401  (registers the variants)
from conv2former.complexity import count_gmacs

PERFORMANCE_MD = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, bf16: bool):
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(names: List[str], args: argparse.Namespace, device: torch.device, channels_last: bool) -> Dict[str, float]:
    bf16 = device.type == "cuda"
    steps = {}
    for name in names:
        model = timm.create_model(name, num_classes=1000).to(device).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        if args.compile:
            model = torch.compile(model)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).to(memory_format=fmt)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps[name] = step_fn(model, x, y, opt, bf16)
    seconds: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(args.rounds):  # alternate the models so both see the same machine state
        for name in names:
            seconds[name].append(time_steps(steps[name], device, args.warmup, args.iters))
    return {name: args.batch / min(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="conv2former_t")
    parser.add_argument("--baseline", default="convnext_tiny")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-format", choices=["nchw", "channels_last", "both"], default="both")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="flush denormal floats to zero on CPU (layer scales of 1e-6 make tiny gradients early on)")
    parser.add_argument("--record", action="store_true", help="append the rows to docs/PERFORMANCE.md")
    args = parser.parse_args()
    if args.variant not in timm.list_models("conv2former_*"):
        parser.error(f"unknown variant {args.variant!r}; choose from {', '.join(timm.list_models('conv2former_*'))}")
    device = torch.device(args.device)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    formats = {"nchw": [False], "channels_last": [True], "both": [False, True]}[args.memory_format]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = "bf16" if device.type == "cuda" else "fp32"
    with torch.device("meta"):
        macs = {n: count_gmacs(timm.create_model(n), args.resolution) for n in (args.variant, args.baseline)}
    rows = []
    for channels_last in formats:
        ips = measure([args.variant, args.baseline], args, device, channels_last)
        ratio = ips[args.variant] / ips[args.baseline]
        fmt = "channels_last" if channels_last else "NCHW"
        row = (f"| {datetime.date.today()} | {device_name(device)} | {args.variant} ({macs[args.variant]:.2f} GMACs) | "
               f"{args.baseline} ({macs[args.baseline]:.2f} GMACs) | {args.resolution} | {args.batch} | {precision}, {fmt}"
               f"{', compiled' if args.compile else ''}{', FTZ' if args.flush_denormal else ''} | {ips[args.variant]:.1f} | {ips[args.baseline]:.1f} | "
               f"{ratio:.2f}× | torch {torch.__version__}, timm {timm.__version__} |")
        rows.append(row)
        print(f"{fmt:>13}: {args.variant} {ips[args.variant]:.1f} img/s, {args.baseline} {ips[args.baseline]:.1f} img/s, "
              f"ratio {ratio:.2f}")
    if args.record:
        command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        with open(PERFORMANCE_MD, "a") as f:
            for row in rows:
                f.write(row[:-1] + f"| `{command}` |\n")
        print(f"recorded {len(rows)} row(s) in {PERFORMANCE_MD}")


if __name__ == "__main__":
    main()
