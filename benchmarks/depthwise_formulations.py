"""Each depthwise formulation's time on every depthwise shape of a model, and what the tuner chooses.

    python benchmarks/depthwise_formulations.py --variant conv2former_t --batch 8 [--channels-last] [--record]
    python benchmarks/depthwise_formulations.py --variant conv2former_l --baseline convnext_large --device cuda \
        --dtype bf16 --batch 128 --resolution 224 --channels-last --json      # on a GPU: cuDNN, native, Triton, ...
    benchmarks/avx2.sh python benchmarks/depthwise_formulations.py --variant conv2former_t --record   # AVX2 paths

Finds the model's depthwise convolutions and their input shapes with one forward pass, then times every candidate of
every part (forward, grad input, grad weight; conv2former/depthwise.py) on each shape exactly as the tuner does in
"measure" mode, and prints the milliseconds and the choice. Also ConvNeXt's 7x7 depthwise for comparison
(``--baseline convnext_tiny``): its nn.Conv2d layers are timed with the same candidates.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Dict, List, Tuple

import timm
import torch
from results import machine, record, versions

import conv2former  # noqa: F401  (registers the variants)
from conv2former import depthwise as dw
from conv2former.cpu.depthwise_tuner import DepthwiseTuner
from conv2former.engine.precision import cast_like_engine


def depthwise_shapes(
    name: str,
    batch: int,
    resolution: int,
    channels_last: bool,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> List[Tuple[Tuple[int, ...], int, bool]]:
    """(input shape, kernel, channels_last) of each distinct depthwise convolution of timm model ``name``, in forward
    order. The layout is the one the layer meets inside the model: timm's LayerNorm2d hands on channels_last strides
    and the 1x1 convolution after it keeps them, so even a model fed NCHW images runs most layers channels_last."""
    model = cast_like_engine(timm.create_model(name).eval().to(device), dtype)  # the stem BatchNorm stays fp32
    found: Dict[Tuple[Tuple[int, ...], int, bool], None] = {}

    def hook(module, inputs):
        x = inputs[0]
        found[(tuple(x.shape), module.kernel_size[0], dw.shape_key(x, module.weight).split()[2] == "channels_last")] = (
            None
        )

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1:
            module.register_forward_pre_hook(hook)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():  # a real forward (no tuner installed: the layouts are the CPU kernels' own)
        model(torch.zeros(batch, 3, resolution, resolution, device=device, dtype=dtype).contiguous(memory_format=fmt))
    return list(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="conv2former_t")
    parser.add_argument("--baseline", default="convnext_tiny", help="a timm model whose depthwise layers to time too")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many timings per candidate")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", action="store_true", help="also print one JSON line per shape (the GPU suite's)")
    parser.add_argument("--record", action="store_true", help="add the rows to benchmarks/results/")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    for name in (args.variant, args.baseline):
        if name not in timm.list_models():
            parser.error(f"unknown model {name!r}: give a timm model name such as conv2former_t or convnext_tiny")
    images = "channels_last" if args.channels_last else "NCHW"
    rows, where = [], machine(torch.get_num_threads())
    for name in (args.variant, args.baseline):
        shapes = depthwise_shapes(name, args.batch, args.resolution, args.channels_last, device, dtype)
        for shape, k, channels_last in shapes:
            tuner = DepthwiseTuner("measure", rounds=args.rounds, device_type=device.type)
            layout = "channels_last" if channels_last else "NCHW"
            x = (
                torch.randn(shape, device=device)
                .to(dtype)
                .contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            )
            weight = (torch.randn(shape[1], 1, k, k, device=device) / k).to(dtype)  # the gate checks real values
            choice = tuner(x, weight)
            times = tuner.timings[dw.shape_key(x, weight)]
            plain = sum(part[ref] for part, ref in zip(times.values(), dw.PLAIN))
            chosen = sum(part[c] for part, c in zip(times.values(), choice))
            cells = [" / ".join(f"{n} {ms:.2f}" for n, ms in part.items()) for part in times.values()]
            print(f"{name} {k}x{k} on {'x'.join(map(str, shape))} {layout} ({images} images): " + "; ".join(cells))
            print(f"    chosen {', '.join(choice)}: {chosen:.2f} ms vs PyTorch's own {plain:.2f} ms")
            if dw.shape_key(x, weight) in tuner.rejected:
                print(f"    rejected by the accuracy gate: {tuner.rejected[dw.shape_key(x, weight)]}")
            if args.json:
                print(json.dumps({"depthwise_model": name, "kernel": k, "shape": list(shape), "layout": layout,
                                  "dtype": args.dtype, "times_ms": times, "chosen": list(choice),
                                  "chosen_ms": round(chosen, 3), "plain_ms": round(plain, 3),
                                  "rejected": tuner.rejected.get(dw.shape_key(x, weight), "")}))  # fmt: skip
            rows.append(
                f"| {datetime.date.today()} | {where} | {name} | {k}×{k} on {'×'.join(map(str, shape))} | {layout} ({images} images) | "
                + " | ".join(cells)
                + f" | {', '.join(choice)} | {chosen:.2f} | {plain:.2f} | {plain / chosen:.1f}× | {versions('torch')} |"
            )
    if args.record:
        columns = ["date", "device", "model", "layer", "layout", "forward ms", "grad input ms", "grad weight ms",
                   "chosen", "chosen ms", "PyTorch's own ms", "gain", "versions"]  # fmt: skip
        record("depthwise_formulations.py", rows, columns=columns)


if __name__ == "__main__":
    main()
