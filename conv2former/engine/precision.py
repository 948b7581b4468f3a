"""Training precision: ``deepspeed.precision`` resolved for the device and turned into DeepSpeed's config.

``auto`` is bf16 on a GPU and fp32 on a CPU; bf16 and fp16 may be asked for on either wherever DeepSpeed's
accelerator supports them (its CPU accelerator: bf16 always, fp16 only on processors with AVX-512 FP16 / AMX-FP16).
DeepSpeed keeps fp32 master weights and optimizer state under bf16 and fp16; with ZeRO 1-3 gradients are also
accumulated over micro-batches in fp32 (``deepspeed.grad_accum_dtype``: DeepSpeed's own default is the training
dtype, which it warns is numerically unsafe over many micro-batches). fp16 uses DeepSpeed's dynamic loss scaling: a
step whose gradients overflow is skipped and the scale halved (``engine.skipped_steps``). The stem BatchNorm stays
fp32 under both (conv2former/model.py ``BatchNorm2dFP32``), and so does the EMA (conv2former/engine/ema.py).
"""

from __future__ import annotations

from typing import Any, Dict, TypeVar

import torch

from conv2former.config import DeepSpeedConfig
from conv2former.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMM_DTYPES = ("fp32", "bf16", "fp16")


Module = TypeVar("Module", bound=torch.nn.Module)


def cast_like_engine(model: Module, dtype: torch.dtype) -> Module:
    """``model`` (in place) as DeepSpeed's bf16/fp16 modes train it: floating parameters in ``dtype``, every buffer as
    it is (deepspeed/runtime/engine.py casts parameters only), so the stem BatchNorm's running statistics stay fp32.
    ``model.to(torch.bfloat16)`` casts the statistics too, and the fp32 BatchNorm then fails ("expected scalar type
    Float but found BFloat16"). For anything that runs the model in a training precision outside the engine
    (benchmarks, GPU tests, the memory planner); the caller casts the inputs."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model


def resolve_precision(cfg: DeepSpeedConfig, gpu: bool) -> str:
    """``cfg.precision`` (validated by ``DeepSpeedConfig.validate``) for this device: "bf16", "fp16" or "fp32"; a
    one-line ``UserError`` for a precision this device cannot train in."""
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if gpu else "fp32")
    if precision != "fp32":
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
        if not supported:
            raise UserError(
                f"deepspeed.precision={precision}: DeepSpeed's {accelerator.device_name()} accelerator does not "
                f"support {precision} on this machine; use {'bf16' if precision == 'fp16' else 'fp32'} or fp32"
            )
    return precision


def precision_config(precision: str, cfg: DeepSpeedConfig) -> Dict[str, Any]:
    """The precision part of DeepSpeed's config for a resolved ``precision``."""
    out: Dict[str, Any] = {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.fp16_initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    }
    # fp32 accumulation of bf16/fp16 gradients: DeepSpeed implements it with ZeRO (stage 0 accumulates in the model's
    # dtype, and rejects any other)
    if precision != "fp32" and cfg.grad_accum_dtype == "fp32" and cfg.zero_stage > 0:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.communication_data_type is not None:
        out["communication_data_type"] = cfg.communication_data_type
    return out
