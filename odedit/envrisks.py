"""Every environment's risk and its omega-slope in one vectorised pass (what ODEdit's G needs per iteration).

ODEdit's objective (method.md Eq. 11) needs, at every inner iteration, R_e and dR_e/domega at omega = 1 for
each environment e: R_rel-style NLL on IN, SE-text and SE-image (Eq. 2), the tail-bucket KL of R_loc on
OUT-text and OUT-mm (Eq. 3), and their slopes for the TV-l1 penalty (Eq. 9). Computed environment by
environment with `odedit.risks`, that is dozens of small tensor operations per environment, forward and
backward, and on small models those operations, not the arithmetic, are the cost of an edit.

Here the answer positions of all environments are stacked once (one index into the merged forward output
when the step has one): one log-softmax, one gather per kind of risk, and one matrix product with constant
weights (the mean over each sample's positions, then over each environment's samples) give every R_e and
slope. What does not change within an edit step (which positions belong to which sample and environment,
those weights, the targets, the pre-edit references) is gathered once per step into an `EnvPlan`. The numbers
equal the reference functions `reliability_risk_and_slope` / `locality_risk_and_slope` per environment (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from odedit.envs import OUT_ENVS, EditCase, Reference
from odedit.risks import _EPS, position_risks

# An OUT environment whose R_loc compares with the model at the start of the current step instead of the
# original model (`odedit.locality_reference`, issue 17): "out_text@step" reads the rows of "out_text".
STEP = "@step"


def base_env(env: str) -> str:
    """The environment whose rows `env` reads ("out_text@step" -> "out_text")."""
    return env[: -len(STEP)] if env.endswith(STEP) else env


def step_references(outs: Mapping[str, ForwardOutput], envs: Sequence[str], k: int) -> dict[str, list[Reference]]:
    """Top-k references of `envs`' samples from `outs`, in row order: the model as it is in this forward pass.

    [INFERENCE] `odedit.locality_reference: before_step` (issue 17): taken from the first forward pass of an
    edit step, they are exactly the logits of the model at the step's start, so R_loc is 0 at the first iteration
    and limits each step's own collateral change, where references of the original model make R_loc repair what
    earlier steps moved. Same form as `odedit.envs.compute_references` (fp32 log-softmax, top-k, tail bucket).
    """
    refs: dict[str, list[Reference]] = {}
    with torch.no_grad():
        for env in envs:
            if env not in outs:
                continue
            o = outs[env]
            logp = torch.log_softmax(o.answer_logits().detach().float(), -1)
            vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
            rows = o.answer_row().to(ids.device)
            refs[env] = [Reference(ids[rows == b], vals[rows == b]) for b in range(o.batch.size)]
    return refs


if TYPE_CHECKING:
    from odedit.models.base import ForwardOutput


@dataclass
class EnvPlan:
    """The per-step constants of `env_risks`: environments, their samples and their answer positions.

    Positions are ordered reliability environments first, then OUT environments, each in `envs` order.

    Attributes:
        envs: environments in plan order (reliability ones, then OUT ones).
        rel_envs, out_envs: how many of each kind.
        seg: (N,) the (environment, sample) segment of each answer position.
        seg_env: (S,) the environment index of each segment.
        targets: (N_rel,) target ids at the reliability positions.
        ref_ids, ref_logprobs: (N_out, K) pre-edit top-K references at the OUT positions.
    """

    envs: tuple[str, ...]
    n_rel: int
    seg: torch.Tensor
    seg_env: torch.Tensor
    targets: torch.Tensor
    ref_ids: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    weights: torch.Tensor | None = None  # (E, N) each environment's mean of per-sample means, as weights
    # Every position's tokens, reliability and OUT alike (reliability: the target in every column; OUT: the
    # K references), the reference log-probabilities and log tail mass (0 on reliability rows), which rows
    # are reliability rows: one set of per-position formulas for both kinds, without splitting the rows.
    ids: torch.Tensor | None = None
    ref_all: torch.Tensor | None = None
    log_p_tail: torch.Tensor | None = None
    is_rel: torch.Tensor | None = None
    flat: torch.Tensor | None = None  # (N,) positions in the merged output's (B * L) logits, in plan order

    @property
    def n_segments(self) -> int:
        return int(self.seg_env.shape[0])


def build_plan(
    outs: Mapping[str, ForwardOutput],
    cases: Sequence[EditCase],
    owners: Mapping[str, Sequence],
    envs: Sequence[str],
    step_refs: Mapping[str, Sequence[Reference]] | None = None,
) -> EnvPlan:
    """Gather the step's constants for `envs` (those absent from `outs` are skipped).

    An OUT environment named with `STEP` ("out_text@step") reads its base environment's rows against
    `step_refs[base]` (`step_references`) instead of the cases' pre-edit references.
    """
    rel = [e for e in envs if base_env(e) in outs and base_env(e) not in OUT_ENVS]
    out = [e for e in envs if base_env(e) in outs and base_env(e) in OUT_ENVS]
    order = rel + out
    segs, seg_env, targets, ref_ids, ref_lps = [], [], [], [], []
    offset = 0
    for index, env in enumerate(order):
        o = outs[base_env(env)]
        segs.append(o.answer_row() + offset)
        seg_env += [index] * o.batch.size
        offset += o.batch.size
        if base_env(env) in OUT_ENVS:
            if env.endswith(STEP):
                refs = list(step_refs[base_env(env)])
            else:
                refs = [cases[i].references[env][j] for i, j in owners[env]]
            ref_ids += [r.topk_ids for r in refs]
            ref_lps += [r.topk_logprobs for r in refs]
        else:
            targets.append(o.answer_targets())
    device = outs[base_env(order[0])].logits.device if order else torch.device("cpu")
    merged = getattr(outs, "merged", None)  # an `odedit.editstep.EnvOutputs`: index its output once
    flat = None
    if merged is not None and order:
        length = merged.batch.targets.shape[1]
        parts = []
        for env in order:
            span = outs.spans[base_env(env)]
            r, c = merged.batch.answer_mask[span].nonzero(as_tuple=True)  # row-major, as boolean indexing
            parts.append((r + span.start) * length + c)
        flat = torch.cat(parts).to(device)
    n_rel = sum(int(outs[base_env(e)].batch.answer_mask.sum()) for e in rel)
    ids = torch.cat(ref_ids).to(device).long() if ref_ids else None
    lps = torch.cat(ref_lps).to(device).float() if ref_lps else None
    seg = torch.cat(segs).to(device) if segs else torch.zeros(0, dtype=torch.long, device=device)
    seg_env_t = torch.tensor(seg_env, dtype=torch.long, device=device)
    tgt = torch.cat(targets).to(device).long() if targets else torch.zeros(0, dtype=torch.long, device=device)
    k = ids.shape[1] if ids is not None else 1
    all_ids = torch.cat([tgt.unsqueeze(1).expand(-1, k)] + ([ids] if ids is not None else []))
    ref_all = torch.cat([torch.zeros(n_rel, k, device=device)] + ([lps] if lps is not None else []))
    p_tail = (1.0 - lps.exp().sum(-1)).clamp_min(_EPS).log() if lps is not None else None
    log_p_tail = torch.cat([torch.zeros(n_rel, device=device)] + ([p_tail] if p_tail is not None else []))
    is_rel = torch.arange(all_ids.shape[0], device=device) < n_rel
    return EnvPlan(
        envs=tuple(order),
        n_rel=n_rel,
        seg=seg,
        seg_env=seg_env_t,
        weights=_mean_weights(seg, seg_env_t, len(order)),
        ids=all_ids,
        ref_all=ref_all,
        log_p_tail=log_p_tail,
        is_rel=is_rel,
        targets=tgt,
        ref_ids=ids,
        ref_logprobs=lps,
        flat=flat,
    )


def _mean_weights(seg: torch.Tensor, seg_env: torch.Tensor, n_env: int) -> torch.Tensor:
    """W (E, N) with W @ x = for each environment, the mean over its samples that have answer positions of the
    mean of x over each sample's positions: W[e, i] = 1 / (positions of i's sample * such samples of e).
    Constant within a step, so the two-level mean of every iteration is one matrix product."""
    count = torch.zeros(seg_env.shape[0], dtype=torch.float32, device=seg.device).index_add(
        0, seg, torch.ones(seg.shape[0], dtype=torch.float32, device=seg.device)
    )
    present = torch.zeros(n_env, dtype=torch.float32, device=seg.device).index_add(0, seg_env, (count > 0).float())
    env_of = seg_env[seg]
    w = torch.zeros(n_env, seg.shape[0], dtype=torch.float32, device=seg.device)
    w[env_of, torch.arange(seg.shape[0], device=seg.device)] = 1.0 / (count[seg] * present[env_of])
    return w


def env_risks(plan: EnvPlan, outs: Mapping[str, ForwardOutput]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_e, dR_e/domega at omega = 1) for every environment of `plan`, as two (E,) tensors.

    Per position: `odedit.risks.nll_and_slope` on the reliability environments, `kl_and_slope` on the OUT
    ones. Then the mean over each sample's positions, then over each
    environment's samples (an environment without answer positions gets 0, as in `odedit.risks`).
    """
    n_env = len(plan.envs)
    if n_env == 0:
        empty = torch.zeros(0)
        return empty, empty
    merged = getattr(outs, "merged", None)
    if plan.flat is not None and merged is not None:
        z = merged.take_logits(plan.flat).float()
    else:
        z = torch.cat([outs[base_env(e)].answer_logits() for e in plan.envs]).float()
    logq = torch.log_softmax(z, -1)
    value, slope = position_risks(
        z, logq, plan.ids, plan.ref_all, plan.log_p_tail, plan.is_rel, plan.ref_ids is not None, plan.n_rel > 0
    )
    w = plan.weights.to(value.dtype)  # per-sample means, then over each environment's samples
    return w @ value, w @ slope
