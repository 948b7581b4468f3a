"""The EMA of the weights (timm's ModelEmaV3), kept in fp32 and on every ZeRO stage."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch


class WeightEma:
    """timm's ``ModelEmaV3`` over the engine's module.

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
        if not self.zero3:
            self.ema.update(self.engine.module, step=step)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
            self.ema.update(self.engine.module, step=step)

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)
