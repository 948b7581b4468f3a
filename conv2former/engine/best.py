"""The best evaluation of a run: its top-1, top-5 and when (epochs completed, optimizer step), kept in the checkpoint
so a resumed run knows it; published numbers are the best evaluation over the epochs (ConvNeXt's ``max_accuracy``),
not the last. With ``checkpoint.keep_best`` the trainer writes the weights it was measured on to ``export/best/``."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

KEY = "top1"
RECORD = "evaluation.json"  # beside the weights in export/ and export/best/: the last and best evaluations


class BestEvaluation:
    def __init__(self) -> None:
        self.best: Optional[Dict[str, Any]] = None
        self.unwritten = False  # a new best whose weights are not in export/best/ yet

    def observe(self, result: Dict[str, Any], epoch: int, step: int) -> bool:
        """Take an evaluation; whether it is a new best (strictly higher top-1; the earlier one wins ties)."""
        if not result or KEY not in result:
            return False
        if self.best is not None and result[KEY] <= self.best[KEY]:
            return False
        self.best = {**result, "epoch": epoch, "step": step}
        self.unwritten = True
        return True

    def scalars(self) -> Dict[str, float]:
        """``best_top1`` and ``best_epoch`` for TensorBoard and log.jsonl beside each evaluation."""
        if self.best is None:
            return {}
        return {f"best_{KEY}": self.best[KEY], "best_epoch": self.best["epoch"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        self.best = (state or {}).get("best")
        self.unwritten = False

    def written_step(self, folder: str) -> Optional[int]:
        """The step of the best evaluation that ``folder`` (export/best/) holds, None when it holds none."""
        try:
            with open(os.path.join(folder, RECORD)) as f:
                return json.load(f)["best"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None


def evaluation_record(last: Optional[Dict[str, Any]], best: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What ``evaluation.json`` holds: the last evaluation and the best one (each with its epoch and step)."""
    return {"last": last or None, "best": best}
