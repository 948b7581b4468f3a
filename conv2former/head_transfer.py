"""The fine-tuning stage's start: a pretrained classifier carried over to the fine-tuning label space, by synset
(``transfer_head``), and the engine's ``init_weights`` that does it (``pretrained_init``).

``synset`` (the default): row i of the new ``pred`` is the pretrained row of the same synset; classes the checkpoint
never saw (ImageNet-1k's n04399382, teddy bear, is not in ImageNet-22k) get a fresh row, as ``reinit`` does.
``reinit``: a fresh head, the model's trunc-normal(0.02) init scaled by ``init_scale`` (config
``finetune.head_init_scale``, 0.001 as ConvNeXt's ``--head_init_scale``), bias zero.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, cast

import torch
import torch.nn as nn

from conv2former.config import TrainConfig
from conv2former.data.shard_format import canonical_synsets
from conv2former.errors import UserError

HEAD_INIT_SCALE = 0.001


@dataclass
class HeadReport:
    mode: str
    mapped: int
    fresh: List[str]
    total: int
    init_scale: float = HEAD_INIT_SCALE

    def line(self) -> str:
        if self.mode == "same":
            return f"head: the checkpoint's {self.total} classes match the data's, kept as is"
        if self.mode == "reinit":
            return f"head: re-initialised for {self.total} classes (trunc-normal 0.02 x {self.init_scale:g})"
        fresh = f" ({', '.join(self.fresh[:5])}{', ...' if len(self.fresh) > 5 else ''})" if self.fresh else ""
        return (
            f"head: {self.mapped} of {self.total} rows mapped by synset from the checkpoint, {len(self.fresh)} fresh"
            f"{fresh} (trunc-normal 0.02 x {self.init_scale:g})"
        )


def checkpoint_classes(classes: Optional[List[str]], num_rows: int) -> Optional[List[str]]:
    """The checkpoint's class list; official checkpoints carry none: timm's 22k or 1k order by row count."""
    if classes is not None:
        return classes
    if num_rows == 21841:
        return list(canonical_synsets("imagenet22k"))
    if num_rows == 1000:
        return list(canonical_synsets("imagenet1k"))
    return None


def transfer_head(
    state_dict: Dict[str, torch.Tensor],
    ckpt_classes: Optional[List[str]],
    classes: List[str],
    model: nn.Module,
    mode: str = "synset",
    init_scale: float = HEAD_INIT_SCALE,
) -> HeadReport:
    """Rewrite ``state_dict['pred.*']`` in place for ``classes``; new rows are ``model``'s fresh head rows (its
    trunc-normal(0.02) init) times ``init_scale``, with zero bias."""
    if mode not in ("synset", "reinit"):
        raise UserError(f"unknown --head {mode!r}: choose synset or reinit")
    if not init_scale >= 0:
        raise UserError(f"finetune.head_init_scale must be >= 0 (ConvNeXt: 0.001), got {init_scale}")
    pred = cast(nn.Linear, model.pred)
    fresh_w = pred.weight.detach().clone() * init_scale
    fresh_b = torch.zeros_like(pred.bias.detach())
    if "pred.weight" not in state_dict:
        raise UserError("the pretrained weights have no classifier (pred.weight): pass --head reinit")
    rows = state_dict["pred.weight"].shape[0]
    ckpt_classes = checkpoint_classes(ckpt_classes, rows)
    if mode == "reinit":
        state_dict["pred.weight"], state_dict["pred.bias"] = fresh_w, fresh_b
        return HeadReport("reinit", 0, list(classes), len(classes), init_scale)
    if ckpt_classes is None:
        raise UserError(
            f"the checkpoint has {rows} classes and no class list (classes.txt beside it), the data has "
            f"{len(classes)}: add its classes.txt or pass --head reinit"
        )
    if len(ckpt_classes) != rows:
        raise UserError(f"the checkpoint's class list has {len(ckpt_classes)} synsets but its head has {rows} rows")
    if ckpt_classes == list(classes):
        return HeadReport("same", rows, [], rows)
    index = {synset: i for i, synset in enumerate(ckpt_classes)}
    mapped = [c for c in classes if c in index]
    if not mapped:
        raise UserError(
            f"the checkpoint's {rows} classes (e.g. {', '.join(ckpt_classes[:3])}) share no synset with "
            f"the data's {len(classes)} classes (e.g. {', '.join(classes[:3])}): pass --head reinit"
        )
    weight, bias = fresh_w, fresh_b
    for i, synset in enumerate(classes):
        j = index.get(synset)
        if j is not None:
            weight[i] = state_dict["pred.weight"][j]
            bias[i] = state_dict["pred.bias"][j]
    state_dict["pred.weight"], state_dict["pred.bias"] = weight, bias
    return HeadReport("synset", len(mapped), [c for c in classes if c not in index], len(classes), init_scale)


def pretrained_init(
    pretrained: str, cfg: TrainConfig, rank: int
) -> Callable[[nn.Module, List[str]], Optional[Dict[str, Any]]]:
    """The fine-tuning stage's ``init_weights`` for the engine: the weights at ``pretrained`` (any format
    conv2former.weights reads) with the head transferred to the data's classes. The weights are read and, where the
    data's class list is at hand, the transfer and the compatibility checks are tried at once on a weightless
    (meta-device) model, so a wrong path or a mismatched checkpoint fails in one line before any process group."""
    import timm

    from conv2former.data.shard_format import read_classes
    from conv2former.engine.metrics import get_logger
    from conv2former.weights import check_compatible, read_weights

    weights = read_weights(pretrained)
    head, scale = cfg.finetune.head, cfg.finetune.head_init_scale
    if os.path.exists(os.path.join(cfg.data.root, "classes.txt")) or "://" in cfg.data.root:
        data_classes = read_classes(cfg.data.root)
        with torch.device("meta"):
            probe = timm.create_model(cfg.model.variant, **cfg.model.create_kwargs(len(data_classes)))
        state = {k: v.to("meta") for k, v in weights.state_dict.items()}
        transfer_head(state, weights.classes, data_classes, probe, head, scale)
        check_compatible(probe, state, pretrained)

    def init_weights(model: nn.Module, classes: List[str]) -> Optional[Dict[str, Any]]:
        state = dict(weights.state_dict)
        report = transfer_head(state, weights.classes, classes, model, head, scale)
        check_compatible(model, state, pretrained)
        model.load_state_dict(state, strict=True)
        get_logger(rank).info(report.line())
        return {"weights": pretrained, "head": asdict(report)}  # the run summary's "initialized_from"

    return init_weights
