"""FT-L: fine-tune the weights of the configured layers' modules (EasyEdit's FT-L, MMEdit's FT baseline).

With `norm_constraint > 0` every edited weight is projected back into an L-inf ball of that radius around
its value at the start of the step after each update (EasyEdit's `norm_constraint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import non_negative, option
from odedit.envs import EditCase
from odedit.methods.base import EditHandle, EditMethod
from odedit.methods.registry import register_method


@dataclass(frozen=True)
class FTConfig(MethodConfig):
    name: str = option("ft", help="host editor")
    norm_constraint: float = option(
        0.0, help="max |w - w_start| per weight after each update; 0 = off", check=non_negative
    )
    with_bias: bool = option(False, help="also edit the modules' biases")


class FT(EditMethod):
    """Fine-tuning of selected language-model modules."""

    sliceable = True  # the update depends on the step's edits only through averaged gradients
    positionwise = True  # a weight (or low-rank) change of its modules; loss R_rel on answer positions

    config_cls = FTConfig

    def __init__(self, adapter, cfg: FTConfig) -> None:
        super().__init__(adapter, cfg)
        self._start: list[tuple[torch.Tensor, torch.Tensor]] = []

    def editable(self) -> Mapping[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for name, module in self.target_modules().items():
            out[f"{name}.weight"] = module.weight
            if self.cfg.with_bias and getattr(module, "bias", None) is not None:
                out[f"{name}.bias"] = module.bias
        return out

    def begin_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        if self.cfg.norm_constraint > 0:
            self._start = [(p, p.detach().clone()) for p in self.editable().values()]

    def after_update(self) -> None:
        if self.cfg.norm_constraint > 0:
            eps = self.cfg.norm_constraint
            with torch.no_grad():
                for p, p0 in self._start:
                    p.copy_(torch.minimum(torch.maximum(p, p0 - eps), p0 + eps))

    def end_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        self._start = []


register_method("ft", FTConfig, FT)
