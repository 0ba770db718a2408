"""Every environment's risk and its omega-slope in one vectorised pass (what ODEdit's G needs per iteration).

ODEdit's objective (method.md Eq. 11) needs, at every inner iteration, R_e and dR_e/domega at omega = 1 for
each environment e: R_rel-style NLL on IN, SE-text and SE-image (Eq. 2), the tail-bucket KL of R_loc on
OUT-text and OUT-mm (Eq. 3), and their slopes for the TV-l1 penalty (Eq. 9). Computed environment by
environment with `odedit.risks`, that is dozens of small tensor operations per environment, forward and
backward, and on small models those operations, not the arithmetic, are the cost of an edit.

Here the answer positions of all environments are stacked once: one log-softmax, one gather per kind of
risk, and two `index_add` reductions (positions -> samples -> environments) give every R_e and slope. What
does not change within an edit step (which positions belong to which sample and environment, the targets,
the pre-edit references) is gathered once per step into an `EnvPlan`. The numbers equal the reference
functions `reliability_risk_and_slope` / `locality_risk_and_slope` per environment (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from odedit.envs import OUT_ENVS, EditCase
from odedit.risks import kl_and_slope, nll_and_slope

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

    @property
    def n_segments(self) -> int:
        return int(self.seg_env.shape[0])


def build_plan(outs: Mapping[str, "ForwardOutput"], cases: Sequence[EditCase], owners: Mapping[str, Sequence],
               envs: Sequence[str]) -> EnvPlan:
    """Gather the step's constants for `envs` (those absent from `outs` are skipped)."""
    rel = [e for e in envs if e in outs and e not in OUT_ENVS]
    out = [e for e in envs if e in outs and e in OUT_ENVS]
    order = rel + out
    segs, seg_env, targets, ref_ids, ref_lps = [], [], [], [], []
    offset = 0
    for index, env in enumerate(order):
        o = outs[env]
        segs.append(o.answer_row() + offset)
        seg_env += [index] * o.batch.size
        offset += o.batch.size
        if env in OUT_ENVS:
            refs = [cases[i].references[env][j] for i, j in owners[env]]
            ref_ids += [r.topk_ids for r in refs]
            ref_lps += [r.topk_logprobs for r in refs]
        else:
            targets.append(o.answer_targets())
    device = outs[order[0]].logits.device if order else torch.device("cpu")
    n_rel = sum(int(outs[e].batch.answer_mask.sum()) for e in rel)
    ids = torch.cat(ref_ids).to(device).long() if ref_ids else None
    lps = torch.cat(ref_lps).to(device).float() if ref_lps else None
    return EnvPlan(
        envs=tuple(order),
        n_rel=n_rel,
        seg=torch.cat(segs).to(device) if segs else torch.zeros(0, dtype=torch.long, device=device),
        seg_env=torch.tensor(seg_env, dtype=torch.long, device=device),
        targets=torch.cat(targets).to(device).long() if targets else torch.zeros(0, dtype=torch.long, device=device),
        ref_ids=ids,
        ref_logprobs=lps,
    )


def env_risks(plan: EnvPlan, outs: Mapping[str, "ForwardOutput"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_e, dR_e/domega at omega = 1) for every environment of `plan`, as two (E,) tensors.

    Per position: `odedit.risks.nll_and_slope` on the reliability environments, `kl_and_slope` on the OUT
    ones. Then the mean over each sample's positions, then over each
    environment's samples (an environment without answer positions gets 0, as in `odedit.risks`).
    """
    n_env = len(plan.envs)
    if n_env == 0:
        empty = torch.zeros(0)
        return empty, empty
    z = torch.cat([outs[e].answer_logits() for e in plan.envs]).float()
    logq = torch.log_softmax(z, -1)
    parts = []
    if plan.n_rel:
        parts.append(nll_and_slope(z[:plan.n_rel], logq[:plan.n_rel], plan.targets))
    if plan.ref_ids is not None:
        parts.append(kl_and_slope(z[plan.n_rel:], logq[plan.n_rel:], plan.ref_ids, plan.ref_logprobs))
    per_pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    ones = torch.ones_like(per_pos[:, :1])
    seg_sums = per_pos.new_zeros(plan.n_segments, 3).index_add(0, plan.seg, torch.cat([per_pos, ones], 1))
    count = seg_sums[:, 2:]
    present = (count > 0).to(per_pos.dtype)
    seg_means = torch.cat([seg_sums[:, :2] / count.clamp_min(1.0), present], 1) * present
    env_sums = per_pos.new_zeros(n_env, 3).index_add(0, plan.seg_env, seg_means)
    means = env_sums[:, :2] / env_sums[:, 2:].clamp_min(1.0)
    return means[:, 0], means[:, 1]
