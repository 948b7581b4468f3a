"""The training scalars, as the Trainer's component: the bar moves every optimizer step; every
``logging.print_every`` steps (and the first) the window's loss, lr, grad norm, throughput, timings and memory go to
the sinks (TensorBoard, log.jsonl, ...) with the depthwise formulations measured since the last record. Nothing
here waits for the device between records: the step's loss is read only when recorded."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from conv2former.engine.component import Component
from conv2former.engine.metrics import Metrics, memory_mb


class TrainingLog(Component):
    def __init__(
        self, metrics: Metrics, engine: Any, device: torch.device, loader: Any, global_batch: int, print_every: int,
        depthwise: Any, fp16: bool,
    ) -> None:  # fmt: skip
        self.device = device
        self.metrics, self.engine, self.loader, self.depthwise, self.fp16 = metrics, engine, loader, depthwise, fp16
        self.global_batch, self.print_every = global_batch, print_every
        self.last_loss = float("nan")  # the newest recorded loss
        self.step_loss: Optional[torch.Tensor] = None  # the newest step's loss, on the device

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.step_loss = loss
        self.metrics.step_done()
        if step % self.print_every == 0 or step == 1:
            self.record(step, loss)
            for line in self.depthwise.new_measurements():
                self.metrics.note("depthwise measured " + line)

    def record(self, step: int, loss: torch.Tensor) -> None:
        window = self.metrics.window()
        self.last_loss = loss.item()
        grad_norm = self.engine.get_global_grad_norm()
        epoch = self.loader.epoch
        values: Dict[str, float] = {
            "loss": self.last_loss,
            "lr": max(g["lr"] for g in self.engine.optimizer.param_groups),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "images_per_s": self.global_batch / window["step_time"],
            **window,
            "memory_mb": memory_mb(self.device),
            "epoch": epoch,
            "image_size": self.loader.image_size(),
        }
        sizes = self.loader.sizes
        if sizes is not None and sizes.regularization is not None:
            values["augment_strength"] = sizes.strength(epoch)
        if sizes is not None and sizes.scale_batch:
            values["micro_batch"] = self.loader.batch_size
        if self.fp16:  # DeepSpeed's dynamic loss scale (halved at each overflow skip)
            values["loss_scale"] = float(self.engine.optimizer.loss_scale)
        self.metrics.scalars(step, values)
        self.metrics.show(loss=f"{self.last_loss:.3f}", img_s=f"{values['images_per_s']:.0f}", epoch=str(epoch))
        self.metrics.restart_window()

    def end(self) -> None:
        """Training stopped (finished, diverged or preempted): the bar closed, the newest step's loss read."""
        self.metrics.close_bar()
        if self.step_loss is not None:
            self.last_loss = self.step_loss.item()

    def summary(self) -> Dict[str, Any]:
        return {"loss": self.last_loss}
