"""LoRA host editor: low-rank adapters on the configured modules, trained per edit step (PEFT's LoRA layers).

The adapters are injected once (`install`, via `peft.inject_adapter_in_model`); phi_e is the set of LoRA
factors. B starts at zero, so the installed model computes exactly what the base model computes. In sequential
mode the factors accumulate edits; `restore()` puts them back bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import in_range, option, positive
from odedit.methods.base import EditMethod
from odedit.methods.registry import register_method


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    name: str = option("lora", help="host editor")
    rank: int = option(8, help="LoRA rank r", check=positive)
    alpha: float = option(16.0, help="LoRA scaling alpha (update scaled by alpha / r)", check=positive)
    dropout: float = option(
        0.0,
        help="LoRA dropout on the adapters' input, active during each edit's optimisation only (evaluation runs "
        "without it)",
        check=in_range(0.0, 0.9),
    )


class LoRA(EditMethod):
    """Low-rank adaptation of selected language-model modules."""

    sliceable = True  # the update depends on the step's edits only through averaged gradients
    positionwise = True  # a weight (or low-rank) change of its modules; loss R_rel on answer positions

    config_cls = LoRAConfig
    ADAPTER_NAME = "odedit"

    def install(self) -> None:
        # deferred: peft is needed only when a LoRA editor is installed
        from peft import LoraConfig, inject_adapter_in_model

        names = list(self.target_modules())
        if any(f"lora_A.{self.ADAPTER_NAME}" in n for n, _ in self.adapter.model.named_parameters()):
            return  # already installed on this model (a second Editor over the same model)
        config = LoraConfig(
            r=self.cfg.rank, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout, target_modules=names, bias="none"
        )
        inject_adapter_in_model(config, self.adapter.model, adapter_name=self.ADAPTER_NAME)

    def train_mode_modules(self) -> list[nn.Module]:
        """PEFT's dropout modules of this adapter when `dropout` > 0 (issue 17: the knob took no effect while the
        whole model ran in eval mode); only dropout layers, so nothing else changes behaviour."""
        if self.cfg.dropout <= 0:
            return []
        wanted = tuple(self.target_modules())
        return [
            m
            for n, m in self.adapter.model.named_modules()
            if isinstance(m, nn.Dropout) and n.startswith(wanted) and n.endswith(f"lora_dropout.{self.ADAPTER_NAME}")
        ]

    def editable(self) -> Mapping[str, nn.Parameter]:
        wanted = tuple(self.target_modules())
        return {
            n: p
            for n, p in self.adapter.model.named_parameters()
            if "lora_" in n and self.ADAPTER_NAME in n and n.startswith(wanted)
        }


register_method("lora", LoRAConfig, LoRA)
