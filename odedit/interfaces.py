"""What the edit-step loop and the objectives need of a host editor, as Protocols (after torchtune's
`recipe_interfaces`).

`odedit.editstep` (the inner optimisation loop) and `odedit.objective` (the loss it minimises) see editors only
through these, so they never import `odedit.methods`: the editors sit above them and call them
(`EditMethod.apply` runs `odedit.editstep.run_edit_step`). `odedit.methods.base.EditMethod` implements both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from odedit.config import MethodConfig
    from odedit.envs import EditCase
    from odedit.models.base import ForwardOutput, ModelAdapter


class UndoHandle(Protocol):
    """Undo information of one edit step (`odedit.methods.base.EditHandle`)."""

    def restore(self) -> None:
        """Put back everything the step changed, bit for bit."""


class LossEditor(Protocol):
    """What an objective reads of the host editor: its loss, the environments that loss reads, its parameters."""

    adapter: ModelAdapter
    host_envs: ClassVar[tuple[str, ...]]  # environments `host_loss` reads; an objective adds its own on top

    def editable(self) -> Mapping[str, nn.Parameter]:
        """phi_e: the parameters the editor updates, by name."""

    def host_loss(self, outs: Mapping[str, ForwardOutput], cases: Sequence[EditCase]) -> torch.Tensor:
        """The editor's own loss on one iteration's environment outputs."""

    def host_loss_is_rel(self) -> bool:
        """True when `host_loss` is the default R_rel on IN (Eq. 2), not replaced by the editor's class or on the
        instance: an objective that computes IN's risk anyway may use that value instead of calling it."""


class StepEditor(LossEditor, Protocol):
    """What `odedit.editstep.run_edit_step` drives: set-up, undo, and the hooks around each step and update."""

    cfg: MethodConfig  # n_iter, cache_prefix and cache_tail are read by the loop

    def prepare(self) -> None:
        """Install what the editor adds to the model and freeze everything but phi_e. Idempotent."""

    def snapshot(self) -> UndoHandle:
        """Undo information for everything the next step may change."""

    def begin_step(self, cases: Sequence[EditCase], handle: UndoHandle) -> None:
        """Before the first iteration of a step; undo actions go on `handle`."""

    def after_update(self) -> None:
        """After every parameter update (e.g. a norm-constraint projection)."""

    def end_step(self, cases: Sequence[EditCase], handle: UndoHandle) -> None:
        """After the last iteration of a step (e.g. merge, write a codebook entry)."""

    def first_edited_layer(self) -> int | None:
        """The lowest decoder layer whose computation the editor changes (None: below the decoder layers),
        from which the step replays the model after its first forward pass."""

    def train_mode_modules(self) -> Sequence[nn.Module]:
        """Modules put in train mode while a step optimises (the rest of the model stays in eval mode)."""
        ...

    def position_tail(self) -> tuple[nn.Module, nn.Module] | None:
        """(edited module, residual-input module) when only the last layer's module is edited position by position
        (`odedit.models.tail`); else None."""
