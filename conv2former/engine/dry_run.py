"""``--dry-run``: the derived schedule and the projected wall time, from one optimizer step timed on this device."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import timm
import torch
import torch.distributed as dist

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import TrainConfig
from conv2former.data.loader import build_loader, resolve_backend
from conv2former.data.shard_format import read_classes
from conv2former.data.size_schedule import SizeSchedule
from conv2former.engine.distributed import Process, join_group, this_process
from conv2former.engine.memory_plan import resolve_auto_batch
from conv2former.engine.optim import Schedule, build_optimizer, derive_schedule
from conv2former.engine.precision import DTYPES, resolve_precision


def measure_step_time(
    cfg: TrainConfig, num_classes: int, process: Process, schedule: Schedule, precision: str, sizes: List[int]
) -> Dict[int, float]:
    """Seconds of one optimizer step at each of ``sizes`` as the engine takes it (3 warm-up, 3 timed; synthetic
    batches): the same DeepSpeed engine and config (precision, ZeRO stage, fp32 accumulation, clipping), the model's
    parameters in the training dtype, channels_last batches where the run uses them, ``grad_accum`` micro-steps per
    step."""
    import deepspeed

    from conv2former.engine.trainer import deepspeed_config

    device = process.device
    if device.type == "cpu":  # the depthwise formulations and malloc policy the CPU engine installs
        from conv2former.cpu import CpuTuning

        CpuTuning.install(cfg.cpu)
    joined = not dist.is_initialized()
    if joined:
        join_group(process, cfg.deepspeed.timeout_minutes)
    model: Any = timm.create_model(cfg.model.variant, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate)
    model = model.to(device).train()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg, schedule.lr)
    config = deepspeed_config(cfg, schedule, precision)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dtype = DTYPES[precision]
    y = torch.randint(0, num_classes, (schedule.micro_batch,), device=device)
    seconds = {}
    for size in sizes:
        x = torch.randn(schedule.micro_batch, 3, size, size, device=device, dtype=dtype)
        if cfg.data.channels_last if cfg.data.channels_last is not None else device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        for i in range(6):
            start = time.perf_counter()
            for _ in range(schedule.grad_accum):
                loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
                engine.backward(loss)
                engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - start)
        seconds[size] = sorted(times)[len(times) // 2]
    engine.destroy()
    if joined:  # through DeepSpeed, which then drops the groups it cached (a later dry run in this process makes new)
        deepspeed.comm.destroy_process_group()
    return seconds


def dry_run_report(cfg: TrainConfig) -> Dict[str, Any]:
    """What ``launch/pretrain.py --dry-run`` prints: the schedule, and the whole run's time at this step time."""
    process = this_process()
    rank, world_size, device = process.rank, process.world_size, process.device
    cfg.data.backend = resolve_backend(cfg.data.backend)
    precision = resolve_precision(cfg.deepspeed, device.type == "cuda")
    memory_plan = resolve_auto_batch(cfg, world_size, device.type == "cuda", precision)
    schedule = derive_schedule(cfg, world_size, len(build_loader(cfg.data, "train", rank, world_size, device)))
    classes = read_classes(cfg.data.root)
    sizes = SizeSchedule.from_config(
        cfg.data.size_schedule, cfg.data.size_schedule_mode, cfg.schedule.epochs, cfg.data.image_size
    )
    seconds = measure_step_time(
        cfg, len(classes), process, schedule, precision, sorted(set(sizes.sizes() + [cfg.data.image_size]))
    )
    step_s = seconds[cfg.data.image_size]
    what = (
        f"one optimizer step of the DeepSpeed engine on this device: {precision}, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{schedule.grad_accum} micro-batches of {schedule.micro_batch}, synthetic data; data loading and "
        "communication between ranks not included"
    )
    report: Dict[str, Any] = {
        "schedule": schedule.as_dict(),
        **({"memory_plan": memory_plan} if memory_plan is not None else {}),
        "classes": len(classes),
        "measured_step_seconds": round(step_s, 4),
        "projected_hours": round(step_s * schedule.total_steps / 3600, 2),
        "projection": f"{schedule.total_steps} steps x {step_s:.3f} s ({what})",
    }
    if sizes.points:
        hours = _hours_with_sizes(sizes, seconds, schedule)
        report["size_schedule"] = {
            **sizes.as_dict(),
            "measured_step_seconds": {size: round(s, 4) for size, s in seconds.items()},
            "projected_hours": round(hours, 2),
            "projected_hours_at_final_size": report["projected_hours"],
            "saving": round(1 - hours / max(report["projected_hours"], 1e-9), 3),
        }
        report["projected_hours"] = round(hours, 2)
        report["projection"] = f"each epoch's steps x the step time at its size ({what})"
    return report


def _hours_with_sizes(sizes: SizeSchedule, seconds: Dict[int, float], schedule: Schedule) -> float:
    """The run's hours when epoch e's steps take the step time at its size (up to the run's stop step)."""
    total, left = 0.0, schedule.total_steps
    for size in sizes.epoch_sizes():
        steps = min(schedule.steps_per_epoch, left)
        total += steps * seconds[size]
        left -= steps
    return total / 3600
