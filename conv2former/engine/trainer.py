"""The one training engine, for pretraining and fine-tuning alike: ``Trainer(cfg).fit()``.

The run is resolved once (engine/run.py: the config judged, every ``auto`` decided) and built from that one object
(engine/build.py: the model, the training data and its schedule, the DeepSpeed engine), the same way ``--dry-run`` and
``--plan-memory`` build it. Its parts are put together in engine/assembly.py: the components (engine/component.py),
each owning its state, its cadence and its part of the summary: the EMA, the profiler, the training scalars, the
divergence guard, preemption, checkpoints, evaluation, the export and the depthwise choices. What is left here is
the loop: ``fit()`` is the recipe (train the epochs, evaluate, checkpoint, export) and ``train_epoch()`` one
optimizer step after another, after each of which the components act (``after_optimizer_step``). A stop is an
exception caught once, in ``fit()``: ``Preempted`` (after its checkpoint, exit 0) or a ``RunFault`` (``Diverged``,
``CheckpointFault``, ``RankFault``, ``DataFault``: one line on rank 0 and its exit code). docs/architecture.md maps
the rest.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from conv2former.config import TrainConfig
from conv2former.engine.assembly import Where, assemble
from conv2former.engine.build import build_model, build_train_data
from conv2former.engine.checkpoint import CheckpointManager
from conv2former.engine.depthwise_choice import DepthwiseChoice
from conv2former.engine.distributed import join_group, make_deterministic, this_process
from conv2former.engine.exporting import export_initial
from conv2former.engine.lost_ranks import as_run_fault
from conv2former.engine.metrics import get_logger
from conv2former.engine.preemption import Preempted
from conv2former.engine.run import resolve_run
from conv2former.engine.run_output import RunOutput
from conv2former.errors import Diverged

# fills a fresh model for the data's classes (fine-tuning's start) and returns a record of it for the summary
InitWeights = Callable[[torch.nn.Module, List[str]], Optional[Dict[str, Any]]]
STOPPED = "stopped by signal (checkpoint saved)"


class Trainer:
    """One training stage. ``init_weights(model, classes)`` fills a fresh model (fine-tuning) when there is no
    checkpoint to resume; with ``schedule.max_steps == 0`` that model is exported without training."""

    def __init__(self, cfg: TrainConfig, init_weights: Optional[InitWeights] = None) -> None:
        process = this_process()
        self.rank, self.world_size, self.device = process.rank, process.world_size, process.device
        self.log = get_logger(self.rank)
        self.run = run = resolve_run(cfg, self.world_size, process.gpu)  # judged and resolved once (one-line errors)
        self.cfg = cfg = run.cfg
        if cfg.deterministic:
            make_deterministic()
        # how depthwise convolutions choose their formulation (CPU: measured or fixed, and malloc; GPU: per shape)
        self.depthwise = DepthwiseChoice(cfg, process.gpu)
        self.train_loader, self.schedule = build_train_data(run, self.rank, self.device)
        self.epoch_micro_steps = self.schedule.micro_steps_per_epoch  # this epoch's (batch scaling changes it)
        torch.manual_seed(cfg.seed + self.rank)
        # a remote --output: the node's staging folder, agreeing with the remote run (its newest complete checkpoint)
        self.output = RunOutput(cfg.output, cfg.checkpoint.staging_dir, self.rank, process.local_rank)
        # a lost rank ends the run (NCCL's flight recorder dumps into nccl_trace/ on a timeout)
        join_group(process, cfg.deepspeed.timeout_minutes, os.path.join(self.output.local, "nccl_trace"))
        self.output.restore()
        self.checkpoints = CheckpointManager(os.path.join(self.output.local, "checkpoints"), cfg.checkpoint.keep_last,
                                             self.rank, self.world_size, cfg.checkpoint.save_every,
                                             cfg.deepspeed.rank0_work_timeout_minutes)  # fmt: skip
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_model(run)
        self.export_only = False
        self.initialized_from: Optional[Dict[str, Any]] = None  # what init_weights did (the summary's)
        if init_weights is not None and self.checkpoints.newest is None:
            self.initialized_from = init_weights(self.model, list(run.classes))
            self.export_only = self.schedule.stop_step == 0  # --max-steps 0: the initial (transferred) model
        if not self.export_only:
            self._setup_training()

    def _setup_training(self) -> None:
        where = Where(self.rank, self.device, self.output, self.checkpoints, self.train_loader, self.schedule,
                      self.depthwise)  # fmt: skip
        self.parts = assemble(self.run, where, self.model, self)
        self.engine = self.parts.engine
        self.epoch, self.step = 0, 0
        self.resumed_from: Optional[Dict[str, Any]] = None  # the checkpoint this run resumed from (the summary's)
        self._resume()
        self.log.info("config:\n" + json.dumps(self.run.config_dict(), indent=1))
        self.log.info("schedule: " + json.dumps(self.schedule.as_dict()))
        if self.run.sizes.points:
            self.log.info("size schedule: " + json.dumps(self.run.sizes.as_dict()))
        self.parts.metrics.start_at(self.step)

    # -- state: the run's progress (checkpointed first; engine/assembly.py registers everything else) -------------
    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _resume(self) -> None:
        """Load the newest good checkpoint, if any; ``resumed_from`` (in the summary) says which and what was
        passed over."""
        start = time.perf_counter()
        tag = self.checkpoints.load(self.engine, self.parts.state)
        if tag is not None:
            reused = self.depthwise.reused()
            if reused:
                self.log.info(f"depthwise: reusing the {reused} formulations recorded in the checkpoint")
            self.parts.exporter.resumed(self.step, self.rank, self.world_size)
            seconds = time.perf_counter() - start
            self.log.info(f"resumed from {tag}: epoch {self.epoch}, step {self.step} (loaded in {seconds:.1f} s)")
            self.resumed_from = {"tag": tag, "epoch": self.epoch, "step": self.step,
                                 "passed_over": self.checkpoints.passed_over, "depthwise_reused": reused}  # fmt: skip
        self.parts.scheduler.step_update(self.step)

    # -- the recipe -------------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train to ``stop_step`` (or the last epoch), evaluating and checkpointing on the way; export at the end.
        A stop (SIGTERM/SIGUSR1: ``Preempted``, after a checkpoint) or a fault (``Diverged``, a failed save, a lost
        rank, an unreadable shard) ends the run here, with one line on rank 0 and the summary's ``exit_code``
        (docs/training.md "When things go wrong")."""
        if self.export_only:
            return self._export_initial_model()
        start = time.time()
        status, exit_code = "finished", 0
        try:
            self._export_best()  # (after a resume that found export/best/ behind the checkpoint)
            self._train()
            self._finish()
        except Preempted:
            status = STOPPED
        except Exception as err:
            fault = as_run_fault(err, self.rank, self.world_size, self.step, self.cfg.deepspeed.timeout_minutes)
            self.parts.metrics.close_bar()  # the line starts on its own line, not after the bar
            if str(fault):
                self.log.error(f"error: {fault}")
            status, exit_code = fault.status, fault.exit_code
        self.parts.profiler.close()  # (a run that ended inside the profile window: its trace so far)
        self.parts.metrics.close()
        summary = {
            "status": status,
            "exit_code": exit_code,
            **self._summary(),
            "seconds": round(time.time() - start, 1),
        }
        self._publish(summary)
        return summary

    def _summary(self) -> Dict[str, Any]:
        """Each part's fields (engine/component.py ``summary``), the start and the progress."""
        return {
            **self.run.summary(),  # precision, micro_batch, memory_plan (data.batch_size=auto: the plan)
            **self.train_loader.summary(),  # skipped_shards, data_fetch (this rank's)
            **self.parts.components.summary(),  # loss, eval, best_eval, bad_steps, checkpoint_bytes, export, ...
            "initialized_from": self.initialized_from,
            "resumed_from": self.resumed_from,
            "epoch": self.epoch,
            "step": self.step,
            "output": self.cfg.output,
            **self.output.summary(),  # a remote output: what was uploaded
        }

    def _publish(self, summary: Dict[str, Any]) -> None:
        """The summary: logged, written to OUTPUT/summary.json, the run's files uploaded (a remote output)."""
        self.log.info("summary: " + json.dumps(summary))
        self.output.write_summary(summary)
        line = self.output.push_files()
        if line and self.rank == 0:
            self.log.warning(line)

    def _train(self) -> None:
        """The epochs: train, evaluate at the epoch ends, checkpoint (the last step too). Raises ``Diverged`` and
        ``Preempted`` (after its checkpoint)."""
        self.engine.train()
        try:
            while self.step < self.schedule.stop_step and self.epoch < self.cfg.schedule.epochs:
                self.train_epoch()
                if self.train_loader.step >= self.epoch_micro_steps or self.train_loader.step == 0:
                    self._end_epoch()
        except (Diverged, Preempted):
            self.parts.preemption.wait()
            self.parts.training_log.end()
            raise
        self.parts.training_log.end()
        if self.parts.checkpointing.saved_at != self.step:
            self.parts.checkpointing.save_now(self.step)

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.train_loader.set_epoch(self.epoch)
        sizes = self.run.sizes
        if self.epoch < self.cfg.schedule.epochs and sizes.size(self.epoch) != sizes.size(self.epoch - 1):
            self.log.info(f"epoch {self.epoch}: training crop {sizes.size(self.epoch)} px (data.size_schedule)")
        if self.parts.evaluation.due_at_epoch_end(self.epoch):
            self.parts.evaluation.run(self.epoch, self.step)
        self.parts.checkpointing.save_now(self.step)
        self._export_best()

    def _export_best(self) -> None:
        self.parts.exporter.best_if_due(self.parts.checkpointing.saved_at, self.epoch, self.step)

    def _finish(self) -> None:
        """The final evaluation (unless one already ran in this process, as the last epoch end's) and the export."""
        if not self.parts.evaluation.last:
            self.parts.evaluation.run(self.epoch, self.step)
        self.parts.exporter.final(self.parts.checkpointing.saved_at, self.epoch, self.step)

    def _epoch_accumulation(self) -> int:
        """The current epoch's gradient accumulation (and ``epoch_micro_steps``): the schedule's, or with
        ``data.size_schedule_scale_batch`` the one that keeps the global batch at this epoch's micro-batch, which
        DeepSpeed's batch settings then follow."""
        schedule = self.schedule
        if not self.run.sizes.scale_batch:
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
        loader, parts = self.train_loader, self.parts
        loader.set_epoch(self.epoch)
        accum = self._epoch_accumulation()
        explicit_boundary = self.run.sizes.scale_batch  # DeepSpeed counts micro-steps over the run
        parts.augment.set_strength(self.run.sizes.strength(self.epoch))  # a function of the epoch: resumes exactly
        loss_sum = torch.zeros((), device=self.device)
        parts.metrics.restart_window()
        t_data = time.perf_counter()
        batches = iter(loader)
        while True:
            if loader.step % accum == 0:
                parts.profiler.step_starts(self.step + 1)
            with parts.profiler.region("data_wait"):
                batch = next(batches, None)
            if batch is None:
                break
            parts.metrics.add_data_time(time.perf_counter() - t_data)
            images, targets = parts.augment(*batch)
            loss = parts.criterion(self.engine(images.to(dtype=parts.dtype)).float(), targets)
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
                if self.step >= self.schedule.stop_step:
                    break
            if loader.step >= self.epoch_micro_steps:
                break
            t_data = time.perf_counter()
        parts.preemption.wait()

    def after_optimizer_step(self, step_loss: torch.Tensor) -> None:
        """The schedule, then every component due at step ``self.step + 1`` (engine/assembly.py lists their order:
        the EMA, the profile window, the scalars, the guard, preemption, the periodic checkpoint)."""
        self.step += 1
        self.parts.scheduler.step_update(self.step)
        self.parts.components.after_step(self.step, step_loss)

    def _export_initial_model(self) -> Dict[str, Any]:
        export_dir = export_initial(self.output, self.model, list(self.run.classes), self.run.config_dict(), self.rank)
        summary = {"status": "exported without training", "step": 0, "initialized_from": self.initialized_from,
                   "export": self.output.shown(export_dir), "output": self.cfg.output}  # fmt: skip
        self._publish(summary)
        return summary


def train(cfg: TrainConfig, dry_run: bool = False, init_weights: Optional[InitWeights] = None) -> Dict[str, Any]:
    """Run (or resume) a training stage and return its summary; ``dry_run`` reports the schedule instead."""
    if dry_run:
        from conv2former.engine.dry_run import dry_run_report

        return dry_run_report(cfg)
    return Trainer(cfg, init_weights).fit()
