"""``--dry-run``: the derived schedule and the projected wall time, from one optimizer step timed on this device."""

from __future__ import annotations

import time
from typing import Any, Dict

import timm
import torch

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import TrainConfig
from conv2former.data.loader import build_loader, resolve_backend
from conv2former.data.shard_format import read_classes
from conv2former.engine.distributed import this_process
from conv2former.engine.memory_plan import resolve_auto_batch
from conv2former.engine.optim import Schedule, derive_schedule
from conv2former.engine.precision import DTYPES, resolve_precision


def measure_step_time(cfg: TrainConfig, num_classes: int, device: torch.device, schedule: Schedule) -> float:
    """Seconds of one optimizer step of this model on this device (3 warm-up, 3 timed; synthetic batches)."""
    model: Any = timm.create_model(cfg.model.variant, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate)
    model = model.to(device).train()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(schedule.micro_batch, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randint(0, num_classes, (schedule.micro_batch,), device=device)
    precision = resolve_precision(cfg.deepspeed, device.type == "cuda")

    def micro_step() -> None:
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()

    times = []
    for i in range(6):
        start = time.perf_counter()
        for _ in range(schedule.grad_accum):
            micro_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dry_run_report(cfg: TrainConfig) -> Dict[str, Any]:
    """What ``launch/pretrain.py --dry-run`` prints: the schedule, and the whole run's time at this step time."""
    process = this_process()
    rank, world_size, device = process.rank, process.world_size, process.device
    cfg.data.backend = resolve_backend(cfg.data.backend)
    precision = resolve_precision(cfg.deepspeed, device.type == "cuda")
    memory_plan = resolve_auto_batch(cfg, world_size, device.type == "cuda", precision)
    schedule = derive_schedule(cfg, world_size, len(build_loader(cfg.data, "train", rank, world_size, device)))
    classes = read_classes(cfg.data.root)
    step_s = measure_step_time(cfg, len(classes), device, schedule)
    return {
        "schedule": schedule.as_dict(),
        **({"memory_plan": memory_plan} if memory_plan is not None else {}),
        "classes": len(classes),
        "measured_step_seconds": round(step_s, 4),
        "projected_hours": round(step_s * schedule.total_steps / 3600, 2),
        "projection": f"{schedule.total_steps} steps x {step_s:.3f} s (forward+backward+AdamW of one "
        f"optimizer step on this device, {schedule.grad_accum} micro-batches of "
        f"{schedule.micro_batch}, synthetic data; communication not included)",
    }
