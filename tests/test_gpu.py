"""The GPU path, run for real where a CUDA GPU is visible (skipped elsewhere, CI included).

One GPU, the real deepspeed launcher, bf16, DALI ``mixed`` decoding (the GPU default), channels_last batches,
EMA on: the demo model and Conv2Former-L, ZeRO 1 and 3, 30 steps, stopped at 15 and relaunched, which must end
bit for bit where the uninterrupted run ends (as on CPU), with an fp32 export that loads strictly.
`benchmarks/gpu_checklist.py` runs this file in stages (cheap tests first) with the dali-gpu loader tests and the GPU
benchmarks; ``C2F_MEASUREMENTS`` (a JSON-lines file) receives what the tests measure.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import run_pretrain

from conv2former.engine.distributed import python_path

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# variant -> (image size, micro batch = global batch on one GPU)
SETTINGS = {"demo": (64, 64), "l": (224, 32)}


def gpu_run(*args: str) -> dict:
    """One GPU, DeepSpeed picks its CUDA accelerator (the CPU one is what the test session sets)."""
    environ = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    environ.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONPATH=python_path(str(Path(__file__).resolve().parent.parent)),
    )
    return run_pretrain(*args, ranks=1, environ=environ)


def args_for(variant: str, stage: int, data: str, out: Path, backend: str = "dali-gpu") -> list[str]:
    size, batch = SETTINGS[variant]
    return [
        "--variant",
        variant,
        "--data",
        data,
        "--output",
        str(out),
        "--zero-stage",
        str(stage),
        "--image-size",
        str(size),
        "--max-steps",
        "30",
        "--save-every",
        "15",
        "--set",
        "ema=true",
        "--set",
        "deterministic=true",  # the bitwise comparison after stop + resume (cuDNN's benchmark search may differ)
        "--set",
        f"data.batch_size={batch}",
        "--set",
        f"schedule.global_batch={batch}",
        "--set",
        f"data.backend={backend}",
        "--set",
        "data.channels_last=true",
        "--set",
        "logging.print_every=5",
        "--set",
        "schedule.warmup_epochs=0.1",
    ]


def export_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "export" / "model.safetensors")


@pytest.mark.parametrize(
    "variant, stage, backend",
    [("demo", 1, "torch"), ("demo", 1, "dali"), ("demo", 3, "dali"), ("l", 1, "dali"), ("l", 3, "dali")],
    ids=lambda v: str(v),
)
def test_bf16_zero_run_stops_resumes_bitwise_and_exports(demo_shards, tmp_path, variant, stage, backend):
    """ids: demo-1-torch (the checklist's stage 4: no DALI needed), demo-1-dali (stage 5), the rest (stage 6)."""
    loader = "dali-gpu" if backend == "dali" else backend
    whole = gpu_run(*args_for(variant, stage, demo_shards, tmp_path / "whole", loader))
    assert whole["step"] == 30 and math.isfinite(whole["loss"]), whole
    resumed_args = args_for(variant, stage, demo_shards, tmp_path / "split", loader)
    first = gpu_run(*resumed_args, "--max-steps", "15")  # the later flag wins: stop at 15
    assert first["step"] == 15
    second = gpu_run(*resumed_args)
    assert second["step"] == 30
    a, b = export_tensors(tmp_path / "whole"), export_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float32 for t in a.values())  # the export is fp32 whatever the training precision
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ after stop + resume, e.g. {differing[:3]}"

    import timm

    import conv2former  # noqa: F401
    from conv2former.weights import load_checkpoint

    model = timm.create_model(f"conv2former_{variant}", num_classes=a["pred.weight"].shape[0])
    load_checkpoint(model, str(tmp_path / "whole" / "export" / "model.safetensors"))  # strict


def test_a_late_read_flag_waits_for_its_own_copy_not_for_the_work_queued_after_it():
    """engine/late_read.py on CUDA: the flag reaches pinned host memory behind a CUDA event; reading it waits for that
    event only, while a long kernel queued afterwards is still running (``.item()`` would have waited for it)."""
    import time

    from conv2former.engine.late_read import LateRead

    flag = torch.ones(1, device="cuda")
    late = LateRead(flag)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued after the flag's copy
    start = time.perf_counter()
    value = late.value()
    assert value.item() == 1.0 and value.device.type == "cpu" and value.is_pinned()
    assert time.perf_counter() - start < 0.3 and not torch.cuda.current_stream().query()
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype, channels_last", [(torch.bfloat16, True), (torch.float32, False)])
def test_every_cuda_depthwise_candidate_equals_conv2d(dtype, channels_last):
    """The CUDA candidates (cuDNN through F.conv2d, the channels_last copy, PyTorch's native kernel, the Triton
    kernels, ...) on Conv2Former-L's stage-3 shape at 224 px and an odd one: value and both gradients against an fp32
    F.conv2d of the same inputs, measured by the choosers' accuracy gate (conv2former/depthwise_gate.py: 2 ulps of
    the dtype). Only bf16 ``batch_groups`` may miss it (each sample's partial sum rounded to bf16: the defect the gate
    exists for), and whatever misses it the gate keeps from every chooser. The errors go to C2F_MEASUREMENTS."""
    import json

    from conv2former import depthwise, depthwise_gate

    device = torch.device("cuda")
    known_wrong = {("grad_weight", "batch_groups")} if dtype == torch.bfloat16 else set()
    limit = depthwise_gate.tolerance(dtype)
    for batch, channels, size, k in ((8, 768, 14, 11), (3, 40, 13, 7)):
        gen = torch.Generator(device=device).manual_seed(k)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = (
            torch.randn(batch, channels, size, size, device=device, generator=gen)
            .to(dtype)
            .contiguous(memory_format=fmt)
        )
        w = torch.randn(channels, 1, k, k, device=device, generator=gen).to(dtype) / k
        b = torch.randn(channels, device=device, generator=gen).to(dtype)
        g = torch.randn(x.shape, device=device, generator=gen).to(dtype).contiguous(memory_format=fmt)
        names = {part: list(depthwise.candidates(table, device)) for part, table in depthwise.PARTS}
        eligible, found = depthwise_gate.gate((x, w, b, g), names)
        wrong = {(part, name) for part, errors in found.items() for name, error in errors.items() if error > limit}
        assert wrong <= known_wrong, (found, batch, channels, size, k)
        assert all(name not in eligible[part] for part, name in wrong)
        if os.environ.get("C2F_MEASUREMENTS"):
            with open(os.environ["C2F_MEASUREMENTS"], "a") as f:
                row = {"depthwise_errors": f"{batch}x{channels}x{size}x{size} k{k}", "dtype": str(dtype)[6:],
                       "channels_last": channels_last, "errors": found}  # fmt: skip
                f.write(json.dumps(row) + "\n")


def test_triton_kernels_compile_in_seconds_each():
    """The first call of each Triton kernel (forward, input and weight gradients) at Conv2Former-L's kernel sizes and
    the MLP's 3x3, in bf16 channels_last: compiled, correct against fp32 F.conv2d (the accuracy gate), and timed (the
    compile time goes to C2F_MEASUREMENTS; Triton unrolls 121 taps at 11x11, the risk the checklist watches)."""
    import json
    import time

    from conv2former import depthwise_gate, triton_depthwise

    rows = []
    for k, channels, size in ((11, 192, 28), (3, 768, 14)):
        x = torch.randn(4, channels, size, size, device="cuda").to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(channels, 1, k, k, device="cuda") / k).to(torch.bfloat16)
        inputs = depthwise_gate.sample_inputs(x, w)
        want = depthwise_gate.reference(*inputs)
        for part in ("forward", "grad_input", "grad_weight"):
            args = (inputs[0], inputs[1], inputs[2]) if part == "forward" else (inputs[3], inputs[0], inputs[1])
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = getattr(triton_depthwise, part)(*args)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            error = depthwise_gate.part_error(got.float(), want[part])
            rows.append({"triton_compile": part, "kernel": k, "first_call_s": round(first, 2), "error": error})
            assert error <= depthwise_gate.tolerance(torch.bfloat16), rows[-1]
    print("\n".join(json.dumps(r) for r in rows))
    if os.environ.get("C2F_MEASUREMENTS"):
        with open(os.environ["C2F_MEASUREMENTS"], "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_the_gpu_chooser_measures_records_and_trains_through_its_choice():
    """gpu.depthwise=measure on Conv2Former-demo in bf16 channels_last: one choice per depthwise shape, each candidate
    timed; the layer's output equals plain F.conv2d's within bf16 rounding."""
    import timm

    import conv2former  # noqa: F401
    from conv2former import depthwise
    from conv2former.engine.precision import cast_like_engine
    from conv2former.gpu_depthwise import GpuDepthwise

    model = cast_like_engine(timm.create_model("conv2former_demo", num_classes=10).cuda(), torch.bfloat16)
    x = torch.randn(8, 3, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    plain = model(x).float()
    chooser = GpuDepthwise.install("measure")
    try:
        chosen = model(x).float()
        chosen.sum().backward()
    finally:
        chooser.uninstall()
    assert chooser.tuner is not None and len(chooser.tuner.choices) >= 4  # 4 stages x (k x k and 3x3 convs)
    assert all("triton" in chooser.tuner.timings[key]["forward"] for key in chooser.tuner.timings)
    assert (chosen - plain).abs().max().item() <= 0.05 * plain.abs().max().item()
    assert depthwise.use_chooser(None) is None
