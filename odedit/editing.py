"""The in-process editing API: a host editor (+ ODEdit or not) and its objective, bound to one model.

    editor = Editor(adapter, cfg)
    handle, report = editor.edit(cases)     # one step: all `cases` edited jointly; handle.restore() undoes it

Streams of steps (single or sequential mode, retention, checkpoints) are `odedit.stream.StreamRunner`'s. Ray
Train workers use exactly this class (with a DeepSpeed stepper and their slice of each step).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from odedit.config import Config
from odedit.editstep import DIRECT, ParamAccess, StepperFactory, StepReport, torch_stepper_factory
from odedit.envs import EditCase
from odedit.methods import METHODS
from odedit.methods.base import EditHandle, EditMethod
from odedit.models.base import ModelAdapter
from odedit.objective import Objective, build_objective


class Editor:
    """A host editor and its objective bound to one model.

    Args:
        adapter: the model to edit (in place).
        cfg: the whole config (method, odedit, model pooling, data.with_hard_in_training).
        stepper_factory: how phi_e moves; default a torch optimiser per `cfg.method` / `cfg.odedit`.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        cfg: Config,
        stepper_factory: StepperFactory | None = None,
        access: ParamAccess | None = None,
    ) -> None:
        self.adapter = adapter
        self.cfg = cfg
        spec = METHODS.get(cfg.method.name)
        self.method: EditMethod = spec.method_cls(adapter, cfg.method)
        self.method.prepare()
        self.objective: Objective = build_objective(
            cfg.odedit, self.method, with_hard=cfg.data.with_hard_in_training, pooling=cfg.model.pooling, seed=cfg.seed
        )
        self.stepper_factory = stepper_factory or torch_stepper_factory(cfg.method, cfg.odedit)
        # Replaced by the distributed engine under DeepSpeed ZeRO; `access` is how the parameters are read before
        # that (gathered, for a model loaded partitioned under ZeRO-3: issue 16 item 2).
        self.access: ParamAccess = access or DIRECT
        # Streams of sequences of T edits (stream.sequence_length) go back to this state after each sequence.
        # Taken here, before the engine wires DeepSpeed or loads a checkpoint, so it is the pre-edit state.
        seq = cfg.stream.mode == "sequential" and cfg.stream.sequence_length > 0
        self._origin: dict[str, Any] | None = _detached(self.state_dict()) if seq else None

    def edit(self, cases: Sequence[EditCase]) -> tuple[EditHandle, StepReport]:
        """Apply one step: all `cases` edited jointly. Returns the undo handle and the step report.

        The handle undoes the whole step, the objective's state (ODEdit's lambda-network) included: a step rolled
        back for a runaway lambda leaves lambda where the step found it (before, every later step of the stream
        started from the runaway lambda and was rolled back at its first iteration), and a single edit's
        `restore()` returns the editor to exactly its state before the edit.
        """
        saved = _detached(self.objective.state_dict())
        handle, report = self.method.apply(cases, self.objective, self.stepper_factory, self.access)
        undo = partial(self.objective.load_state_dict, saved)
        if report.failed is not None:
            undo()  # the method already restored its own parameters
        handle.undo.append(undo)
        return handle, report

    def state_dict(self) -> dict[str, Any]:
        """Editable state + objective state (lambda-network), for checkpoints."""
        with self.access.modify(list(self.method.editable().values())):
            method = self.method.state_dict()
        return {"method": method, "objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.access.modify(list(self.method.editable().values())):
            self.method.load_state_dict(state["method"])
        self.objective.load_state_dict(state["objective"])

    def reset(self) -> None:
        """Back to the pre-edit model and a fresh objective state (the end of a sequence of T edits)."""
        if self._origin is None:
            raise RuntimeError("Editor.reset needs stream.mode=sequential with stream.sequence_length > 0")
        self.load_state_dict(self._origin)


def _detached(state: Any) -> Any:
    """A deep copy of a state dict's tensors (so later in-place edits do not reach it)."""
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_detached(v) for v in state]
    if hasattr(state, "detach"):
        return state.detach().clone()
    return state


def step_report_fields(report: StepReport) -> dict[str, Any]:
    """The per-edit columns a step report contributes to result rows (the `final_*` ones: the step's last
    iteration; `target_prob`: the IN targets' probability on the model the step left, issue 17)."""
    final = report.final
    return {
        "failed": report.failed or "",
        "iterations": report.iterations,
        "stopped_early": report.stopped_early,
        "edit_seconds": report.seconds,
        "target_prob": report.target_prob,
        "final_loss": final.get("loss", final.get("host", float("nan"))),
        "final_lambda": final.get("lambda", float("nan")),
        "final_penalty": final.get("penalty", float("nan")),
        "final_host": final.get("host", float("nan")),
        "final_r_loc": final.get("r_loc", float("nan")),
        "final_r_gen": final.get("r_gen", float("nan")),
    }


def step_metrics(report: StepReport) -> dict[str, float]:
    """What a stream logs per step (issue 17): the last iteration's parts (host loss, R_loc, R_gen, penalty,
    lambda, each environment's risk and omega-slope), the iterations taken and the target's probability after
    them. Names under `edit/`."""
    values: dict[str, float] = {f"edit/{k}": v for k, v in report.final.items()}
    values["edit/iterations"] = float(report.iterations)
    values["edit/target_prob"] = report.target_prob
    values["edit/failed"] = float(report.failed is not None)
    return values
