"""The host-editor interface: what every editing method provides, and the handle that undoes an edit.

A method names its editable parameters phi_e (`editable`), gives its own loss on a step's environment
outputs (`host_loss`), and may act around each step (`begin_step`, `after_update`, `end_step`). The shared
optimisation loop (`odedit.editstep.run_edit_step`) drives it under either objective, host-only or ODEdit, so
base vs +ODEdit is one config switch and no code path branches on a method name. Methods whose update is not
an optimisation (MEND's hypernetwork, GRACE's codebook writes) override `apply`. The loop and the objectives
see a method only through the Protocols of `odedit.interfaces` (`StepEditor`, `LossEditor`), which
`EditMethod` implements.

`snapshot()` returns an `EditHandle` whose `restore()` puts every tensor the method may change back
bit for bit, and replays the method's own undo callbacks (codebook entries, patch counters).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from odedit.config import MethodConfig
from odedit.editstep import DIRECT, ParamAccess, StepperFactory, StepReport, run_edit_step
from odedit.envs import EditCase
from odedit.objective import Objective
from odedit.risks import reliability_risk

if TYPE_CHECKING:
    from odedit.models.base import ForwardOutput, ModelAdapter


@dataclass
class EditHandle:
    """Undo information of one edit step: saved tensor copies and method-specific undo callbacks."""

    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)
    restored: bool = False

    def restore(self) -> None:
        """Undo the edit exactly: tensors are copied back bit for bit, then callbacks run newest first."""
        with torch.no_grad():
            for live, copy in self.saved:
                live.copy_(copy)
        for fn in reversed(self.undo):
            fn()
        self.restored = True


class EditMethod(ABC):
    """Base class of host editors. Subclasses set `config_cls` and implement `editable`.

    Args:
        adapter: the model adapter (its model is edited in place).
        cfg: the method's config (a `MethodConfig` subclass).
    """

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    # Environments the host loss reads (ODEdit adds its own on top).
    host_envs: ClassVar[tuple[str, ...]] = ("in",)
    default_last_layers: ClassVar[int] = 1
    # True when a step's edits may be split between data-parallel workers: the update depends on the
    # edits only through averaged gradients. Editors that write per-edit state (patches, codebook
    # entries, memories) or weights computed from local gradients run every step in full on every worker.
    sliceable: ClassVar[bool] = False
    # True when the method changes the model only inside its target modules, position by position (no hooks
    # reading other positions), and its host loss reads answer positions only: then an edit of the last
    # layer's FFN output may replay just the positions the losses read (`odedit.models.tail`).
    positionwise: ClassVar[bool] = False
    # Why the method cannot run under DeepSpeed ZeRO-3 at all ("" = it can); `odedit.loading` refuses the
    # combination at load (issue 16 item 3). Config-dependent reasons: override `zero3_problem`.
    zero3_blocker: ClassVar[str] = ""

    @classmethod
    def zero3_problem(cls, cfg: MethodConfig) -> str:
        """Why this method, so configured, cannot run under ZeRO-3 ("" = it can)."""
        return cls.zero3_blocker

    def __init__(self, adapter: ModelAdapter, cfg: MethodConfig) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self._prepared = False

    # ------------------------------------------------------------------------------------------ setup

    @property
    def layers(self) -> list[int]:
        """The configured layers, or the method's default: the last `default_last_layers` layers."""
        if self.cfg.layers:
            return list(self.cfg.layers)
        n = self.adapter.num_layers
        return list(range(max(0, n - self.default_last_layers), n))

    def first_edited_layer(self) -> int | None:
        """The lowest decoder layer whose computation this method changes (None: something below the decoder
        layers, which disables frozen-prefix caching). Default: the lowest configured layer."""
        n = self.adapter.num_layers
        return min(layer % n for layer in self.layers)

    def position_tail(self) -> tuple[nn.Module, nn.Module] | None:
        """(edited module, residual-input module) when this method edits one module kind of the last decoder
        layer only and is `positionwise`, so the step can use `odedit.models.tail.TailRunner`; else None."""
        n = self.adapter.num_layers
        if not self.positionwise or len(self.cfg.modules) != 1 or {layer % n for layer in self.layers} != {n - 1}:
            return None
        return self.adapter.position_tail(self.cfg.modules[0])

    def train_mode_modules(self) -> Sequence[nn.Module]:
        """Modules in train mode during a step's optimisation, everything else in eval mode (issue 17: LoRA's
        dropout). Default none: an edit is deterministic for a seed."""
        return []

    def target_modules(self) -> dict[str, nn.Module]:
        return self.adapter.edit_modules(self.cfg.modules, self.layers)

    def prepare(self) -> None:
        """Install whatever the method adds to the model, freeze everything else. Idempotent."""
        if self._prepared:
            return
        self.install()
        for p in self.adapter.model.parameters():
            p.requires_grad_(False)
        for p in self.editable().values():
            p.requires_grad_(True)
        self._prepared = True

    def install(self) -> None:
        """Add modules or parameters to the model (LoRA factors, patches, side memories); default none."""

    @abstractmethod
    def editable(self) -> Mapping[str, nn.Parameter]:
        """phi_e: the parameters this method updates, by name."""

    # ------------------------------------------------------------------------------------------ one step

    def snapshot(self) -> EditHandle:
        """Undo information for everything the next step may change (default: the editable tensors)."""
        return EditHandle(saved=[(p.data, p.data.detach().clone()) for p in self.editable().values()])

    def begin_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        """Called before the first iteration of a step (e.g. activate patches); register undo on `handle`."""

    def host_loss(self, outs: Mapping[str, ForwardOutput], cases: Sequence[EditCase]) -> torch.Tensor:
        """The host editor's own loss. Default: R_rel (Eq. 2), the NLL of the targets on IN."""
        o = outs["in"]
        return reliability_risk(o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size)

    def host_loss_is_rel(self) -> bool:
        """Whether `host_loss` is this default R_rel on IN (not overridden by the method's class or on it)."""
        return getattr(self.host_loss, "__func__", None) is EditMethod.host_loss

    def after_update(self) -> None:
        """Called after every parameter update (e.g. a norm-constraint projection)."""

    def end_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        """Called after the last iteration of a step (e.g. merge, write a codebook entry)."""

    def apply(
        self,
        cases: Sequence[EditCase],
        objective: Objective,
        stepper_factory: StepperFactory | None,
        access: ParamAccess | None = None,
    ) -> tuple[EditHandle, StepReport]:
        """Edit the model for a step of `cases` under `objective`; returns (handle, StepReport).

        `access` must wrap every direct read or write of phi_e outside forward/backward (DeepSpeed ZeRO keeps
        its own copy of the parameters). Whether a step diverged is the loop's and the objective's call
        (`Objective.rollback_reason`), not the method's.
        """
        return run_edit_step(self, objective, cases, stepper_factory, access or DIRECT)

    # ------------------------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The method's editable state for checkpoints (default: the editable tensors)."""
        return {name: p.detach().cpu().clone() for name, p in self.editable().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        params = self.editable()
        missing = set(params) - set(state)
        unexpected = set(state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match method {self.cfg.name!r}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}; was it written by another method or model?"
            )
        with torch.no_grad():
            for name, p in params.items():
                t = state[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, model has {tuple(p.shape)}"
                    )
                p.copy_(t.to(p.dtype))


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """The full shape of a module's weight, also when ZeRO-3 holds it partitioned (loaded under
    `deepspeed.zero.Init`, its `.shape` is then `(0,)` outside a gather and `ds_shape` keeps the real one)."""
    return getattr(weight, "ds_shape", weight.shape)


def attach_side_module(
    module: nn.Module, name: str, attr: str, build: Callable[[], nn.Module], hook: str, capacity: int, knob: str
) -> nn.Module:
    """The editor's side module `attr` on `module` (GRACE's codebook, WISE's memory): built and hooked into the
    module's forward on first use, found again afterwards; one built with another capacity is refused."""
    side = getattr(module, attr, None)
    if side is None:
        side = build()
        module.add_module(attr, side)
        module.register_forward_hook(getattr(side, hook))
    elif side.capacity != capacity:
        raise ValueError(
            f"{name} already carries a {attr} of capacity {side.capacity}; method.{knob} is {capacity} "
            "(load the model again, or use the same capacity)"
        )
    return side
