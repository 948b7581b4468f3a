"""Where the time of one training step goes: the top operators/kernels of a Conv2Former step under torch.profiler.

    python benchmarks/profile_step.py --variant conv2former_l --batch 4 [--plain-depthwise] [--top 8] [--record]
    python benchmarks/profile_step.py --variant conv2former_l --batch 64 --compile --trace runs/profile   # GPU

One step = forward, backward and AdamW step, after warm-up steps; fp32 on CPU, bf16 autocast + channels_last on GPU.
Ranks operators by self time (CPU time on CPU, CUDA kernel time on GPU) and prints the top ones with their share
of the step. ``--plain-depthwise`` profiles the model with the plain nn.Conv2d depthwise backward (what
conv2former/cpu tunes on CPU). On CPU freed memory is kept for reuse, as training does
(``--system-malloc``: glibc's default). ``--trace DIR`` also writes a Chrome/TensorBoard trace.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import timm
import torch
from model_speed import step_fn
from results import machine, record, versions
from torch.profiler import ProfilerActivity, profile

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import CpuConfig
from conv2former.cpu import CpuTuning
from conv2former.cpu.malloc import freed_memory_kept


def describe(event) -> str:
    """The operator's name; for convolutions also the kind and the activation shape, e.g. 'depthwise 11x11'."""
    shapes = [s for s in (event.input_shapes or []) if s]
    if "conv" in event.key and len(shapes) >= 2:
        weight = shapes[2] if "backward" in event.key and len(shapes) > 2 else shapes[1]
        act = shapes[1] if "backward" in event.key else shapes[0]
        if len(weight) == 4 and len(act) == 4:
            kind = "depthwise" if weight[1] == 1 and weight[0] == act[1] else "conv"
            return f"{event.key} {kind} {weight[2]}x{weight[3]} on {act[1]}x{act[2]}x{act[3]}"
    return event.key


def kind(event) -> str:
    """The family an operator belongs to, for the per-kind totals: pointwise (1x1) convolutions and matrix products,
    depthwise and dense k x k convolutions, normalization, activation, optimizer, everything else."""
    name, text = event.key, describe(event)
    if "conv" in name:
        if " depthwise " in text:
            return "depthwise conv (k x k, incl. their gradients)"
        return "1x1 conv / matmul" if " conv 1x1 " in text else "dense conv (stem, downsampling)"
    if any(op in name for op in ("addmm", "aten::mm", "bmm", "matmul", "linear")):
        return "1x1 conv / matmul"
    if "norm" in name:
        return "normalization"
    if "gelu" in name:
        return "activation (GELU)"
    if "foreach" in name or "adam" in name.lower() or "lerp" in name or "addcdiv" in name:
        return "optimizer"
    return "elementwise, copies, other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="conv2former_l")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--plain-depthwise", action="store_true", help="fast_depthwise=False (plain nn.Conv2d)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="channels_last on CPU too (always on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc as it is (CPU)")
    parser.add_argument("--trace", type=Path, help="also write a trace viewable in TensorBoard / chrome://tracing")
    parser.add_argument("--record", action="store_true", help="add the top operators to benchmarks/results/")
    args = parser.parse_args()
    if args.variant not in timm.list_models():
        parser.error(
            f"unknown model {args.variant!r}: a Conv2Former variant ({', '.join(timm.list_models('conv2former_*'))}) "
            "or any timm model, e.g. convnext_tiny"
        )
    if args.plain_depthwise and not args.variant.startswith("conv2former"):
        parser.error("--plain-depthwise applies to Conv2Former variants only")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if gpu or args.channels_last else torch.contiguous_format
    if not gpu:  # as training does: the depthwise tuner and (unless --system-malloc) kept memory
        CpuTuning.install(CpuConfig(keep_freed_memory=not args.system_malloc))
    system_malloc = not gpu and not freed_memory_kept()
    kwargs = {"fast_depthwise": False} if args.plain_depthwise else {}
    model = timm.create_model(args.variant, **kwargs).to(device).train().to(memory_format=fmt)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    step = step_fn(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-4), bf16=gpu)
    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        if gpu:
            torch.cuda.synchronize()
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace / f"{args.variant}_step.json"))

    events = prof.key_averages(group_by_input_shape=True)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
    setting = ", ".join(
        ["bf16, channels_last" if gpu else ("fp32, channels_last" if args.channels_last else "fp32, NCHW")]
        + (["plain depthwise"] if args.plain_depthwise else [])
        + (["compiled"] if args.compile else [])
        + (["system malloc"] if system_malloc else [])
    )
    print(
        f"{args.variant} at {args.resolution}, batch {args.batch}, {setting}: "
        f"{total / 1e3:.1f} ms of self {'CUDA' if gpu else 'CPU'} time in one step"
    )
    rows = []
    for rank, event in enumerate(top, 1):
        ms = getattr(event, key) / 1e3
        name = describe(event)
        print(f"{rank:>3}. {name:<64} {ms:>9.1f} ms {ms * 1e3 / total:>6.1%}  ({event.count} calls)")
        rows.append(
            f"| {datetime.date.today()} | {machine(torch.get_num_threads() if not gpu else None)} | "
            f"{args.variant} {args.resolution}px batch {args.batch} | {setting} | {total / 1e3:.0f} | {rank} | "
            f"`{name}` | {event.count} | {ms:.1f} | {ms * 1e3 / total:.1%} | {versions('torch')} |"
        )
    kinds: dict = {}
    for event in events:
        kinds[kind(event)] = kinds.get(kind(event), 0.0) + getattr(event, key) / 1e3
    print("by kind:")
    for name, ms in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"     {name:<64} {ms:>9.1f} ms {ms * 1e3 / total:>6.1%}")
        rows.append(
            f"| {datetime.date.today()} | {machine(torch.get_num_threads() if not gpu else None)} | "
            f"{args.variant} {args.resolution}px batch {args.batch} | {setting} | {total / 1e3:.0f} | all | "
            f"{name} | — | {ms:.1f} | {ms * 1e3 / total:.1%} | {versions('torch')} |"
        )
    if args.record:
        record("profile_step.py", rows)


if __name__ == "__main__":
    main()
