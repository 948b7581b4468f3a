"""The EMA of the weights (timm's decay schedule), kept in fp32, on every ZeRO stage: a full copy at ZeRO 0-2
(``WeightEma``), each rank's own partition at ZeRO-3 (``ShardedEma``)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List

import torch
import torch.distributed as dist

from conv2former.engine.component import Component
from conv2former.engine.state import CheckpointState


class _EmaComponent(Component):
    """The EMA as the Trainer's component: checkpointed as ``ema``, updated after every optimizer step."""

    def register(self, state: CheckpointState) -> None:
        state.register("ema", self)

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        self.update(step)

    def update(self, step: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError


class WeightEma(_EmaComponent):
    """timm's ``ModelEmaV3`` over the engine's module (its decay and warmup), with the update written here: the
    average is fp32 and the model bf16/fp16 under DeepSpeed, a mix timm's own update rejects before 1.0.29
    (``_foreach_lerp_`` of fp32 with bf16); here each model value is cast to the average's dtype first.

    The average lives in fp32 whatever the training precision: in bf16 (8-bit mantissa) an update of
    (1 - 0.9999) x (w - ema) rounds away and the EMA would silently stay at its first value. ZeRO-3 uses
    ``ShardedEma`` (``make_ema``); ``zero3=True`` here keeps a full copy updated inside ``GatheredParameters`` (an
    all-gather of the whole model every step: the reference the sharded one is tested against).
    """

    def __init__(
        self,
        engine: Any,  # the deepspeed.DeepSpeedEngine
        make_model: Callable[[], torch.nn.Module],
        decay: float,
        warmup: bool,
        device: torch.device,
        zero3: bool,
    ) -> None:
        import deepspeed
        from timm.utils import ModelEmaV3

        self.engine, self.zero3 = engine, zero3
        if zero3:
            full = make_model()
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                full.load_state_dict(engine.module.state_dict())
            self.ema = ModelEmaV3(full.to(device), decay=decay, device=device, use_warmup=warmup)
        else:
            self.ema = ModelEmaV3(engine.module, decay=decay, device=device, use_warmup=warmup)
        self.ema.module.float()

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def update(self, step: int) -> None:
        decay = self.ema.get_decay(step)
        if not self.zero3:
            self._apply(self.engine.module, decay)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            self._apply(self.engine.module, decay)

    @torch.no_grad()
    def _apply(self, model: torch.nn.Module, decay: float) -> None:
        """ema = ema + (1 - decay) (model - ema) for floating-point values (in the average's dtype, fp32); other
        buffers (BatchNorm's batch count) copied, as timm does."""
        averaged, current = [], []
        for ema_v, model_v in zip(self.ema.module.state_dict().values(), model.state_dict().values()):
            model_v = model_v.to(device=ema_v.device)
            if ema_v.is_floating_point():
                averaged.append(ema_v)
                current.append(model_v.to(dtype=ema_v.dtype))
            else:
                ema_v.copy_(model_v)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight=1.0 - decay)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """The average as a module (to evaluate it)."""
        yield self.ema.module

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)


class ShardedEma(_EmaComponent):
    """The ZeRO-3 EMA: each rank averages, in fp32, its own partition of every parameter (``ds_tensor``, the same
    slice DeepSpeed keeps on that rank), with no communication per step; the buffers (BatchNorm statistics) are small
    and kept whole. The whole average is gathered only to evaluate it (``gathered``) and to save it (``state_dict``,
    a collective: every rank calls it, as the engine's checkpoint does). ``module`` is the model's skeleton with the
    whole buffers; its parameters hold values only inside ``gathered``.
    """

    def __init__(
        self, engine: Any, make_model: Callable[[], torch.nn.Module], decay: float, warmup: bool, device: torch.device
    ) -> None:
        from timm.utils import ModelEmaV3

        self.schedule = ModelEmaV3(torch.nn.Linear(1, 1), decay=decay, use_warmup=warmup)  # (its get_decay only)
        named = list(engine.module.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.parts = [param.ds_tensor.detach().to(device=device, dtype=torch.float32).clone() for param in self.params]
        with torch.device("meta"):
            skeleton = make_model()
        self.module = skeleton.to_empty(device=device).float().eval()
        for mine, theirs in zip(self.module.buffers(), engine.module.buffers()):
            mine.copy_(theirs)
        self.engine, self.device = engine, device
        self._release()

    def _release(self) -> None:
        for param in self.module.parameters():
            param.data = torch.empty(0, device=self.device)

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.schedule.get_decay(step)
        current = [param.ds_tensor.to(dtype=torch.float32) for param in self.params]
        torch._foreach_lerp_(self.parts, current, weight=1.0 - decay)
        for mine, theirs in zip(self.module.buffers(), self.engine.module.buffers()):
            if mine.is_floating_point():
                mine.lerp_(theirs.to(mine.dtype), 1.0 - decay)
            else:
                mine.copy_(theirs)

    def _whole(self) -> List[torch.Tensor]:
        """Every parameter's average, all-gathered from the ranks' partitions (a collective)."""
        out = []
        for param, part in zip(self.params, self.parts):
            flat = torch.empty(part.numel() * dist.get_world_size(), dtype=part.dtype, device=part.device)
            dist.all_gather_into_tensor(flat, part)
            out.append(flat[: param.ds_numel].view(param.ds_shape))
        return out

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """The whole average as a module, for the duration of the block (every rank)."""
        for target, value in zip(self.module.parameters(), self._whole()):
            target.data = value
        try:
            yield self.module
        finally:
            self._release()

    def state_dict(self) -> Dict[str, Any]:
        """The whole average (parameters and buffers by name, as the unsharded EMA saves it); a collective."""
        whole = dict(zip(self.names, self._whole()))
        return {name: whole.get(name, value) for name, value in self.module.state_dict().items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Take this rank's partition of each whole parameter, and the buffers."""
        rank, world = dist.get_rank(), dist.get_world_size()
        for name, part in zip(self.names, self.parts):
            flat = state[name].to(device=part.device, dtype=torch.float32).flatten()
            flat = torch.nn.functional.pad(flat, (0, part.numel() * world - flat.numel()))
            part.copy_(flat[rank * part.numel() : (rank + 1) * part.numel()])
        buffers = dict(self.module.named_buffers())
        for name, value in state.items():
            if name in buffers:
                buffers[name].copy_(value)


def make_ema(
    engine: Any,
    make_model: Callable[[], torch.nn.Module],
    decay: float,
    warmup: bool,
    device: torch.device,
    zero3: bool,
) -> Any:
    """The EMA for this engine: each rank's partition at ZeRO-3, a full fp32 copy otherwise."""
    if zero3:
        return ShardedEma(engine, make_model, decay, warmup, device)
    return WeightEma(engine, make_model, decay, warmup, device, zero3=False)
