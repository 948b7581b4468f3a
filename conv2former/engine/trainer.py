"""The one DeepSpeed training loop, for pretraining and fine-tuning alike.

``train(cfg)`` builds the loaders, the model, DeepSpeed (ZeRO 0-3, fp32 on CPU, bf16 on GPU), AdamW with
no decay on 1-D parameters, a per-step warmup + cosine schedule, optional EMA; then trains, evaluates every
``eval_every_epochs``, checkpoints every ``save_every`` steps and at each epoch end (with the data position of every
rank, RNG states, scheduler, EMA and config), resumes automatically from the newest complete checkpoint, stops
cleanly on SIGTERM/SIGUSR1 (checkpoint first), and exports consolidated fp32 weights at the end.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.distributed as dist
from timm.loss import SoftTargetCrossEntropy
from tqdm import tqdm

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import TrainConfig, to_dict
from conv2former.data.augment import BatchAugment
from conv2former.data.loader import build_loader, resolve_backend
from conv2former.data.shard_format import read_classes
from conv2former.engine import checkpoint as ckpt
from conv2former.engine.optim import Schedule, build_optimizer, build_scheduler
from conv2former.errors import UserError
from conv2former.export import write_export


def single_process_env() -> None:
    """Without a launcher (plain ``python launch/...``) run as rank 0 of 1 on a free local port."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def world_from_env() -> tuple:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def derive_schedule(cfg: TrainConfig, world_size: int, loader_steps: int) -> Schedule:
    micro = cfg.data.batch_size
    per_step = micro * world_size
    if cfg.schedule.global_batch % per_step:
        raise UserError(f"global batch {cfg.schedule.global_batch} is not divisible by {world_size} ranks x micro-batch "
                        f"{micro} = {per_step}: change --global-batch or --micro-batch")
    accum = cfg.schedule.global_batch // per_step
    steps_per_epoch = loader_steps // accum
    if steps_per_epoch == 0:
        raise UserError(f"one optimizer step needs {accum} micro-batches per rank but an epoch holds {loader_steps}: "
                        "lower --global-batch")
    total = cfg.schedule.epochs * steps_per_epoch
    stop = min(total, max(0, cfg.schedule.max_steps)) if cfg.schedule.max_steps is not None else total
    return Schedule(world_size=world_size, micro_batch=micro, global_batch=cfg.schedule.global_batch, grad_accum=accum,
                    micro_steps_per_epoch=steps_per_epoch * accum, steps_per_epoch=steps_per_epoch, total_steps=total,
                    warmup_steps=int(round(cfg.schedule.warmup_epochs * steps_per_epoch)),
                    lr=cfg.optim.base_lr * cfg.schedule.global_batch / 1024, stop_step=stop)


def deepspeed_config(cfg: TrainConfig, schedule: Schedule, gpu: bool) -> Dict[str, Any]:
    return {
        "train_batch_size": schedule.global_batch,
        "train_micro_batch_size_per_gpu": schedule.micro_batch,
        "gradient_accumulation_steps": schedule.grad_accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, "overlap_comm": bool(cfg.deepspeed.overlap_comm)},
        "bf16": {"enabled": bool(gpu and cfg.deepspeed.bf16)},
        "gradient_clipping": float(cfg.optim.clip_grad),  # explicit: DeepSpeed >= 0.19.3 clips at 1.0 otherwise
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class _Stop:
    """SIGTERM / SIGUSR1 (Slurm preemption): finish the step, checkpoint, exit 0.

    The ranks agree through an all-reduce of a flag. It is started without waiting at every optimizer step and read
    one step later, when the next step's work is already queued, so the check never leaves the GPU idle; all ranks
    read the same value at the same step, so they stop at the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._flag: Optional[torch.Tensor] = None  # created at the first poll
        self._work = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def poll(self, device: torch.device) -> bool:
        """Whether every rank had agreed to stop by the previous call; starts this step's agreement."""
        if self._flag is None:
            agreed, self._flag = False, torch.zeros(1, device=device)
        else:
            self.wait()
            agreed = bool(self._flag.item())
        self._flag.fill_(1.0 if self.requested else 0.0)  # a kernel on GPU, not a host-to-device copy
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True) if dist.is_initialized() else None
        return agreed

    def wait(self) -> None:
        """Let the outstanding agreement finish (before other collectives such as a checkpoint)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


@dataclass
class EvalResult:
    top1: float
    top5: float
    num_samples: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype) -> EvalResult:
    """Top-1/top-5 over every sample exactly once across ranks (padding has label -1)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for images, labels in loader:
        logits = model(images.to(device=device, dtype=dtype)).float()
        valid = labels >= 0
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels.view(-1, 1)
        counts += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(1) & valid).sum(), valid.sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    n = int(counts[2].item())
    return EvalResult(counts[0].item() / max(n, 1), counts[1].item() / max(n, 1), n)


def sync_batchnorm_stats(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks so every rank holds the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf)
                buf /= dist.get_world_size()


class Logger:
    """Rank 0 writes TensorBoard scalars and JSON lines; other ranks write nothing."""

    def __init__(self, output: str, rank: int) -> None:
        self.rank = rank
        self.tb = None
        self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output, "tb"))
            self.jsonl = open(os.path.join(output, "log.jsonl"), "a")

    def scalars(self, step: int, values: Dict[str, float], kind: str = "train") -> None:
        if self.rank:
            return
        for key, value in values.items():
            self.tb.add_scalar(f"{kind}/{key}", value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.jsonl.close()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_step_time(cfg: TrainConfig, num_classes: int, device: torch.device, schedule: Schedule) -> float:
    """Seconds of one optimizer step of this model on this device (3 warm-up, 3 timed; synthetic batches)."""
    model = timm.create_model(cfg.model.variant, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate)
    model = model.to(device).train()
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(schedule.micro_batch, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randint(0, num_classes, (schedule.micro_batch,), device=device)
    use_bf16 = device.type == "cuda" and cfg.deepspeed.bf16

    def micro_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
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


def train(cfg: TrainConfig, dry_run: bool = False,
          init_weights: Optional[Callable[[torch.nn.Module, List[str]], None]] = None) -> Dict[str, Any]:
    """Run (or resume) a training stage. ``init_weights(model, classes)`` fills a fresh model (fine-tuning) when
    there is no checkpoint to resume; ``schedule.max_steps == 0`` exports that model without training."""
    import deepspeed

    single_process_env()
    rank, world_size, local_rank = world_from_env()
    backend = resolve_backend(cfg.data.backend)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    cfg.data.backend = backend
    if cfg.data.seed is None:
        cfg.data.seed = cfg.seed  # documented default: the data follow the run's seed unless data.seed is set
    train_loader = build_loader(cfg.data, "train", rank, world_size, device)
    schedule = derive_schedule(cfg, world_size, len(train_loader))
    classes = read_classes(cfg.data.root)
    if dry_run:
        step_s = measure_step_time(cfg, len(classes), device, schedule)
        return {"schedule": schedule.as_dict(), "classes": len(classes), "measured_step_seconds": round(step_s, 4),
                "projected_hours": round(step_s * schedule.total_steps / 3600, 2),
                "projection": f"{schedule.total_steps} steps x {step_s:.3f} s (forward+backward+AdamW of one "
                              f"optimizer step on this device, {schedule.grad_accum} micro-batches of "
                              f"{schedule.micro_batch}, synthetic data; communication not included)"}

    torch.manual_seed(cfg.seed + rank)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", verbose=False)
    os.makedirs(cfg.output, exist_ok=True)
    ckpt_dir = os.path.join(cfg.output, "checkpoints")
    model_kwargs: Dict[str, Any] = dict(num_classes=len(classes), drop_path_rate=cfg.model.drop_path_rate)
    if cfg.model.kernel_size:
        model_kwargs["kernel_size"] = cfg.model.kernel_size
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = timm.create_model(cfg.model.variant, **model_kwargs)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    newest = ckpt.newest_complete(ckpt_dir)
    if init_weights is not None and newest is None:
        init_weights(model, classes)
        if schedule.stop_step == 0:  # --max-steps 0: write the initial (transferred) model and stop
            export_dir = None
            if rank == 0:
                export_dir = write_export(cfg.output, model.state_dict(), classes, to_dict(cfg))
            return {"status": "exported without training", "step": 0, "export": export_dir, "output": cfg.output}
    if gpu:
        # Parameters stay contiguous: DeepSpeed broadcasts them as bytes (channels_last weights fail there) and ZeRO
        # re-flattens them anyway. The loader hands channels_last batches, so cuDNN runs NHWC kernels all the same.
        model = model.to(device=device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    optimizer = build_optimizer(model, cfg, schedule.lr)
    ds_config = deepspeed_config(cfg, schedule, gpu)
    universal = None
    if newest is not None and newest.get("world_size", world_size) != world_size:
        # saved on another number of ranks: resume through DeepSpeed's universal checkpoint format
        universal = ckpt.universal_tag(ckpt_dir, newest["tag"], rank)
        ds_config["checkpoint"] = {"load_universal": True}
        if rank == 0:
            print(f"checkpoint {newest['tag']} was saved by {newest['world_size']} ranks: resuming on {world_size} "
                  f"through {universal}")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.model.compile:
        engine.compile()
    scheduler = build_scheduler(optimizer, cfg, schedule)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    ema = None
    zero3 = cfg.deepspeed.zero_stage == 3
    if cfg.ema:
        from timm.utils import ModelEmaV3

        if zero3:  # parameters are partitioned: build a full copy from the gathered weights
            full = timm.create_model(cfg.model.variant, **model_kwargs)
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                full.load_state_dict(engine.module.state_dict())
            ema = ModelEmaV3(full.to(device), decay=cfg.ema_decay, device=device, use_warmup=cfg.ema_warmup)
        else:
            ema = ModelEmaV3(engine.module, decay=cfg.ema_decay, device=device, use_warmup=cfg.ema_warmup)
        # The average lives in fp32 whatever the training precision: in bf16 (8-bit mantissa) an update of
        # (1 - 0.9999) x (w - ema) rounds away and the EMA would silently stay at its first value.
        ema.module.float()

    def update_ema(step: int) -> None:
        if not zero3:
            ema.update(engine.module, step=step)
            return
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            ema.update(engine.module, step=step)
    augment = BatchAugment(cfg.data.augment, len(classes), device)
    criterion = SoftTargetCrossEntropy()
    val_loader = None
    try:
        val_loader = build_loader(cfg.data, "val", rank, world_size, device)
    except UserError as err:
        if rank == 0:
            print(f"no evaluation: {err}", file=sys.stderr)

    epoch, step = 0, 0
    if universal is not None:
        state = ckpt.resume_universal(engine, ckpt_dir, universal)
    else:
        state = ckpt.resume(engine, ckpt_dir) if ckpt.list_tags(ckpt_dir) else None
    if state is not None:
        epoch, step = int(state["epoch"]), int(state["step"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        data_states = state["data"]
        train_loader.load_state_dict(data_states[rank] if len(data_states) == world_size else data_states[0])
        if len(state["rng"]) == world_size:
            ckpt.set_rng_state(state["rng"][rank])
        if rank == 0:
            print(f"resumed from {state['tag']}: epoch {epoch}, step {step}")
    scheduler.step_update(step)

    logger = Logger(cfg.output, rank)
    stopper = _Stop()
    config_dict = to_dict(cfg)
    if rank == 0:
        print("config:\n" + json.dumps(config_dict, indent=1))
        print("schedule: " + json.dumps(schedule.as_dict()))

    def client_state() -> Dict[str, Any]:
        return {"epoch": epoch, "step": step, "scheduler": scheduler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "data": ckpt.gather(train_loader.state_dict()), "rng": ckpt.gather(ckpt.rng_state()),
                "config": config_dict, "classes": classes, "schedule": schedule.as_dict(),
                # what DeepSpeed's ds_to_universal needs to convert this checkpoint for another world size
                "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}

    def sync_models() -> None:
        """Every rank holds the same model and the same EMA (BatchNorm statistics are per rank between syncs)."""
        sync_batchnorm_stats(engine.module)
        if ema is not None:
            sync_batchnorm_stats(ema.module)

    def save() -> None:
        sync_models()
        ckpt.save(engine, ckpt_dir, step, client_state(), cfg.checkpoint.keep_last)

    def run_eval() -> Dict[str, float]:
        if val_loader is None:
            return {}
        sync_models()
        val_loader.set_epoch(0)
        result = evaluate(engine, val_loader, device, dtype)
        out = {"top1": result.top1, "top5": result.top5, "num_samples": result.num_samples}
        if ema is not None:
            val_loader.set_epoch(0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                ema_result = evaluate(ema.module, val_loader, device, torch.float32)  # fp32 weights, bf16 compute
            out.update(ema_top1=ema_result.top1, ema_top5=ema_result.top5)
        logger.scalars(step, {**out, "epoch": epoch}, kind="eval")
        return out

    bar = tqdm(total=schedule.stop_step, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True,
               desc=cfg.stage, file=sys.stderr)
    start = time.time()
    last_loss, last_eval, saved_at, status = float("nan"), {}, step, "finished"
    step_loss: Optional[torch.Tensor] = None
    engine.train()
    # Nothing in a step waits for the device: losses add up on the device and are read (with the grad norm and the
    # timings, averaged over the steps since the last record) only every logging.print_every steps.
    while step < schedule.stop_step and epoch < cfg.schedule.epochs and status == "finished":
        train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
        t_data = time.perf_counter()
        for images, labels in train_loader:
            window_data += time.perf_counter() - t_data
            images, targets = augment(images, labels)
            loss = criterion(engine(images.to(dtype=dtype)).float(), targets)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            if train_loader.step % schedule.grad_accum == 0:  # an optimizer step happened
                step += 1
                window_steps += 1
                scheduler.step_update(step)
                if ema is not None:
                    update_ema(step)
                step_loss, loss_sum = loss_sum / schedule.grad_accum, torch.zeros((), device=device)
                bar.update(1)
                if step % cfg.logging.print_every == 0 or step == 1:
                    seconds = (time.perf_counter() - window_start) / window_steps
                    last_loss = step_loss.item()
                    grad_norm = engine.get_global_grad_norm()
                    values = {"loss": last_loss, "lr": max(g["lr"] for g in optimizer.param_groups),
                              "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                              "images_per_s": schedule.global_batch / seconds, "step_time": seconds,
                              "data_time": window_data / window_steps, "memory_mb": memory_mb(device), "epoch": epoch}
                    logger.scalars(step, values)
                    bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{values['images_per_s']:.0f}", epoch=epoch)
                    window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
                if stopper.poll(device):
                    save()
                    saved_at, status = step, "stopped by signal (checkpoint saved)"
                    break
                if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0:
                    stopper.wait()
                    save()
                    saved_at = step
                    window_steps, window_data, window_start = 0, 0.0, time.perf_counter()  # time training only
                if step >= schedule.stop_step:
                    break
            if train_loader.step >= schedule.micro_steps_per_epoch:
                break
            t_data = time.perf_counter()
        stopper.wait()
        if status != "finished":
            break
        if train_loader.step >= schedule.micro_steps_per_epoch or train_loader.step == 0:
            epoch += 1
            train_loader.set_epoch(epoch)
            if epoch % cfg.schedule.eval_every_epochs == 0 or epoch == cfg.schedule.epochs:
                last_eval = run_eval()
            save()
            saved_at = step
    bar.close()
    if step_loss is not None:
        last_loss = step_loss.item()
    if status == "finished" and saved_at != step:
        save()
    if status == "finished" and not last_eval:
        last_eval = run_eval()
    export_dir = None
    if status == "finished":
        dist.barrier()
        if rank == 0:
            from conv2former.weights import read_weights

            weights = read_weights(ckpt_dir)
            export_dir = write_export(cfg.output, weights.state_dict, classes, config_dict,
                                     ema.module.state_dict() if ema is not None else None)
        dist.barrier()
    logger.close()
    summary = {"status": status, "epoch": epoch, "step": step, "loss": last_loss, "eval": last_eval,
               "seconds": round(time.time() - start, 1), "export": export_dir, "output": cfg.output}
    if rank == 0:
        print("summary: " + json.dumps(summary))
    return summary
