"""The export as the Trainer's component: ``OUTPUT/export/`` at the end of training and ``OUTPUT/export/best/``
after each checkpoint that follows a new best evaluation (``checkpoint.keep_best``), each holding the weights of the
checkpoint just written (or resumed): the fp32 master weights gathered from the ZeRO partitions in memory (what
zero_to_fp32 would read back from that checkpoint, without reading it: for Conv2Former-L the read was most of the
export's time), written on rank 0 while the others wait on their own timeout (engine/rank0_work.py), pushed to a
remote output."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from conv2former.engine.batchnorm import BatchNormStats
from conv2former.engine.component import Component
from conv2former.engine.epoch_eval import EpochEvaluation
from conv2former.engine.metrics import Metrics
from conv2former.engine.rank0_work import on_rank0, store_barrier
from conv2former.engine.run_output import RunOutput
from conv2former.export import write_export


class Exporter(Component):
    def __init__(
        self, output: RunOutput, module: torch.nn.Module, evaluation: EpochEvaluation, batchnorm: BatchNormStats,
        ema: Any, classes: List[str], config: Dict[str, Any], keep_best: bool, timeout_minutes: float,
        metrics: Metrics,
    ) -> None:  # fmt: skip
        self.output, self.module, self.evaluation, self.batchnorm = output, module, evaluation, batchnorm
        self.ema, self.classes, self.config, self.keep_best = ema, classes, config, keep_best
        self.timeout_minutes, self.metrics = timeout_minutes, metrics
        self.written: Optional[str] = None  # export/ (rank 0), once written

    def due(self, step: int) -> bool:
        return False  # (it acts after a checkpoint: best_if_due, final)

    def best_due(self, saved_at: int, step: int) -> bool:
        """Whether export/best/ is behind: the best evaluation is at ``step``, checkpointed there, not exported."""
        best = self.evaluation.best
        return bool(
            self.keep_best and best.unwritten and best.best is not None and best.best["step"] == saved_at == step
        )

    def resumed(self, step: int, rank: int, world_size: int) -> None:
        """A run stopped between writing the checkpoint after a new best and writing export/best/: write it from that
        checkpoint (the one resumed) at the first export point. Rank 0 reads export/best/ and tells the others."""
        best = self.evaluation.best
        if not (self.keep_best and best.best is not None and best.best["step"] == step):
            return
        folder = os.path.join(self.output.local, "export", "best")
        missing = [best.written_step(folder) != best.best["step"] if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(missing, src=0)
        best.unwritten = bool(missing[0])

    def best_if_due(self, saved_at: int, epoch: int, step: int) -> None:
        """``export/best/`` from the checkpoint just written, when the evaluation before it was a new best."""
        if self.best_due(saved_at, step):
            self._write(["export/best"], epoch, step)

    def final(self, saved_at: int, epoch: int, step: int) -> None:
        """``export/`` (and ``export/best/`` when the last evaluation was the best) from the checkpoint just
        written."""
        self.written = self._write(["export"] + (["export/best"] if self.best_due(saved_at, step) else []), epoch, step)

    def _write(self, folders: List[str], epoch: int, step: int) -> Optional[str]:
        """Each of ``folders`` (under OUTPUT) with the weights the newest checkpoint holds, written on rank 0 while the
        others wait (their own timeout, not the collective one); returns the first's path (rank 0)."""
        dist.barrier()
        record = self.evaluation.record(epoch, step)
        with self.batchnorm.averaged():  # (all ranks take part) the model and the EMA as checkpointed
            weights = fp32_weights(self.module)  # (collectives)
            ema = self.ema.state_dict() if self.ema is not None else None  # (ZeRO-3: a collective)
            paths = on_rank0(lambda: self._export_to(folders, weights, ema, record), self.timeout_minutes)
        line = self.output.push_files()
        if line:
            self.metrics.warn(line)
        store_barrier(self.timeout_minutes)  # (rank 0 pushed the exports to a remote root)
        if "export/best" in folders:
            self.evaluation.best.unwritten = False
        return paths[0] if paths else None

    def _export_to(
        self, folders: List[str], weights: Dict[str, torch.Tensor], ema: Optional[Dict[str, Any]],
        record: Dict[str, Any],
    ) -> List[str]:  # fmt: skip
        """(rank 0) ``weights`` (and the EMA's) written to each folder."""
        return [
            write_export(self.output.local, weights, self.classes, self.config, ema, record, folder)
            for folder in folders
        ]

    def summary(self) -> Dict[str, Any]:
        return {"export": self.output.shown(self.written)}


def fp32_weights(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """(every rank, in the same order: collectives) The model's state_dict in fp32 on the CPU, as zero_to_fp32 reads
    it from a checkpoint of this moment: each parameter's fp32 master copy assembled from the ZeRO partitions by
    DeepSpeed (``safe_get_full_fp32_param``: ZeRO 1-3 and its bf16 optimizer), the module's own value where
    DeepSpeed keeps no master copy (no ZeRO: the module is the master), the buffers (BatchNorm statistics) as the
    module holds them. Keys as a checkpoint's, without ``module.``/``_orig_mod.`` prefixes."""
    from deepspeed.utils import safe_get_full_fp32_param

    from conv2former.weights import unwrap_state_dict

    params = dict(module.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        full = safe_get_full_fp32_param(params[name]) if name in params else None
        if full is None and hasattr(value, "ds_id"):  # (ZeRO-3 keeps no master copy of a frozen parameter)
            raise RuntimeError(f"the export cannot gather {name}: a ZeRO-3 parameter without an fp32 master copy")
        tensor = (full if full is not None else value).detach()
        out[name] = (tensor.float() if tensor.is_floating_point() else tensor).cpu()
    return unwrap_state_dict(out)


def export_initial(
    output: RunOutput, model: torch.nn.Module, classes: List[str], config: Dict[str, Any], rank: int
) -> Optional[str]:
    """``--max-steps 0`` (fine-tuning): the initial (transferred) model as ``OUTPUT/export/`` (rank 0)."""
    return write_export(output.local, model.state_dict(), classes, config) if rank == 0 else None
