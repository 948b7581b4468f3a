"""The one training engine, for pretraining and fine-tuning alike: ``Trainer(cfg).fit()``.

``Trainer`` assembles the components (each owns its state and checkpoints itself through the client state):
the loaders (``conv2former.data``), the model and DeepSpeed (ZeRO 0-3, fp32 on CPU, bf16 on GPU) with AdamW and the
per-step warmup + cosine schedule (``optim``), the EMA (``ema``), batch augmentation, the evaluator (``evaluator``),
checkpoints (``checkpoint.CheckpointManager``: every ``save_every`` steps and at each epoch end, resume from the
newest complete one), preemption (``preemption``: SIGTERM/SIGUSR1 checkpoint first) and metrics (``metrics``:
TensorBoard, log.jsonl, the bar, the logger). ``fit()`` is the recipe: train epochs, evaluate, checkpoint, export;
``train_epoch()`` shows one optimizer step. A stop is an exception caught once, in ``fit()``: ``Preempted`` (after
its checkpoint, exit 0) or a ``RunFault`` (``Diverged``, ``CheckpointFault``, ``RankFault``, ``DataFault``: one line
on rank 0 and its exit code). docs/architecture.md maps the rest.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
import torch.distributed as dist
from timm.loss import SoftTargetCrossEntropy

import conv2former  # noqa: F401  (registers the variants)
from conv2former.config import TrainConfig, to_dict
from conv2former.cpu import CpuTuning, not_installed_summary
from conv2former.data.augment import BatchAugment
from conv2former.data.loader import build_loader, resolve_backend
from conv2former.data.shard_format import read_classes
from conv2former.data.size_schedule import SizeSchedule
from conv2former.engine import checkpoint as ckpt
from conv2former.engine.batchnorm import BatchNormStats
from conv2former.engine.best import BestEvaluation, evaluation_record
from conv2former.engine.disk import estimate_checkpoint
from conv2former.engine.distributed import join_group, make_deterministic, this_process
from conv2former.engine.ema import make_ema
from conv2former.engine.evaluator import Evaluator
from conv2former.engine.guard import DivergenceGuard, weights_finite
from conv2former.engine.lost_ranks import announce_fault, is_collective_failure, lost_ranks_line
from conv2former.engine.memory_plan import resolve_auto_batch
from conv2former.engine.metrics import Metrics, get_logger, memory_mb
from conv2former.engine.optim import Schedule, build_optimizer, build_scheduler, derive_schedule
from conv2former.engine.precision import DTYPES, precision_config, resolve_precision
from conv2former.engine.preemption import Preempted, Preemption
from conv2former.engine.profiling import StepProfiler
from conv2former.engine.rank0_work import on_rank0, store_barrier
from conv2former.engine.run_output import RunOutput
from conv2former.engine.sinks import open_sinks
from conv2former.engine.state import CheckpointState, RngState
from conv2former.errors import Diverged, RankFault, RunFault, UserError
from conv2former.export import write_export
from conv2former.gpu_depthwise import GpuDepthwise

# fills a fresh model for the data's classes (fine-tuning's start) and returns a record of it for the summary
InitWeights = Callable[[torch.nn.Module, List[str]], Optional[Dict[str, Any]]]
STOPPED = "stopped by signal (checkpoint saved)"
DIVERGED = "diverged"


def deepspeed_config(cfg: TrainConfig, schedule: Schedule, precision: str) -> Dict[str, Any]:
    return {
        "train_batch_size": schedule.global_batch,
        "train_micro_batch_size_per_gpu": schedule.micro_batch,
        "gradient_accumulation_steps": schedule.grad_accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, "overlap_comm": bool(cfg.deepspeed.overlap_comm)},
        **precision_config(precision, cfg.deepspeed),
        "gradient_clipping": float(cfg.optim.clip_grad),  # explicit: DeepSpeed >= 0.19.3 clips at 1.0 otherwise
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Trainer:
    """One training stage. ``init_weights(model, classes)`` fills a fresh model (fine-tuning) when there is no
    checkpoint to resume; with ``schedule.max_steps == 0`` that model is exported without training."""

    def __init__(self, cfg: TrainConfig, init_weights: Optional[InitWeights] = None) -> None:
        self.cfg = cfg
        self._setup_process()
        # data.batch_size=auto: the largest micro-batch that fits (the global batch, so the schedule, unchanged)
        self.memory_plan = resolve_auto_batch(cfg, self.world_size, self.gpu, self.precision)
        self.sizes = SizeSchedule.from_config(
            cfg.data.size_schedule,
            cfg.data.size_schedule_mode,
            cfg.schedule.epochs,
            cfg.data.image_size,
            cfg.data.size_schedule_regularization,
            cfg.data.size_schedule_scale_batch,
        )  # progressive resizing: the crop size of each epoch (evaluation stays at data.image_size)
        self.train_loader = build_loader(cfg.data, "train", self.rank, self.world_size, self.device, sizes=self.sizes)
        self.schedule = derive_schedule(cfg, self.world_size, len(self.train_loader))
        if cfg.data.size_schedule_scale_batch and cfg.deepspeed.zero_stage == 3:
            raise UserError(
                "data.size_schedule_scale_batch changes the accumulation mid-run, which is tested with ZeRO 0-2 "
                "hooks only: use deepspeed.zero_stage 1 or 2 with it, or leave it off"
            )
        if cfg.data.size_schedule_scale_batch:  # each epoch's micro-batch from its size, the global batch kept
            mixing = cfg.data.augment.mixup > 0 or cfg.data.augment.cutmix > 0
            self.train_loader.scale_batch_with_size(self.schedule.micro_batch * self.schedule.grad_accum, mixing)
        self.epoch_micro_steps = self.schedule.micro_steps_per_epoch  # this epoch's (batch scaling changes it)
        self.classes = read_classes(cfg.data.root)
        torch.manual_seed(cfg.seed + self.rank)
        # a remote --output: the node's staging folder, agreeing with the remote run (its newest complete checkpoint)
        self.output = RunOutput(cfg.output, cfg.checkpoint.staging_dir, self.rank, self.local_rank)
        trace_dir = os.path.join(self.output.local, "nccl_trace")  # (NCCL's flight recorder, on a timeout)
        join_group(self.process, cfg.deepspeed.timeout_minutes, trace_dir)  # a lost rank ends the run
        self.output.restore()
        self.checkpoints = ckpt.CheckpointManager(
            os.path.join(self.output.local, "checkpoints"),
            cfg.checkpoint.keep_last,
            self.rank,
            self.world_size,
            cfg.checkpoint.save_every,
            cfg.deepspeed.rank0_work_timeout_minutes,
        )
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = self._make_model()
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.export_only = False
        self.initialized_from: Optional[Dict[str, Any]] = None  # what init_weights did (the summary's)
        if init_weights is not None and self.checkpoints.newest is None:
            self.initialized_from = init_weights(self.model, self.classes)
            self.export_only = self.schedule.stop_step == 0  # --max-steps 0: the initial (transferred) model
        if not self.export_only:
            self._setup_training()

    def _compile(self) -> None:
        """torch.compile through DeepSpeed with static shapes: one graph per input shape (each training size of the
        size schedule, the evaluation batch), never a dynamic-shape graph; the recompile limit admits them all."""
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = compile_limit(self.sizes.sizes() or [self.cfg.data.image_size])
        self.engine.compile(compile_kwargs={"dynamic": False})

    def _setup_process(self) -> None:
        self.process = this_process()
        self.rank, self.world_size, self.local_rank = (
            self.process.rank,
            self.process.world_size,
            self.process.local_rank,
        )
        self.gpu, self.device = self.process.gpu, self.process.device
        self.log = get_logger(self.rank)
        self.cfg.data.backend = resolve_backend(self.cfg.data.backend)
        if self.cfg.data.seed is None:
            self.cfg.data.seed = self.cfg.seed  # documented default: the data follow the run's seed
        self.precision = resolve_precision(self.cfg.deepspeed, self.gpu)  # bf16 | fp16 | fp32 (a mistake fails here)
        if self.cfg.deterministic:
            make_deterministic()
        # CPU runs: the depthwise formulations measured fastest and malloc keeping freed memory (conv2former/cpu)
        self.cpu = None if self.gpu else CpuTuning.install(self.cfg.cpu)
        # GPU runs: each depthwise layer's formulation measured per shape (cuDNN, native, Triton), or pinned
        self.gpu_depthwise = GpuDepthwise.install(self.cfg.gpu.depthwise, self.cfg.deterministic) if self.gpu else None
        self.depthwise = self.cpu if self.cpu is not None else self.gpu_depthwise

    def _make_model(self) -> Any:  # a timm model (set_grad_checkpointing, group_matcher, ...)
        kwargs: Dict[str, Any] = dict(num_classes=len(self.classes), drop_path_rate=self.cfg.model.drop_path_rate)
        if self.cfg.model.kernel_size:
            kwargs["kernel_size"] = self.cfg.model.kernel_size
        return timm.create_model(self.cfg.model.variant, **kwargs)

    def _setup_training(self) -> None:
        import deepspeed

        cfg, model = self.cfg, self.model
        if self.gpu:
            # Parameters stay contiguous: DeepSpeed broadcasts them as bytes (channels_last weights fail there) and
            # ZeRO re-flattens them anyway. The loader hands channels_last batches, so cuDNN runs NHWC kernels.
            model = model.to(device=self.device)
            # fixed input sizes: let cuDNN pick the fastest kernels once, unless the bits must repeat run to run
            torch.backends.cudnn.benchmark = not cfg.deterministic
        optimizer = build_optimizer(model, cfg, self.schedule.lr)
        ds_config = deepspeed_config(cfg, self.schedule, self.precision)
        note = self.checkpoints.configure(ds_config)
        if note:
            self.log.info(note)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if cfg.model.compile:
            self._compile()
        self.scheduler = build_scheduler(self.optimizer, cfg, self.schedule)
        self.dtype = DTYPES[self.precision]  # the model's (and so the batches') dtype under DeepSpeed
        self.ema = (
            make_ema(
                self.engine, self._make_model, cfg.ema_decay, cfg.ema_warmup, self.device, cfg.deepspeed.zero_stage == 3
            )
            if cfg.ema
            else None
        )
        size = estimate_checkpoint(
            model, cfg.deepspeed.zero_stage, self.precision != "fp32", bool(cfg.ema), self.world_size
        )
        for line in self.checkpoints.expect(size):
            self.log.info(line)
        self.augment = BatchAugment(cfg.data.augment, len(self.classes), self.device)
        self.criterion = SoftTargetCrossEntropy()
        self.evaluator = Evaluator(len(self.classes), self.device)
        self.val_loader = None
        try:
            self.val_loader = build_loader(cfg.data, "val", self.rank, self.world_size, self.device)
        except UserError as err:
            if self.rank == 0:
                self.log.warning(f"no evaluation: {err}")
        self.epoch, self.step = 0, 0
        self.best = BestEvaluation()
        self.guard = DivergenceGuard(cfg.guard.max_bad_steps, self.device, cfg.guard.max_overflow_skips)
        self.batchnorm = BatchNormStats(self._models())
        self.preemption = Preemption()
        self.profiler = StepProfiler(
            cfg.profile.steps, cfg.profile.memory, os.path.join(self.output.local, "profile"), self.rank, self.device
        )
        self.config_dict = to_dict(cfg)
        self.state = self._checkpoint_state()
        self.resumed_from: Optional[Dict[str, Any]] = None  # the checkpoint this run resumed from (the summary's)
        self._resume()
        self.log.info("config:\n" + json.dumps(self.config_dict, indent=1))
        self.log.info("schedule: " + json.dumps(self.schedule.as_dict()))
        if self.sizes.points:
            self.log.info("size schedule: " + json.dumps(self.sizes.as_dict()))
        sinks = (
            open_sinks(cfg.logging.backends, self.output.local, cfg.logging.project,
                       os.path.basename(cfg.output.rstrip("/")), self.config_dict, cfg.logging.mlflow_tracking_uri)
            if self.rank == 0
            else []
        )  # fmt: skip
        self.metrics = Metrics(self.output.local, self.rank, self.schedule.stop_step, self.step, cfg.stage, sinks)
        self.last_loss = float("nan")  # the newest recorded loss
        self.last_eval: Dict[str, float] = {}  # the newest evaluation
        self.step_loss: Optional[torch.Tensor] = None  # the newest step's loss, on the device

    # -- state ------------------------------------------------------------------------------------------------------
    def _checkpoint_state(self) -> CheckpointState:
        """Everything a checkpoint holds beside DeepSpeed's model and optimizer state, one component per line, with
        its scope (conv2former/engine/state.py applies the per-rank and other-world-size rules)."""
        state = CheckpointState(self.rank, self.world_size)
        state.register(None, self, required=True)  # "epoch", "step"
        state.register("scheduler", self.scheduler, required=True)
        if self.ema is not None:
            state.register("ema", self.ema)
        state.register("best", self.best)
        state.register("guard", self.guard)
        state.register("data", self.train_loader, per_rank=True, other_world="first", required=True)
        state.register("rng", RngState(), per_rank=True)
        if self.depthwise is not None:  # each rank's depthwise formulations: the same bits on resume
            state.register("depthwise", self.depthwise, per_rank=True, other_world="first")
        state.register("batchnorm", self.batchnorm, per_rank=True)  # (the saved model holds their average)
        state.constant("config", self.config_dict)
        state.constant("classes", self.classes)
        state.constant("schedule", self.schedule.as_dict())
        # what DeepSpeed's ds_to_universal needs to convert this checkpoint for another world size
        state.constant("universal_checkpoint_info", {"universal_checkpoint_version": 0.2})
        return state

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _resume(self) -> None:
        """Load the newest good checkpoint, if any; ``resumed_from`` (in the summary) says which and what was
        passed over."""
        start = time.perf_counter()
        tag = self.checkpoints.load(self.engine, self.state)
        if tag is not None:
            reused = self.depthwise.tuner.loaded if isinstance(self.depthwise, CpuTuning) else 0
            reused = self.gpu_depthwise.loaded if self.gpu_depthwise is not None else reused
            if reused:
                self.log.info(f"depthwise: reusing the {reused} formulations recorded in the checkpoint")
            self._best_unwritten_at_resume()
            seconds = time.perf_counter() - start
            self.log.info(f"resumed from {tag}: epoch {self.epoch}, step {self.step} (loaded in {seconds:.1f} s)")
            self.resumed_from = {"tag": tag, "epoch": self.epoch, "step": self.step,
                                 "passed_over": self.checkpoints.passed_over, "depthwise_reused": reused}  # fmt: skip
        self.scheduler.step_update(self.step)

    def _best_unwritten_at_resume(self) -> None:
        """A run stopped between writing the checkpoint after a new best and writing export/best/: write it from that
        checkpoint (the one resumed) at the first export point. Rank 0 reads export/best/ and tells the others."""
        best = self.best.best
        if not (self.cfg.checkpoint.keep_best and best is not None and best["step"] == self.step):
            return
        folder = os.path.join(self.output.local, "export", "best")
        missing = [self.best.written_step(folder) != best["step"] if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(missing, src=0)
        self.best.unwritten = bool(missing[0])

    def _report_depthwise(self) -> None:
        """Log (rank 0) the formulations measured since the last report: shape, choice, each candidate's time."""
        for line in self.depthwise.new_measurements() if self.depthwise is not None else []:
            self.metrics.note("depthwise measured " + line)

    def _models(self) -> List[torch.nn.Module]:
        return [self.engine.module] + ([self.ema.module] if self.ema is not None else [])

    def save(self) -> bool:
        """Checkpoint now, unless the weights are not finite (then nothing is written and the newest checkpoint on
        disk stays the last good one): returns whether it saved."""
        if not weights_finite(self.engine.module):
            return False
        start = time.perf_counter()
        with self.batchnorm.averaged():  # the saved model (and EMA) hold the average over ranks
            tag = self.checkpoints.save(self.engine, self.step, self.state)
        took = {"seconds": time.perf_counter() - start, "bytes": float(self.checkpoints.size_bytes)}
        if self.output.remote:  # upload the tag (then mark it complete there) and the run's other files
            start = time.perf_counter()
            self.metrics.flush()
            self._warn(self.output.push_checkpoint(tag, self.cfg.checkpoint.keep_last))
            took["upload_seconds"] = time.perf_counter() - start
        self.metrics.scalars(self.step, took, kind="checkpoint")  # how long a save blocks training, and its size
        return True

    # -- the recipe -------------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train to ``stop_step`` (or the last epoch), evaluating and checkpointing on the way; export at the end.
        A stop (SIGTERM/SIGUSR1: ``Preempted``, after a checkpoint) or a fault (``Diverged``, a failed save, a lost
        rank, an unreadable shard) ends the run here, with one line on rank 0 and the summary's ``exit_code``
        (docs/training.md "When things go wrong")."""
        if self.export_only:
            return self._export_initial_model()
        start = time.time()
        status, exit_code, export_dir = "finished", 0, None
        try:
            self._keep_best()  # (after a resume that found export/best/ behind the checkpoint)
            self._train()
            export_dir = self._finish()
        except Preempted:
            status = STOPPED
        except Exception as err:
            fault = self._as_fault(err)
            self.metrics.bar.close()  # the line starts on its own line, not after the bar
            if str(fault):
                self.log.error(f"error: {fault}")
            status, exit_code = fault.status, fault.exit_code
        self.profiler.close()  # (a run that ended inside the profile window: its trace so far)
        self.metrics.close()
        summary = self._summary(status, exit_code, export_dir, time.time() - start)
        self._publish(summary)
        return summary

    def _summary(self, status: str, exit_code: int, export_dir: Optional[str], seconds: float) -> Dict[str, Any]:
        summary: Dict[str, Any] = {
            "status": status,
            "exit_code": exit_code,
            "bad_steps": self.guard.bad_steps,
            "precision": self.precision,
            "micro_batch": self.schedule.micro_batch,
            "memory_plan": self.memory_plan,
            "profile": self.output.shown(self.profiler.written)
            if self.profiler.written
            else None,  # data.batch_size=auto: the plan that chose micro_batch (else null)
            "overflow_skips": self.guard.overflow_skips,  # fp16: steps the loss scaler skipped
            "skipped_shards": self.train_loader.skipped_shards,  # this rank's (every rank warns for its own)
            "data_fetch": self.train_loader.fetch_stats(),  # a remote root: this rank's downloads and cache hits
            **(self.cpu.summary() if self.cpu is not None else not_installed_summary()),
            **(self.gpu_depthwise.summary() if self.gpu_depthwise is not None else {}),
            "initialized_from": self.initialized_from,
            "resumed_from": self.resumed_from,
            # the estimate the disk-space warning used, and the newest checkpoint's measured size (rank 0)
            "checkpoint_bytes": {"estimated": self.checkpoints.estimated_bytes, "written": self.checkpoints.size_bytes},
            "epoch": self.epoch,
            "step": self.step,
            "loss": self.last_loss,
            "eval": self.last_eval,
            "best_eval": self.best.best,
            "seconds": round(seconds, 1),
            "export": self.output.shown(export_dir),
            "output": self.cfg.output,
        }
        if self.output.remote:
            summary["upload"] = self.output.describe()
        return summary

    def _publish(self, summary: Dict[str, Any]) -> None:
        """The summary: logged, written to OUTPUT/summary.json, the run's files uploaded (a remote output)."""
        self.log.info("summary: " + json.dumps(summary))
        self.output.write_summary(summary)
        line = self.output.push_files()
        if line and self.rank == 0:
            self.log.warning(line)

    def _warn(self, line: Optional[str]) -> None:
        if line:
            self.metrics.warn(line)

    def _as_fault(self, err: Exception) -> RunFault:
        """``err`` as a run fault with its line (empty on the ranks that do not print it), or ``err`` re-raised."""
        if isinstance(err, RunFault):
            if self.world_size > 1 and not isinstance(err, (RankFault, Diverged)):  # (every rank diverges at once)
                announce_fault(self.rank, err.status)  # the other ranks' roll call then stays quiet
            return err
        if is_collective_failure(err):
            line = lost_ranks_line(self.rank, self.world_size, self.step, err, self.cfg.deepspeed.timeout_minutes)
            return RankFault(line)
        raise err

    def _train(self) -> None:
        """The epochs: train, evaluate at the epoch ends, checkpoint (the last step too). Raises ``Diverged`` and
        ``Preempted`` (after its checkpoint)."""
        self.engine.train()
        try:
            while self.step < self.schedule.stop_step and self.epoch < self.cfg.schedule.epochs:
                self.train_epoch()
                if self._epoch_complete():
                    self._end_epoch()
        except (Diverged, Preempted):
            self.preemption.wait()
            self._end_training()
            raise
        self._end_training()
        if self.checkpoints.saved_at != self.step:
            self._checkpoint()

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.train_loader.set_epoch(self.epoch)
        if self.epoch < self.cfg.schedule.epochs and self.sizes.size(self.epoch) != self.sizes.size(self.epoch - 1):
            self.log.info(f"epoch {self.epoch}: training crop {self.sizes.size(self.epoch)} px (data.size_schedule)")
        if self.epoch % self.cfg.schedule.eval_every_epochs == 0 or self.epoch == self.cfg.schedule.epochs:
            self.last_eval = self.evaluate()
        self._checkpoint()
        self._keep_best()

    def _end_training(self) -> None:
        self.metrics.bar.close()
        if self.step_loss is not None:
            self.last_loss = self.step_loss.item()

    def _finish(self) -> Optional[str]:
        """The final evaluation (unless the last epoch end just ran one) and the export."""
        if not self.last_eval:
            self.last_eval = self.evaluate()
        return self.export()

    def _epoch_complete(self) -> bool:
        return self.train_loader.step >= self.epoch_micro_steps or self.train_loader.step == 0

    def _epoch_accumulation(self) -> int:
        """The current epoch's gradient accumulation (and ``epoch_micro_steps``): the schedule's, or with
        ``data.size_schedule_scale_batch`` the one that keeps the global batch at this epoch's micro-batch, which
        DeepSpeed's batch settings then follow."""
        schedule = self.schedule
        if not self.cfg.data.size_schedule_scale_batch:
            self.epoch_micro_steps = schedule.micro_steps_per_epoch
            return schedule.grad_accum
        micro = self.train_loader.batch_size
        accum = schedule.micro_batch * schedule.grad_accum // micro
        self.engine.set_train_micro_batch_size(micro)
        self.engine.set_train_batch_size(schedule.global_batch)
        self.epoch_micro_steps = schedule.steps_per_epoch * accum
        return accum

    def train_epoch(self) -> None:
        """The rest of the current epoch, one optimizer step after another. Nothing in a step waits for the device:
        losses add up on the device and are read (with the grad norm and timings) only every
        ``logging.print_every`` steps; the divergence and preemption flags are read one step late."""
        loader, schedule = self.train_loader, self.schedule
        loader.set_epoch(self.epoch)
        accum = self._epoch_accumulation()
        explicit_boundary = self.cfg.data.size_schedule_scale_batch  # DeepSpeed counts micro-steps over the run
        self.augment.set_strength(self.sizes.strength(self.epoch))  # a function of the epoch: resumes exactly
        loss_sum = torch.zeros((), device=self.device)
        self.metrics.restart_window()
        t_data = time.perf_counter()
        batches = iter(loader)
        while True:
            if loader.step % accum == 0:
                self.profiler.step_starts(self.step + 1)
            with self.profiler.region("data_wait"):
                batch = next(batches, None)
            if batch is None:
                break
            images, labels = batch
            self.metrics.add_data_time(time.perf_counter() - t_data)
            images, targets = self.augment(images, labels)
            loss = self.criterion(self.engine(images.to(dtype=self.dtype)).float(), targets)
            if self.cfg.guard.inject_nan_at == self.step + 1 and self.rank == 0:  # test aid (docs/training.md)
                loss = loss * float("nan")
            if explicit_boundary:
                self.engine.set_gradient_accumulation_boundary(loader.step % accum == 0)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            loss_sum += loss.detach()
            if loader.step % accum == 0:  # an optimizer step happened
                self.after_optimizer_step(loss_sum / accum)
                loss_sum = torch.zeros((), device=self.device)
                if self.step >= schedule.stop_step:
                    break
            if loader.step >= self.epoch_micro_steps:
                break
            t_data = time.perf_counter()
        self.preemption.wait()

    def after_optimizer_step(self, step_loss: torch.Tensor) -> None:
        """Schedule, EMA, metrics, the guard, preemption and the periodic checkpoint after step ``self.step + 1``."""
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.step)
        self.step_loss = step_loss
        self.metrics.step_done()
        self.profiler.step_done(self.step)
        if self.step % self.cfg.logging.print_every == 0 or self.step == 1:
            self._record_training()
            self._report_depthwise()
        skipped = self.precision == "fp16" and not self.engine.was_step_applied()  # the loss scaler's (host) flag
        self._check_bad_step(self.guard.observe(self.step, step_loss, self.engine.get_global_grad_norm(), skipped))
        if self.preemption.poll(self.device):
            self._checkpoint()
            raise Preempted()
        if self.checkpoints.due(self.step):
            self._checkpoint()
            self.metrics.restart_window()  # time training only

    def _record_bad_step(self, bad: Optional[Dict[str, Any]]) -> None:
        """A bad step in log.jsonl and TensorBoard."""
        if bad is not None:
            self.metrics.scalars(bad["step"], {"loss": bad["loss"], "grad_norm": bad["grad_norm"]}, kind="bad_step")

    def _check_bad_step(self, bad: Optional[Dict[str, Any]]) -> None:
        """Record a bad step; raise ``Diverged`` when the guard's limit of consecutive bad steps is hit."""
        self._record_bad_step(bad)
        if bad is not None and self.guard.tripped:
            raise self._diverged()

    def _checkpoint(self) -> None:
        """Checkpoint now, unless this very step was bad (its flag is read now, one sync per checkpoint: the save is
        skipped with a warning) or the weights are not finite (``Diverged``)."""
        self.preemption.wait()
        bad = self.guard.flush()
        self._check_bad_step(bad)
        if bad is not None:
            self.metrics.warn(f"warning: step {self.step} was not finite: its checkpoint is skipped")
            return
        if not self.save():
            raise self._diverged()

    def _diverged(self) -> Diverged:
        """The fault a diverged run ends with: its one line (rank 0) and the summary's status."""
        self._record_bad_step(self.guard.flush())  # the last step's flag, recorded like the others
        run = self.guard.last_run()
        what = f"step {self.step}: the weights are not finite"
        if run:
            seen = run[0]
            what = f"step {seen['step']}: loss {seen['loss']:.4g}, grad norm {seen['grad_norm']:.4g}"
            if len(run) > 1:
                what += f" (bad steps {seen['step']}-{run[-1]['step']})"
        newest = ckpt.newest_complete(self.checkpoints.dir)
        good = os.path.join(self.checkpoints.dir, newest["tag"]) if newest else "none (no checkpoint was written)"
        line = (
            f"training diverged at {what}; nothing was saved from non-finite weights, the last good checkpoint is "
            f"{good}; try a lower optim.base_lr, more schedule.warmup_epochs or gradient clipping "
            "(--set optim.clip_grad=1.0)"
        )
        return Diverged(line if self.rank == 0 else "", f"{DIVERGED} at {what}")

    def _record_training(self) -> None:
        window = self.metrics.window()
        assert self.step_loss is not None  # (recorded after a step)
        self.last_loss = self.step_loss.item()
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "loss": self.last_loss,
            "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "images_per_s": self.schedule.global_batch / window["step_time"],
            **window,
            "memory_mb": memory_mb(self.device),
            "epoch": self.epoch,
            "image_size": self.train_loader.image_size(),
        }
        if self.sizes.regularization is not None:
            values["augment_strength"] = self.sizes.strength(self.epoch)
        if self.cfg.data.size_schedule_scale_batch:
            values["micro_batch"] = self.train_loader.batch_size
        if self.precision == "fp16":  # DeepSpeed's dynamic loss scale (halved at each overflow skip)
            values["loss_scale"] = float(self.engine.optimizer.loss_scale)
        self.metrics.scalars(self.step, values)
        self.metrics.show(loss=f"{self.last_loss:.3f}", img_s=f"{values['images_per_s']:.0f}", epoch=str(self.epoch))
        self.metrics.restart_window()

    def evaluate(self) -> Dict[str, float]:
        """Top-1/top-5 of the model (and of the EMA) on the val split, logged as ``eval/*`` scalars with the best
        top-1 so far (``eval/best_top1``, ``eval/best_epoch``)."""
        if self.val_loader is None:
            return {}
        with self.batchnorm.averaged():
            self.val_loader.set_epoch(0)
            result = self.evaluator.run(self.engine, self.val_loader, input_dtype=self.dtype)
            out = {"top1": result.top1, "top5": result.top5, "num_samples": result.num_samples}
            if self.ema is not None:
                self.val_loader.set_epoch(0)
                half = self.dtype if self.precision != "fp32" else None  # fp32 weights, half-precision compute
                with self.ema.gathered() as ema_module:  # (ZeRO-3: the ranks' partitions, gathered for this)
                    ema_result = self.evaluator.run(ema_module, self.val_loader, autocast_dtype=half)
                out.update(ema_top1=ema_result.top1, ema_top5=ema_result.top5)
        self.best.observe(out, self.epoch, self.step)
        self.metrics.scalars(self.step, {**out, "epoch": self.epoch, **self.best.scalars()}, kind="eval")
        return out

    def _keep_best(self) -> None:
        """``export/best/`` from the checkpoint just written, when the evaluation before it was a new best."""
        if self._best_due():
            self._write_exports(["export/best"])

    def _best_due(self) -> bool:
        best = self.best.best
        return bool(
            self.cfg.checkpoint.keep_best
            and self.best.unwritten
            and best is not None
            and best["step"] == self.checkpoints.saved_at == self.step
        )

    def export(self) -> Optional[str]:
        """``OUTPUT/export/`` (and ``export/best/`` when the last evaluation was the best) from the checkpoint just
        written, consolidated by zero_to_fp32, on rank 0."""
        return self._write_exports(["export"] + (["export/best"] if self._best_due() else []))

    def _write_exports(self, folders: List[str]) -> Optional[str]:
        """Each of ``folders`` (under OUTPUT) from the newest checkpoint, read once, on rank 0 while the others wait
        (engine/rank0_work.py: their own timeout, not the collective one); returns the first's path (rank 0)."""
        dist.barrier()
        with self.batchnorm.averaged():  # (all ranks take part) the EMA exported as checkpointed
            ema = self.ema.state_dict() if self.ema is not None else None  # (ZeRO-3: a collective)
            paths = on_rank0(lambda: self._export_to(folders, ema), self.cfg.deepspeed.rank0_work_timeout_minutes)
        self._warn(self.output.push_files())
        store_barrier(self.cfg.deepspeed.rank0_work_timeout_minutes)  # (rank 0 pushed the exports to a remote root)
        if "export/best" in folders:
            self.best.unwritten = False
        return paths[0] if paths else None

    def _export_to(self, folders: List[str], ema: Optional[Dict[str, Any]]) -> List[str]:
        """(rank 0) The weights of the newest checkpoint, consolidated by zero_to_fp32, written to each folder."""
        from conv2former.weights import read_weights

        weights = read_weights(self.checkpoints.dir)
        last = {**self.last_eval, "epoch": self.epoch, "step": self.step} if self.last_eval else None
        record = evaluation_record(last, self.best.best)
        return [
            write_export(self.output.local, weights.state_dict, self.classes, self.config_dict, ema, record, folder)
            for folder in folders
        ]

    def _export_initial_model(self) -> Dict[str, Any]:
        export_dir = None
        if self.rank == 0:
            export_dir = write_export(self.output.local, self.model.state_dict(), self.classes, to_dict(self.cfg))
        summary = {"status": "exported without training", "step": 0, "initialized_from": self.initialized_from,
                   "export": self.output.shown(export_dir), "output": self.cfg.output}  # fmt: skip
        self._publish(summary)
        return summary


def compile_limit(sizes: List[int]) -> int:
    """torch.compile's recompile limit for a run training at ``sizes``: a graph per size, plus the evaluation's
    (its batch, no gradients) and two spare, never below torch's own limit."""
    import torch._dynamo.config as dynamo_config

    return max(int(dynamo_config.recompile_limit), len(sizes) + 4)


def train(cfg: TrainConfig, dry_run: bool = False, init_weights: Optional[InitWeights] = None) -> Dict[str, Any]:
    """Run (or resume) a training stage and return its summary; ``dry_run`` reports the schedule instead."""
    if dry_run:
        from conv2former.engine.dry_run import dry_run_report

        return dry_run_report(cfg)
    return Trainer(cfg, init_weights).fit()
