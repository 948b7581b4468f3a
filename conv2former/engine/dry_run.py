"""``--dry-run``: the derived schedule and the projected wall time, from one optimizer step timed on this device."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from conv2former.config import TrainConfig
from conv2former.data.size_schedule import SizeSchedule
from conv2former.engine.build import build_engine, build_model, build_train_data
from conv2former.engine.depthwise_choice import DepthwiseChoice
from conv2former.engine.distributed import join_group, this_process
from conv2former.engine.optim import Schedule
from conv2former.engine.precision import DTYPES
from conv2former.engine.run import ResolvedRun, resolve_run


def measure_step_time(run: ResolvedRun, schedule: Schedule, device: torch.device, sizes: List[int]) -> Dict[int, float]:
    """Seconds of one optimizer step at each of ``sizes`` as the engine takes it (3 warm-up, 3 timed; synthetic
    batches): the run's own network and DeepSpeed engine (engine/build.py: precision, ZeRO stage, fp32 accumulation,
    clipping, compile), channels_last batches where the run uses them, ``grad_accum`` micro-steps per step."""
    engine, _ = build_engine(run, schedule, build_model(run).train(), device)
    dtype, num_classes = DTYPES[run.precision], len(run.classes)
    y = torch.randint(0, num_classes, (schedule.micro_batch,), device=device)
    channels_last = run.cfg.data.channels_last if run.cfg.data.channels_last is not None else device.type == "cuda"
    seconds = {}
    for size in sizes:
        x = torch.randn(schedule.micro_batch, 3, size, size, device=device, dtype=dtype)
        if channels_last:
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
    return seconds


def dry_run_report(cfg: TrainConfig) -> Dict[str, Any]:
    """What ``launch/pretrain.py --dry-run`` prints: the schedule, and the whole run's time at this step time. The
    run is resolved and built as the Trainer builds it (engine/run.py, engine/build.py), so a config the run would
    refuse is refused here with the same line."""
    process = this_process()
    run = resolve_run(cfg, process.world_size, process.gpu)
    DepthwiseChoice(run.cfg, process.gpu)  # the depthwise formulations (and CPU malloc policy) the engine installs
    _, schedule = build_train_data(run, process.rank, process.device)
    joined = not dist.is_initialized()
    if joined:
        join_group(process, run.cfg.deepspeed.timeout_minutes)
    try:
        image_size = run.cfg.data.image_size
        seconds = measure_step_time(run, schedule, process.device, sorted(set(run.sizes.sizes() + [image_size])))
    finally:
        if joined:  # through DeepSpeed, which then drops the groups it cached (a later run in this process makes new)
            import deepspeed

            deepspeed.comm.destroy_process_group()
    return _report(run, schedule, seconds)


def _report(run: ResolvedRun, schedule: Schedule, seconds: Dict[int, float]) -> Dict[str, Any]:
    cfg, sizes = run.cfg, run.sizes
    step_s = seconds[cfg.data.image_size]
    what = (
        f"one optimizer step of the DeepSpeed engine on this device: {run.precision}, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{schedule.grad_accum} micro-batches of {schedule.micro_batch}, synthetic data; data loading and "
        "communication between ranks not included"
    )
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(run).parameters())
    report: Dict[str, Any] = {
        "schedule": schedule.as_dict(),
        **({"memory_plan": run.memory_plan} if run.memory_plan is not None else {}),
        "classes": len(run.classes),
        "parameters": parameters,
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
