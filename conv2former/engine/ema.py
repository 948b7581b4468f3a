"""The EMA of the weights (timm's ModelEmaV3), kept in fp32 and on every ZeRO stage."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch


class WeightEma:
    """timm's ``ModelEmaV3`` over the engine's module (its decay and warmup), with the update written here: the
    average is fp32 and the model bf16/fp16 under DeepSpeed, a mix timm's own update rejects before 1.0.29
    (``_foreach_lerp_`` of fp32 with bf16); here each model value is cast to the average's dtype first.

    Under ZeRO-3 the parameters are partitioned, so the average is a full copy built from the gathered weights and
    updated inside ``GatheredParameters``. The average lives in fp32 whatever the training precision: in bf16 (8-bit
    mantissa) an update of (1 - 0.9999) x (w - ema) rounds away and the EMA would silently stay at its first value.
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

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)
