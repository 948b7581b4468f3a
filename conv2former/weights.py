"""Read Conv2Former weights from wherever they live and load them into a model, safely.

Accepted sources (any fsspec path or URL):
  * an official ``.pth``/``.pt``/``.bin`` (a raw state_dict, or wrapped under ``model``/``state_dict``/``module``),
    read with ``torch.load(weights_only=True)``: nothing in the file can run code;
  * our exported ``model.safetensors`` (or an export directory holding one);
  * a DeepSpeed checkpoint directory (the run's ``checkpoints/`` with ``latest``, or one ``global_stepN`` tag).
    ZeRO 1-3 checkpoints are consolidated to fp32 by DeepSpeed's ``zero_to_fp32`` after every file was checked to
    reference no Python globals beyond DeepSpeed's own plain data classes; stage 0 reads the module states.

A ``classes.txt`` beside the weights (synsets in head order) is returned with them.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import fsspec
import torch
import torch.nn as nn

from conv2former.errors import UserError

__all__ = [
    "Weights",
    "read_weights",
    "load_checkpoint",
    "unwrap_state_dict",
    "describe_architecture",
    "check_compatible",
    "matching_variants",
]

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
# The only Python globals a DeepSpeed checkpoint may reference (all plain data: an Enum, a namedtuple, a scaler).
_DEEPSPEED_SAFE_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
}


@dataclass
class Weights:
    """A state_dict with official key names, and the class list of its head when one was found beside it."""

    state_dict: Dict[str, torch.Tensor]
    classes: Optional[List[str]]
    source: str


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Find the state_dict in a checkpoint object and strip ``module.``/``_orig_mod.`` prefixes."""
    while isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
        raise UserError(
            "checkpoint holds no model state_dict (expected tensors at the top level or under "
            f"{'/'.join(_WRAPPER_KEYS)})"
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _looks_like_state_dict(obj: Mapping[str, Any]) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read_classes(fs: fsspec.AbstractFileSystem, folder: str) -> Optional[List[str]]:
    path = posixpath.join(folder, "classes.txt")
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return [line.strip() for line in f if line.strip()]


def read_weights(path: str) -> Weights:
    """Read weights from a ``.pth``, a ``.safetensors``, an export directory (also written ``local-dir:DIR``, as
    timm names it) or a DeepSpeed checkpoint directory."""
    if str(path).startswith("local-dir:"):
        path = str(path)[len("local-dir:") :]
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    if not fs.exists(fs_path):
        raise UserError(
            f"weights not found: {path} (give a .pth, a model.safetensors, an export dir or a checkpoint dir)"
        )
    if fs.isdir(fs_path):
        export = posixpath.join(fs_path, "model.safetensors")
        nested_export = posixpath.join(fs_path, "export", "model.safetensors")
        for candidate in (export, nested_export):
            if fs.exists(candidate):
                return _read_safetensors(fs, candidate, path)
        checkpoints = posixpath.join(fs_path, "checkpoints")
        ds_dir = checkpoints if fs.isdir(checkpoints) else fs_path
        return _read_deepspeed_dir(fs, ds_dir, path)
    if fs_path.endswith(".safetensors"):
        return _read_safetensors(fs, fs_path, path)
    return _read_torch_file(fs, fs_path, path)


def _read_safetensors(fs: fsspec.AbstractFileSystem, fs_path: str, shown: str) -> Weights:
    from safetensors.torch import load as load_safetensors

    with fs.open(fs_path, "rb") as f:
        data = f.read()
    try:
        state_dict = load_safetensors(data)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read {shown} as safetensors: {err}") from None
    return Weights(state_dict, _read_classes(fs, posixpath.dirname(fs_path)), shown)


def _read_torch_file(fs: fsspec.AbstractFileSystem, fs_path: str, shown: str) -> Weights:
    with fs.open(fs_path, "rb") as f:
        data = io.BytesIO(f.read())
    try:
        obj = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot read {shown} as a PyTorch checkpoint with weights_only=True ({first_line[:160]}); "
            "only tensors and plain containers are accepted"
        ) from None
    return Weights(unwrap_state_dict(obj), _read_classes(fs, posixpath.dirname(fs_path)), shown)


def _deepspeed_tag_dir(fs: fsspec.AbstractFileSystem, ds_dir: str, shown: str) -> Tuple[str, str]:
    """Return (checkpoint root, tag) for a DeepSpeed checkpoint root or a single tag directory."""
    names = [posixpath.basename(p) for p in fs.ls(ds_dir, detail=False)]
    if any(n.endswith("model_states.pt") for n in names):
        return posixpath.dirname(ds_dir.rstrip("/")), posixpath.basename(ds_dir.rstrip("/"))
    latest = posixpath.join(ds_dir, "latest")
    if fs.exists(latest):
        with fs.open(latest, "r") as f:
            return ds_dir, f.read().strip()
    tags = sorted((n for n in names if re.fullmatch(r"global_step\d+", n)), key=lambda n: int(n[len("global_step") :]))
    if tags:
        return ds_dir, tags[-1]
    raise UserError(
        f"{shown} is a directory without model.safetensors, a DeepSpeed 'latest' file or global_step* checkpoints"
    )


def _read_deepspeed_dir(fs: fsspec.AbstractFileSystem, ds_dir: str, shown: str) -> Weights:
    root, tag = _deepspeed_tag_dir(fs, ds_dir, shown)
    tag_dir = posixpath.join(root, tag)
    if not fs.isdir(tag_dir):
        raise UserError(f"{shown}: the checkpoint tag {tag!r} named by 'latest' does not exist")
    classes = _read_classes(fs, tag_dir) or _read_classes(fs, root)
    with tempfile.TemporaryDirectory(prefix="c2f-ds-") as tmp:
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            local_root = root
        else:  # DeepSpeed reads local files only: copy the one tag down
            local_root = tmp
            fs.get(tag_dir, os.path.join(tmp, tag), recursive=True)
        local_tag = os.path.join(local_root, tag)
        files = sorted(f for f in os.listdir(local_tag) if f.endswith(".pt"))
        for name in files:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(local_tag, name)))
            if unsafe - _DEEPSPEED_SAFE_GLOBALS:
                raise UserError(
                    f"{shown}: {name} references Python objects {sorted(unsafe - _DEEPSPEED_SAFE_GLOBALS)}; "
                    "refusing to unpickle it (export the weights to safetensors where the checkpoint was made)"
                )
        model_states = [f for f in files if f.endswith("model_states.pt")]
        if not model_states:
            raise UserError(f"{shown}: no *model_states.pt in checkpoint {tag}")
        states = torch.load(os.path.join(local_tag, model_states[0]), map_location="cpu", weights_only=True)
        has_zero_partitions = any("optim_states" in f for f in files) and states.get("param_shapes")
        if has_zero_partitions:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            try:
                state_dict = get_fp32_state_dict_from_zero_checkpoint(local_root, tag=tag)
            except ValueError as err:  # "... is not a zero checkpoint": BF16_Optimizer's (bf16 + fp32 accumulation)
                if "not a zero checkpoint" not in str(err):
                    raise
                state_dict = _fp32_from_bf16_optimizer(local_tag, states["module"], shown)
        else:  # ZeRO stage 0 (no partitions): the module states hold the weights
            state_dict = states["module"]
        state_dict = unwrap_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
        client_classes = states.get("classes")
        if classes is None and isinstance(client_classes, list):
            classes = [str(c) for c in client_classes]
    return Weights(state_dict, classes, shown)


def _fp32_from_bf16_optimizer(tag_dir: str, module: Dict[str, torch.Tensor], shown: str) -> Dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint written by DeepSpeed's ``BF16_Optimizer`` (bf16 training with fp32
    gradient accumulation at ZeRO-1), whose files ``zero_to_fp32`` cannot read: DeepSpeed's own universal-checkpoint
    converter turns them into one fp32 tensor per parameter; the buffers (BatchNorm statistics, fp32) come from the
    module states."""
    with tempfile.TemporaryDirectory(prefix="c2f-universal-") as out:
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
             "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise UserError(f"{shown}: DeepSpeed could not convert its bf16 optimizer state to fp32 weights ({last})")
        zero = os.path.join(out, "zero")
        params = {}
        for name in os.listdir(zero):
            path = os.path.join(zero, name, "fp32.pt")
            if os.path.isfile(path):  # (beside them: optimizer_state.pt)
                saved = torch.load(path, map_location="cpu", weights_only=True)
                params[name] = saved["param"] if isinstance(saved, dict) else saved
    # (the converter writes every entry as fp32: integer buffers such as BatchNorm's batch count keep the module's)
    return {**module, **{k: v for k, v in params.items() if k not in module or module[k].is_floating_point()}}


def describe_architecture(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short description of the Conv2Former a state_dict belongs to (dims, depths, kernel, classes)."""
    parts = []
    dims = [
        state_dict[f"stages.{i}.0.layer_scale_1"].shape[0]
        for i in range(4)
        if f"stages.{i}.0.layer_scale_1" in state_dict
    ]
    depths = Counter(int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.(\d+)\.layer_scale_1$", k)))
    if dims:
        parts.append(f"dims {','.join(map(str, dims))}")
        parts.append(f"depths {','.join(str(depths[i]) for i in sorted(depths))}")
    kernel = state_dict.get("stages.0.0.attn.att.2.weight")
    if kernel is not None:
        parts.append(f"kernel {kernel.shape[-1]}")
    pred = state_dict.get("pred.weight")
    if pred is not None:
        parts.append(f"{pred.shape[0]} classes")
    return ", ".join(parts) if parts else f"{len(state_dict)} tensors with unrecognised names"


def _model_architecture(model: nn.Module) -> str:
    return describe_architecture(model.state_dict())


def matching_variants(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """The registered variants whose backbone (everything but the head) has exactly these tensor names and shapes."""
    import timm

    from conv2former.model import VARIANTS

    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("pred.")}
    found = []
    kernel = state_dict.get("stages.0.0.attn.att.2.weight", state_dict.get("blocks.0.attn.att.2.weight"))
    for name in VARIANTS:
        kwargs: Dict[str, Any] = {"kernel_size": kernel.shape[-1]} if kernel is not None else {}
        with torch.device("meta"):
            model = timm.create_model(name, **kwargs)
        own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("pred.")}
        if own == shapes:
            found.append(name)
    return found


def check_compatible(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    skip_head: bool = False,
    hint: str = "pick the matching --variant",
) -> None:
    """Raise a one-line ``UserError`` unless ``state_dict`` loads into ``model`` with ``strict=True`` (with
    ``skip_head``: unless everything but the classifier does)."""
    own = model.state_dict()
    if skip_head:
        own = {k: v for k, v in own.items() if not k.startswith("pred.")}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("pred.")}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if not missing and not unexpected and not mismatched:
        return
    head_only = set(missing + unexpected + mismatched) <= {"pred.weight", "pred.bias"}
    if head_only and "pred.weight" in state_dict:
        ckpt_classes = state_dict["pred.weight"].shape[0]
        model_classes = getattr(model, "num_classes", "?")
        raise UserError(
            f"checkpoint {source} has {ckpt_classes} classes, model has {model_classes}: pass "
            f"num_classes={ckpt_classes} or use finetune's head transfer"
        )
    kernel_only = not missing and not unexpected and all(k.endswith("attn.att.2.weight") for k in mismatched)
    if kernel_only:
        ckpt_k, model_k = state_dict[mismatched[0]].shape[-1], own[mismatched[0]].shape[-1]
        raise UserError(
            f"checkpoint {source} uses {ckpt_k}x{ckpt_k} modulation kernels, model has {model_k}x{model_k}: "
            f"pass kernel_size={ckpt_k}"
        )
    variants = matching_variants(state_dict)
    known = f" ({' or '.join(variants)})" if variants else ""
    raise UserError(
        f"checkpoint {source} does not fit this model: checkpoint is {describe_architecture(state_dict)}{known}; "
        f"model is {_model_architecture(model)} ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} mis-shaped tensors, e.g. {(missing + unexpected + mismatched)[0]}); {hint}"
    )


def load_checkpoint(model: nn.Module, path: str) -> Weights:
    """Load weights from ``path`` into ``model`` with ``strict=True``; returns what was read (with its class list)."""
    weights = read_weights(path)
    check_compatible(model, weights.state_dict, str(path))
    model.load_state_dict(weights.state_dict, strict=True)
    return weights
