"""Training-step throughput (forward + backward + optimizer step) of a Conv2Former variant next to timm's ConvNeXt.

    python benchmarks/model_speed.py --variant conv2former_t --baseline convnext_tiny --resolution 224 --batch 8
    python benchmarks/model_speed.py --variant conv2former_l --baseline convnext_large --batch 64 --compile   # GPU

CPU: fp32, NCHW and channels_last, plus our model with the plain ``nn.Conv2d`` depthwise backward
(``fast_depthwise=False``) so the gain of the CPU depthwise tuner (conv2former/cpu) is measured in the same run.
GPU: bf16 autocast, channels_last, cuDNN benchmark mode; MFU = images/s x 6 x MACs / the GPU's bf16 dense peak (an
architecture comparison: the engine's own step, DeepSpeed bf16 + ZeRO, is measured by train_speed.py).
``--grad-checkpointing`` and ``--compile`` apply to both models. All models run in one process, alternating round
by round, so the ratio is fair. On CPU the process keeps freed memory for reuse, as training does
(conv2former/cpu/malloc.py; ``--system-malloc`` measures glibc's default instead). ``--record`` adds the rows to
benchmarks/results/model_speed.jsonl; ``--json`` prints one line each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from results import machine, machine_info, record, versions

import conv2former  # noqa: F401  (registers the variants)
from conv2former import depthwise
from conv2former.complexity import count_gmacs
from conv2former.config import CpuConfig
from conv2former.cpu import CpuTuning
from conv2former.cpu.malloc import freed_memory_kept
from conv2former.engine.precision import cast_like_engine
from conv2former.gpu_depthwise import GpuDepthwise

# bf16 dense tensor-core peak (FLOP/s, no sparsity) by device-name fragment, from NVIDIA's data sheets.
BF16_PEAK = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def bf16_peak(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def step_fn(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, bf16: bool
) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
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


def measure(
    models: Dict[str, Tuple[str, dict]], args: argparse.Namespace, device: torch.device, channels_last: bool
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Best-of-rounds images/s and peak memory (MB, GPU only) per entry of ``models`` (label -> (timm name, kwargs))."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    steps, memory, choosers = {}, {}, {}
    for label, (name, kwargs) in models.items():
        kwargs = dict(kwargs)
        depthwise_mode = kwargs.pop("gpu_depthwise", None)  # bf16 weights (as DeepSpeed trains), this chooser
        model = timm.create_model(name, num_classes=1000, **kwargs).to(device).train().to(memory_format=fmt)
        model.set_grad_checkpointing(args.grad_checkpointing)
        x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device).to(memory_format=fmt)
        if depthwise_mode is not None:
            model, x = cast_like_engine(model, torch.bfloat16), x.to(torch.bfloat16)
            choosers[label] = GpuDepthwise(depthwise_mode)
        if args.compile:
            model = torch.compile(model)
        y = torch.randint(0, 1000, (args.batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        steps[label] = step_fn(model, x, y, opt, device.type == "cuda" and depthwise_mode is None)
    seconds: Dict[str, List[float]] = {label: [] for label in models}
    for _ in range(args.rounds):  # alternate the models so all see the same machine state
        for label in models:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            previous = depthwise.use_chooser(choosers[label]) if label in choosers else None
            try:
                seconds[label].append(time_steps(steps[label], device, args.warmup, args.iters))
            finally:
                if label in choosers:
                    depthwise.use_chooser(previous)
            if device.type == "cuda":
                memory[label] = max(memory.get(label, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    return {label: args.batch / min(times) for label, times in seconds.items()}, memory


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
    parser.add_argument("--memory-format", choices=["nchw", "channels_last", "both"])
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations (both models)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--no-plain-depthwise",
        action="store_true",
        help="skip the extra CPU run of our model with the plain nn.Conv2d depthwise backward",
    )
    parser.add_argument("--flush-denormal", action="store_true", help="flush denormal floats to zero on CPU")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (by default freed memory is kept for reuse on CPU, as training does)",
    )
    parser.add_argument(
        "--gpu-depthwise",
        action="store_true",
        help="also our model with bf16 weights (as DeepSpeed trains) with PyTorch's depthwise convolutions and "
        "with the measured choice among cuDNN, native and Triton (gpu.depthwise=measure; on CPU both rows compute "
        "PyTorch's way: a rehearsal of the GPU rows)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line per measured model")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    if args.variant not in timm.list_models("conv2former_*"):
        parser.error(f"unknown variant {args.variant!r}; choose from {', '.join(timm.list_models('conv2former_*'))}")
    if args.baseline not in timm.list_models():
        parser.error(f"unknown baseline {args.baseline!r}: give a timm model name such as convnext_tiny")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    if device.type == "cpu":  # as training does: the depthwise tuner and (unless --system-malloc) kept memory
        CpuTuning.install(CpuConfig(keep_freed_memory=not args.system_malloc))
    system_malloc = device.type == "cpu" and not freed_memory_kept()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = args.memory_format or ("channels_last" if device.type == "cuda" else "both")
    formats = {"nchw": [False], "channels_last": [True], "both": [False, True]}[memory_format]
    precision = "bf16" if device.type == "cuda" else "fp32"
    with torch.device("meta"):
        macs = {n: count_gmacs(timm.create_model(n), args.resolution) for n in (args.variant, args.baseline)}
    peak = bf16_peak(device)

    models: Dict[str, Tuple[str, dict]] = {args.variant: (args.variant, {})}
    if device.type == "cpu" and not args.no_plain_depthwise:
        models[f"{args.variant}, plain depthwise"] = (args.variant, {"fast_depthwise": False})
    if args.gpu_depthwise:  # on CPU a rehearsal of the GPU rows (the chooser picks only on CUDA: PyTorch's own here)
        models[f"{args.variant}, bf16 weights"] = (args.variant, {"gpu_depthwise": "plain"})
        models[f"{args.variant}, bf16 weights, depthwise measured"] = (args.variant, {"gpu_depthwise": "measure"})
    models[args.baseline] = (args.baseline, {})

    rows = []
    name = machine(torch.get_num_threads() if device.type == "cpu" else None)
    for channels_last in formats:
        try:
            ips, memory = measure(models, args, device, channels_last)
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(
                f"error: batch {args.batch} at {args.resolution} px does not fit in GPU memory; "
                "lower --batch or add --grad-checkpointing"
            ) from None
        setting = ", ".join(
            [precision, "channels_last" if channels_last else "NCHW"]
            + (["grad ckpt"] if args.grad_checkpointing else [])
            + (["compiled"] if args.compile else [])
            + (["FTZ"] if args.flush_denormal else [])
            + (["system malloc"] if system_malloc else [])
        )
        base = ips[args.baseline]
        for label in models:
            if label == args.baseline:
                continue
            timm_name = models[label][0]
            mfu = ips[label] * 6 * macs[timm_name] * 1e9 / peak if peak else None
            base_mfu = base * 6 * macs[args.baseline] * 1e9 / peak if peak else None
            mem = f"{memory[label]:.0f} / {memory[args.baseline]:.0f}" if memory else "—"
            rows.append(
                f"| {datetime.date.today()} | {name} | {label} ({macs[timm_name]:.2f} GMACs) | "
                f"{args.baseline} ({macs[args.baseline]:.2f} GMACs) | {args.resolution} | {args.batch} | {setting} | "
                f"{ips[label]:.1f} | {base:.1f} | {ips[label] / base:.2f}× | "
                f"{f'{mfu:.1%} / {base_mfu:.1%}' if mfu else '—'} | {mem} | {versions('torch', 'timm')} |"
            )
            if args.json:
                print(
                    json.dumps(
                        dict(
                            model=label,
                            machine=machine_info(torch.get_num_threads() if device.type == "cpu" else None),
                            baseline=args.baseline,
                            setting=setting,
                            resolution=args.resolution,
                            batch=args.batch,
                            images_per_s=round(ips[label], 2),
                            baseline_images_per_s=round(base, 2),
                            ratio=round(ips[label] / base, 3),
                            mfu=mfu,
                            baseline_mfu=base_mfu,
                            memory_mb=memory.get(label),
                        )
                    )
                )
            else:
                print(
                    f"{setting:>24}: {label} {ips[label]:.1f} img/s, {args.baseline} {base:.1f} img/s, "
                    f"ratio {ips[label] / base:.2f}" + (f", MFU {mfu:.1%} (baseline {base_mfu:.1%})" if mfu else "")
                )
    if args.record:
        record("model_speed.py", rows)


if __name__ == "__main__":
    main()
