"""The GPU path, run for real where a CUDA GPU is visible (skipped elsewhere, CI included).

One GPU, the real deepspeed launcher, bf16, DALI ``mixed`` decoding (the GPU default), channels_last batches,
EMA on: the demo model and Conv2Former-L, ZeRO 1 and 3, 30 steps, stopped at 15 and relaunched, which must end
bit for bit where the uninterrupted run ends (as on CPU), with an fp32 export that loads strictly.
`benchmarks/gpu_checklist.sh` runs this file together with the dali-gpu loader tests and the GPU benchmarks.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import run_pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

# variant -> (image size, micro batch = global batch on one GPU)
SETTINGS = {"demo": (64, 64), "l": (224, 32)}


def gpu_run(*args: str) -> dict:
    """One GPU, DeepSpeed picks its CUDA accelerator (the CPU one is what the test session sets)."""
    environ = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    environ.update(
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    return run_pretrain(*args, ranks=1, environ=environ)


def args_for(variant: str, stage: int, data: str, out: Path) -> list[str]:
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
        "data.backend=dali-gpu",
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


@pytest.mark.parametrize("variant", ["demo", "l"])
@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_zero_run_stops_resumes_bitwise_and_exports(demo_shards, tmp_path, variant, stage):
    whole = gpu_run(*args_for(variant, stage, demo_shards, tmp_path / "whole"))
    assert whole["step"] == 30 and math.isfinite(whole["loss"]), whole
    resumed_args = args_for(variant, stage, demo_shards, tmp_path / "split")
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
