"""One edit step: the inner optimisation loop every gradient-based host editor runs, with or without ODEdit.

    handle, report = run_edit_step(method, objective, cases, stepper_factory)

Per iteration: one batched forward pass of every environment the objective reads (all cases of the step
together, `forward_envs`), the objective's loss, one update of phi_e through a `Stepper`. A step whose loss
turns NaN/Inf, or that the objective rejects (`Objective.rollback_reason`: ODEdit's lambda running past
`odedit.lambda_max`), is rolled back (`handle.restore()`) and reported as failed; the stream goes on.

The loop sees the editor through `odedit.interfaces.StepEditor`; it does not import the editors.

Steppers decouple the loop from how parameters move: `TorchStepper` (a torch optimiser, or the adaptive
rule of method.md §3.3) in process, and a DeepSpeed engine in Ray Train workers (`pipeline.editing`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from odedit.dual import adaptive_step
from odedit.envs import EditCase
from odedit.interfaces import StepEditor, UndoHandle
from odedit.models.base import ForwardOutput, ModelAdapter
from odedit.models.prefix import PrefixRunner
from odedit.models.tail import TailRunner
from odedit.objective import Objective


class Stepper(Protocol):
    """Moves phi_e given a loss: backward plus update."""

    def step(self, loss: torch.Tensor, k: int) -> None: ...


StepperFactory = Callable[[Sequence[torch.nn.Parameter]], Stepper]


class ParamAccess:
    """How code outside forward/backward reads or writes phi_e. In process: directly.

    Under DeepSpeed ZeRO the engine keeps its own fp32 copy of the parameters (and ZeRO-3 partitions them), so
    `pipeline.train.distributed.ZeroAccess` gathers them and refreshes that copy after any direct write.
    """

    def modify(self, params: Sequence[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


DIRECT = ParamAccess()


class TorchStepper:
    """A torch optimiser (SGD or Adam) over phi_e, or the adaptive rule gamma_k = c / (k^p ||g||).

    Args:
        params: phi_e.
        optimizer: "sgd" or "adam".
        lr: step size for the optimiser rule.
        rule: "optimizer" or "adaptive".
        adaptive_p, adaptive_scale: parameters of the adaptive rule.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        optimizer: str = "adam",
        lr: float = 1e-2,
        rule: str = "optimizer",
        adaptive_p: float = 1.1,
        adaptive_scale: float = 1.0,
    ) -> None:
        self.params = list(params)
        self.rule = rule
        self.p, self.scale = adaptive_p, adaptive_scale
        opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
        self.opt = opt_cls(self.params, lr=lr) if rule == "optimizer" else None

    def step(self, loss: torch.Tensor, k: int) -> None:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        self._apply(grads, k)

    def _apply(self, grads: Sequence[torch.Tensor], k: int) -> None:
        """Move phi_e along `grads` by the optimiser or the adaptive rule."""
        if self.opt is not None:
            for p, g in zip(self.params, grads):
                p.grad = g
            self.opt.step()
            for p in self.params:
                p.grad = None
            return
        norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads))
        lr = adaptive_step(k, norm, self.p, self.scale)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g, alpha=-lr)


def torch_stepper_factory(method_cfg, odedit_cfg=None) -> StepperFactory:
    """The in-process stepper for a method config (and the ODEdit step rule when ODEdit is on)."""
    rule = odedit_cfg.step_rule if odedit_cfg is not None and odedit_cfg.enabled else "optimizer"
    p = odedit_cfg.adaptive_p if odedit_cfg is not None else 1.1
    c = odedit_cfg.adaptive_scale if odedit_cfg is not None else 1.0
    return lambda params: TorchStepper(
        params, optimizer=method_cfg.optimizer, lr=method_cfg.lr, rule=rule, adaptive_p=p, adaptive_scale=c
    )


@dataclass
class StepReport:
    """What happened in one edit step."""

    iterations: int = 0  # parameter updates taken (fewer than n_iter when `method.early_stop` stopped the step)
    parts: list[dict[str, float]] = field(default_factory=list)
    failed: str | None = None
    seconds: float = 0.0
    # The IN targets' mean sequence probability on the model the step leaves (issue 17: did the edit converge?),
    # and whether `method.early_stop` ended the step before n_iter.
    target_prob: float = float("nan")
    stopped_early: bool = False

    @property
    def final(self) -> dict[str, float]:
        return self.parts[-1] if self.parts else {}


@dataclass
class EnvBatch:
    """The samples of every environment of a step, encoded once: environments are row ranges of one batch.

    `runner` (an `odedit.models.prefix.PrefixRunner`) replays only the editable top of the model after the
    first iteration; None runs the full model every time.
    """

    batch: Any  # EncodedBatch
    spans: dict[str, slice]
    owners: dict[str, list[tuple[int, int]]]
    runner: Any = None
    # Each environment's rows of `batch`, cut once per step (the inputs do not change between iterations).
    sub_batches: dict[str, Any] = field(default_factory=dict)

    def sub_batch(self, env: str) -> Any:
        if env not in self.sub_batches:
            self.sub_batches[env] = self.batch.rows(self.spans[env])
        return self.sub_batches[env]


class EnvOutputs(collections.abc.Mapping):
    """{environment: ForwardOutput} of one merged forward pass; each environment's view is cut on first use.

    `merged` and `spans` stay available, so a consumer that reads every environment (ODEdit's risks) can
    index the merged output once instead of cutting it per environment.
    """

    def __init__(self, merged: ForwardOutput, encoded: EnvBatch) -> None:
        self.merged = merged
        self.spans = encoded.spans
        self._encoded = encoded
        self._views: dict[str, ForwardOutput] = {}

    def __getitem__(self, env: str) -> ForwardOutput:
        if env not in self._views:
            rows = self.spans[env]  # KeyError for an environment the step did not encode
            self._views[env] = self.merged.select(rows, self._encoded.sub_batch(env))
        return self._views[env]

    def __contains__(self, env: object) -> bool:  # without cutting the view (Mapping's default would)
        return env in self.spans

    def __iter__(self):
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


def encode_envs(
    adapter: ModelAdapter,
    cases: Sequence[EditCase],
    envs: Sequence[str],
    first_layer: int | None = None,
    tail: tuple | None = None,
) -> EnvBatch | None:
    """Tokenise and preprocess all environments' samples of a step once (images are the costly part).

    With `first_layer`, forward passes after the first replay the decoder layers from there on only; with
    `tail` (`EditMethod.position_tail()`), only the last layer's edited module at the positions losses read.
    """
    samples = []
    spans: dict[str, slice] = {}
    owners: dict[str, list[tuple[int, int]]] = {}
    for env in envs:
        flat = [(i, j, s) for i, c in enumerate(cases) for j, s in enumerate(c.env(env))]
        if not flat:
            continue
        spans[env] = slice(len(samples), len(samples) + len(flat))
        samples += [s for _, _, s in flat]
        owners[env] = [(i, j) for i, j, _ in flat]
    if not samples:
        return None
    runner = None
    if tail is not None:
        runner = TailRunner(adapter, *tail)
    elif first_layer is not None:
        runner = PrefixRunner(adapter, first_layer)
    return EnvBatch(adapter.encode(samples), spans, owners, runner)


def forward_envs(adapter: ModelAdapter, encoded: EnvBatch | None) -> Mapping[str, ForwardOutput]:
    """All environments through ONE forward pass, split back by rows.

    On small models the per-pass overhead dominates and on large ones a bigger batch uses the device better,
    so ODEdit's extra environments cost far less than one pass each.
    """
    if encoded is None:
        return {}
    merged = encoded.runner.forward(encoded.batch) if encoded.runner is not None else adapter.forward(encoded.batch)
    return EnvOutputs(merged, encoded)


def target_probability(out: ForwardOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over samples of p(target | prompt), whether every target token is the argmax) of IN's output.

    The probability of a sample is the product of its answer tokens' teacher-forced probabilities; the second
    value is the step's Rel = 1 under EasyEdit's token accuracy, the target `method.early_stop` waits for.
    """
    with torch.no_grad():
        logits = out.answer_logits().float()
        targets = out.answer_targets().to(logits.device).long()
        rows = out.answer_row().to(logits.device)
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        per = torch.zeros(out.batch.size, device=logits.device).index_add(0, rows, logp)
        present = torch.zeros(out.batch.size, dtype=torch.bool, device=logits.device)
        present[rows] = True
        prob = per[present].exp().mean() if bool(present.any()) else per.sum() * float("nan")
        return prob, (logits.argmax(-1) == targets).all()


def run_edit_step(
    method: StepEditor,
    objective: Objective,
    cases: Sequence[EditCase],
    stepper_factory: StepperFactory,
    access: ParamAccess = DIRECT,
) -> tuple[UndoHandle, StepReport]:
    """Edit the model for `cases` (a step of one or more edits); see the module docstring."""
    t0 = time.perf_counter()
    method.prepare()
    params = list(method.editable().values())
    report = StepReport()
    with access.modify(params):
        handle = method.snapshot()
        method.begin_step(cases, handle)
    stepper = stepper_factory(params)
    model = method.adapter.model
    was_training = model.training
    model.eval()  # no dropout: edits are deterministic for a seed ...
    for module in method.train_mode_modules():
        module.train()  # ... except where the method asks for it (LoRA's `method.dropout`, issue 17)
    early_stop = bool(getattr(method.cfg, "early_stop", False))
    try:
        # Encoded once per step; the frozen layers below the editor's first layer run once per step too.
        first = method.first_edited_layer() if method.cfg.cache_prefix else None
        tail = (
            method.position_tail()
            if first is not None and method.cfg.cache_tail and not objective.reads_all_positions
            else None
        )
        encoded = encode_envs(method.adapter, cases, objective.envs, first, tail)
        if hasattr(objective, "owners"):
            objective.owners = encoded.owners if encoded is not None else {}
        for k in range(1, method.cfg.n_iter + 1):
            outs = forward_envs(method.adapter, encoded)
            loss, parts = objective.loss(method, outs, cases, k, params)
            report.parts.append(parts)
            if early_stop and "in" in outs:
                # [INFERENCE] issue 17: stop once the target is reached, judged on this iteration's forward pass
                # (the model after k - 1 updates), before its update: the step keeps k - 1 updates.
                prob, reached = target_probability(outs["in"])
                if bool(reached):
                    report.target_prob, report.stopped_early = float(prob), True
                    break
            report.iterations = k
            reason = _divergence(loss, parts, objective)
            if reason is None:
                stepper.step(loss, k)
                with access.modify(params):
                    method.after_update()
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        reason = "non-finite parameters after the update"
            if reason is not None:
                with access.modify(params):
                    handle.restore()
                report.failed = f"iteration {k}: {reason}; step rolled back"
                return handle, report
        with access.modify(params):
            method.end_step(cases, handle)
        samples = [s for c in cases for s in c.env("in")]
        if not report.stopped_early and samples:
            # One full forward of the IN samples alone, on the model as evaluated (no dropout): end_step may have
            # run other batches (WISE's threshold), which a prefix replay of the step's batch could not follow.
            model.eval()
            with torch.no_grad():
                report.target_prob = float(target_probability(method.adapter.run(samples))[0])
    finally:
        model.train(was_training)
        report.seconds = time.perf_counter() - t0
    return handle, report


def _divergence(loss: torch.Tensor, parts: Mapping[str, float], objective: Objective) -> str | None:
    """Why this iteration's step must be rolled back: a non-finite loss, or the objective's own reason."""
    value = parts.get("loss")  # the objective's own reading of the loss, when it logs one
    finite = math.isfinite(value) if value is not None else bool(torch.isfinite(loss.detach()).all())
    if not finite:
        return f"loss is {float(loss.detach())}"
    return objective.rollback_reason(parts)
