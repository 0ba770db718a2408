"""Objectives an edit step minimises: the host editor's own loss, or ODEdit's G (method.md Eq. 11).

    HostObjective   G = host_loss                                   (odedit.enabled: false, the base arm)
    ODEditObjective G = host_loss + w_loc R_loc + w_gen R_gen + lambda(delta, phi_e) * TV-l1 penalty

For FT and LoRA the host loss *is* R_rel (Eq. 2); editors with their own loss (WISE's margin, T-Patcher's
patch losses) keep it as the reliability term ([INFERENCE] method.md §2.5: the risks are "integrated into
these base editing models"). Both objectives see the same forward outputs and return (loss, parts), where
parts are plain floats for logging. An objective may also reject an iteration (`rollback_reason`): ODEdit's
divergence guard rolls back a step whose lambda runs past `odedit.lambda_max`.

Objectives see the host editor through `odedit.interfaces.LossEditor`; they do not import the editors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from odedit.config import ODEditConfig
from odedit.dual import DualState
from odedit.envrisks import STEP, EnvPlan, base_env, build_plan, env_risks, step_references
from odedit.envs import OUT_ENVS, SE_ENVS, EditCase, Reference
from odedit.interfaces import LossEditor
from odedit.risks import generality_risk_stacked, kernel_bandwidths, mmd_signs, mmd_weights, penalty_from_slopes

STEP_REFERENCE_K = 64  # top-k of `before_step` references when the cases carry no pre-edit ones to copy k from

# [INFERENCE] `odedit.locality_reference` (issue 17): which references R_loc's OUT environments compare with.
# Measured on the demo world (docs/results.md, "Knobs of ODEdit"): with `original`, R_loc turns into a repair
# term once earlier edits of a stream moved the OUT prompts; with `before_step` it only limits each step's own
# change. `both` adds the two terms. Single mode starts every edit from the original model: all three agree.
LOCALITY_REFERENCES: dict[str, tuple[str, ...]] = {
    "original": ("",),
    "before_step": (STEP,),
    "both": ("", STEP),
}

if TYPE_CHECKING:
    from odedit.models.base import ForwardOutput

Owners = Mapping[str, Sequence[tuple[int, int]]]  # env -> [(case index, sample index)] in forward order


@dataclass(eq=False)
class StepPlan:
    """The constants of ODEdit's environment risks for one step, gathered on its first iteration.

    Valid for the step whose `owners` mapping it was built from (the step runner sets a new mapping per step; it
    is held here, so its id cannot be reused by the next step's) and for the same environments.
    """

    owners: Owners
    envs: tuple[str, ...]  # the environments whose risks are taken, in order
    plan: EnvPlan  # `odedit.envrisks`' gather plan; its `envs` are those of `envs` present in the step
    penalty_index: torch.Tensor  # positions in `plan.envs` of the penalty's environments
    loc_index: torch.Tensor  # positions in `plan.envs` of R_loc's (OUT) environments
    rel_index: int | None  # position of IN in `plan.envs` (read as a default-R_rel host's loss), if present

    def fits(self, owners: Owners, envs: tuple[str, ...]) -> bool:
        return self.owners is owners and self.envs == envs


@dataclass(eq=False)
class PoolPlan:
    """Where R_gen's last-token pooled states of `envs` sit in one step's merged forward output."""

    owners: Owners
    envs: tuple[str, ...]
    positions: torch.Tensor  # flat (row * length + last prompt position) indices, on the hidden states' device

    def fits(self, owners: Owners, envs: tuple[str, ...]) -> bool:
        return self.owners is owners and self.envs == envs


class Objective(ABC):
    """What one iteration of an edit step minimises."""

    envs: tuple[str, ...] = ("in",)
    # Whether the loss reads positions other than the answer tokens and each row's last prompt token (e.g.
    # mean pooling over the prompt); such objectives get full replays, not `odedit.models.tail`'s.
    reads_all_positions: bool = False
    # Whether a step's edits may be split between data-parallel workers as far as the objective goes: true when
    # it is the host's loss, whose gradient over a step is the average of its edits' (if the host is sliceable).
    sliceable: bool = True

    @abstractmethod
    def loss(
        self,
        method: LossEditor,
        outs: Mapping[str, ForwardOutput],
        cases: Sequence[EditCase],
        k: int,
        params: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss at inner iteration k (1-based) and its named parts."""

    def rollback_reason(self, parts: Mapping[str, float]) -> str | None:
        """Why the step must be rolled back, judged from an iteration's logged `parts` (the loss being finite);
        None lets it go on. Default: never."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return []


class HostObjective(Objective):
    """The host editor alone."""

    def __init__(self, method: LossEditor) -> None:
        self.envs = tuple(method.host_envs)

    def loss(self, method, outs, cases, k, params):
        host = method.host_loss(outs, cases)
        return host, {"host": float(host.detach())}


class ODEditObjective(Objective):
    """ODEdit's Lagrangian G(delta, phi_e) with the primal-dual bookkeeping (method.md §2-3).

    Not sliceable: R_gen's MMD compares all the step's edit prompts with all their rephrases, the TV-l1 penalty
    and lambda read the step's environments together, so G of a step is not the average of G over halves of it.
    Split between 2 workers (each G of one edit, gradients averaged), FT + ODEdit's step on the tiny LLaVA moved
    phi_e by up to 2.8e-3 away from the whole step's (2 SGD iterations, lr 0.01; 0.040 with Adam).

    Args:
        cfg: the `odedit` config section (its `lambda_max` is the divergence guard, `rollback_reason`).
        method: the host editor (for its loss and its parameter count).
        with_hard: also use OUT-hard in R_loc and the penalty ([EXTENSION], default off).
        pooling: `model.pooling`, the hidden state R_gen compares ("last" prompt token or "mean").
        seed: seed of the lambda-network's initialisation.

    `owners` is filled by the step runner: env -> [(case index, sample index)] in forward order.
    """

    sliceable = False

    def __init__(
        self, cfg: ODEditConfig, method: LossEditor, *, with_hard: bool = False, pooling: str = "last", seed: int = 0
    ) -> None:
        self.cfg = cfg
        self.pooling = pooling
        self.reads_all_positions = pooling != "last"  # mean pooling reads every prompt position
        outs = tuple(e for e in OUT_ENVS if e != "out_hard" or with_hard)
        envs = dict.fromkeys(tuple(method.host_envs) + ("in",) + SE_ENVS + outs)
        self.envs = tuple(envs)
        # R_loc's OUT environments, each once per reference of `locality_reference` ("out_text", "out_text@step")
        suffixes = LOCALITY_REFERENCES[cfg.locality_reference]
        self.loc_terms = len(suffixes)
        self.out_envs = tuple(e + x for x in suffixes for e in outs)
        self.penalty_envs = tuple(
            name
            for e in cfg.environments
            if e in self.envs
            for name in ((e + x for x in suffixes) if e in OUT_ENVS else (e,))
        )
        self._step_refs: tuple[Owners, dict[str, list[Reference]]] | None = None  # `before_step` refs of a step
        n_tensors = len(method.editable())
        device = method.adapter.device
        self.dual = DualState.from_config(cfg, n_tensors, device=device, seed=seed)
        self.owners: Owners = {}
        # Distributed runs average the penalty over workers before the dual step, so every worker's
        # lambda-network takes the same step (set by pipeline.train.distributed).
        self.reduce: Callable[[float], float] = lambda value: value
        self._sigmas: torch.Tensor | None = None
        self._signs: torch.Tensor | None = None  # R_gen's block weights for the step (`mmd_signs`)
        self._plan: StepPlan | None = None  # the risks' constants of this step
        self._pool: PoolPlan | None = None  # where R_gen's pooled states are in this step's merged output

    # -------------------------------------------------------------------------------------- the risks

    def _gen(self, outs, k: int) -> torch.Tensor | None:
        if "in" not in outs:
            return None
        se = [e for e in SE_ENVS if e in outs]
        if not se:
            return None
        n = outs.spans["in"].stop - outs.spans["in"].start if hasattr(outs, "spans") else outs["in"].batch.size
        # edit prompts first, then their rephrases; [INFERENCE] R_gen's kernels in fp32 whatever the model dtype
        z = self._pooled_stacked(outs, ("in", *se)).float()
        # [INFERENCE] The bandwidths are fixed for the whole step from its first iteration: a median heuristic
        # re-estimated every iteration makes MMD^2 invariant to a uniform shrinking of the distances, so
        # R_gen could never pull rephrases towards the edit prompt.
        if k == 1 or self._sigmas is None:
            self._sigmas = kernel_bandwidths(
                z[:n], z[n:], self.cfg.mmd_kernels, self.cfg.mmd_bandwidth_base, self.cfg.mmd_bandwidth_mult
            )
            m = z.shape[0] - n
            self._signs = None
            if m > 0 and n > 0:
                unbiased = self.cfg.mmd_estimator == "unbiased"
                self._signs = mmd_weights(n, m, z.device) if unbiased else mmd_signs(n, m, z.device)
        if self._signs is not None and self._signs.dim() == 2:
            return generality_risk_stacked(z, n, self._sigmas, weights=self._signs)
        return generality_risk_stacked(z, n, self._sigmas, self._signs)

    def _pooled_stacked(self, outs, envs: tuple[str, ...]) -> torch.Tensor:
        """The pooled states z(m, x) of `envs`' rows, stacked in that order: one index into the merged forward
        output for last-token pooling (positions gathered once per step), else environment by environment."""
        merged = getattr(outs, "merged", None)
        if merged is None or self.pooling != "last":
            return torch.cat([outs[e].pooled(self.pooling) for e in envs])
        pool = self._pool
        if pool is None or not pool.fits(self.owners, envs):
            length = merged.batch.targets.shape[1]
            rows = torch.cat([torch.arange(outs.spans[e].start, outs.spans[e].stop) for e in envs])
            flat = rows * length + merged.batch.last_prompt[rows].cpu()
            pool = self._pool = PoolPlan(self.owners, envs, flat.to(merged.hidden.device))
        return merged.take_hidden(pool.positions)

    def _env_risks(
        self, outs, cases, with_penalty: bool, rel_host: bool
    ) -> tuple[torch.Tensor, torch.Tensor, StepPlan]:
        """(R_e, dR_e/domega at omega = 1) of the OUT environments (R_loc), of IN for a default-R_rel host and,
        when the penalty is on, of every penalty environment, as two (E,) tensors from one vectorised pass
        (`odedit.envrisks`), with the step's `StepPlan` (which says where the penalty's, R_loc's and IN's
        environments are in them).

        The slopes are closed-form: the same numbers as differentiating R_e(omega o phi_e) in omega with a
        second-order graph, without building one. The step's constants are gathered on its first call.
        """
        envs = tuple(
            dict.fromkeys((("in",) if rel_host else ()) + (self.penalty_envs if with_penalty else ()) + self.out_envs)
        )
        step = self._plan
        if step is None or not step.fits(self.owners, envs):
            plan = build_plan(outs, cases, self.owners, envs, self._step_references(outs, cases, envs))
            device = plan.seg.device
            pen = torch.tensor(
                [i for i, e in enumerate(plan.envs) if e in self.penalty_envs], dtype=torch.long, device=device
            )
            loc = torch.tensor(
                [i for i, e in enumerate(plan.envs) if e in self.out_envs], dtype=torch.long, device=device
            )
            rel = plan.envs.index("in") if "in" in plan.envs else None
            step = self._plan = StepPlan(self.owners, envs, plan, penalty_index=pen, loc_index=loc, rel_index=rel)
        values, slopes = env_risks(step.plan, outs)
        return values, slopes, step

    def _step_references(self, outs, cases, envs: tuple[str, ...]) -> dict[str, list[Reference]] | None:
        """The `before_step` references of this step's OUT environments, taken once per step (from its first
        forward pass, where phi_e is still the step's starting point) and kept for all its iterations."""
        wanted = [base_env(e) for e in envs if e.endswith(STEP)]
        if not wanted:
            return None
        if self._step_refs is None or self._step_refs[0] is not self.owners:
            k = next(
                (c.references[e][0].k for e in wanted for c in cases if c.references.get(e)),
                STEP_REFERENCE_K,
            )
            out_envs = [base_env(e) for e in self.out_envs if e.endswith(STEP)]
            self._step_refs = (self.owners, step_references(outs, out_envs, k))
        return self._step_refs[1]

    # -------------------------------------------------------------------------------------- G

    def loss(self, method, outs, cases, k, params):
        cfg = self.cfg
        pen = None
        with_penalty = self.dual.active and k > cfg.warmup_iters
        # For a host whose loss is the default R_rel (FT, LoRA), that loss is IN's risk of the vectorised pass:
        # taken from there rather than computed a second time.
        rel_host = method.host_loss_is_rel()
        values, slopes, step = self._env_risks(outs, cases, with_penalty, rel_host)
        rel_index, pen_index, loc_index = step.rel_index, step.penalty_index, step.loc_index
        plan_envs = step.plan.envs
        host = values[rel_index] if rel_host and rel_index is not None else method.host_loss(outs, cases)
        total = host
        parts = {"host": host.detach()}
        if with_penalty:
            pen = (
                penalty_from_slopes(slopes[pen_index], cfg.penalty_reduction, cfg.penalty_smoothing)
                if len(pen_index)
                else host * 0.0
            )
        # R_loc: the OUT environments' KL (the same values the penalty's slopes were taken at, omega = 1).
        if len(loc_index):
            # `both` references: the two terms added (each the mean over the OUT environments)
            r_loc = values[loc_index].mean() * self.loc_terms
            total = total + (r_loc if cfg.w_loc == 1.0 else cfg.w_loc * r_loc)
            parts["r_loc"] = r_loc.detach()
        r_gen = self._gen(outs, k)
        if r_gen is not None:
            total = total + (r_gen if cfg.w_gen == 1.0 else cfg.w_gen * r_gen)
            parts["r_gen"] = r_gen.detach()
        if pen is not None:
            # Eq. 13's dual step (k > 1), with the penalty at the phi reached by the previous primal step.
            local = float(pen.detach()) if k > 1 else None
            dual_pen = self.reduce(local) if local is not None else None
            step, lam = self.dual.ascend_then_lam(dual_pen, params, k - 1)
            if k > 1:
                parts["dual_step"] = step
            total = total + lam * pen
            parts["penalty"] = local if local is not None else pen.detach()
            parts["lambda"] = lam.detach()
        parts["loss"] = total.detach()
        # Per environment, the risk and its omega-slope (issue 17, logged per step): one vector, read with the rest.
        parts["_env"] = torch.cat([values.detach(), slopes.detach()])
        return total, _floats(parts, plan_envs)

    def rollback_reason(self, parts: Mapping[str, float]) -> str | None:
        """A runaway lambda: not finite, or above `odedit.lambda_max` (ODEdit's divergence guard)."""
        lam = parts.get("lambda")
        lambda_max = self.cfg.lambda_max
        if lam is not None and (not math.isfinite(lam) or lam > lambda_max):
            return f"lambda ran away ({lam:.4g} > {lambda_max:.4g})"
        return None

    def state_dict(self) -> dict:
        return {"dual": self.dual.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dual.load_state_dict(state["dual"])

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return self.dual.parameters()


def _floats(parts: dict, envs: Sequence[str] = ()) -> dict[str, float]:
    """The logged parts as plain floats, read from their tensors in one go.

    `parts["_env"]`, when present, is the (2E,) risks then omega-slopes of `envs`: it becomes `risk/<env>` and
    `slope/<env>` ("@step" environments as "<env>_step").
    """
    keys = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
    env_vec = parts.pop("_env", None)
    keys = [k for k in keys if k != "_env"]
    if keys or env_vec is not None:
        flat = [parts[k].float().reshape(1) for k in keys]
        if env_vec is not None:
            flat.append(env_vec.float().reshape(-1))
        values = torch.cat(flat).tolist()
        parts.update(zip(keys, values[: len(keys)]))
        if env_vec is not None:
            rest = values[len(keys) :]
            names = [e.replace(STEP, "_step") for e in envs]
            parts.update({f"risk/{e}": v for e, v in zip(names, rest[: len(names)])})
            parts.update({f"slope/{e}": v for e, v in zip(names, rest[len(names) :])})
    return {k: float(v) for k, v in parts.items()}


def build_objective(
    odedit_cfg: ODEditConfig, method: LossEditor, *, with_hard: bool = False, pooling: str = "last", seed: int = 0
) -> Objective:
    """ODEdit when `odedit.enabled`, else the host editor alone: the same loop runs either."""
    if odedit_cfg.enabled:
        return ODEditObjective(odedit_cfg, method, with_hard=with_hard, pooling=pooling, seed=seed)
    return HostObjective(method)
