"""Environments of one edit (method.md §1.2, design.md §3) and the pre-edit references locality compares to.

    IN        (image, prompt) -> target                      reliability, R_rel
    SE-text   (image, text rephrase) -> target                T-Gen, R_gen
    SE-image  (image rephrase, prompt) -> target              M-Gen, R_gen
    OUT-text  (no image, NQ-style question) -> answer         T-Loc, R_loc
    OUT-mm    (other image, its question) -> answer           M-Loc, R_loc
    OUT-hard  (other images, the edit's own prompt) -> answer M-Loc-hard [EXTENSION]

An `EditCase` holds the samples of each environment for one edit, and for the OUT environments the
pre-edit `Reference` of each sample, computed once with the unedited model (`compute_references`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from odedit.records import EditRecord
from odedit.sample import Sample

if TYPE_CHECKING:  # torch and the adapters are imported where references are computed, not by data workers
    # deferred: torch only where references are computed; data workers build cases without it
    import torch

    from odedit.models.base import ModelAdapter

ENVIRONMENTS = ("in", "se_text", "se_image", "out_text", "out_mm", "out_hard")
OUT_ENVS = ("out_text", "out_mm", "out_hard")
SE_ENVS = ("se_text", "se_image")


@dataclass
class Reference:
    """Pre-edit outputs of one OUT sample at its n answer positions.

    Attributes:
        topk_ids: (n, K) token ids of the K most likely tokens, most likely first.
        topk_logprobs: (n, K) their log-probabilities.

    K >= 10 serves M-Loc (top-10 agreement) and T-Loc (top-1). R_loc's KL uses the K tokens plus one tail
    bucket holding the remaining mass ([INFERENCE]: exact when K >= vocabulary size; otherwise the KL of the
    coarse-grained distributions, a lower bound of the full KL that keeps stored references small).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])


@dataclass
class EditCase:
    """The samples of every environment for one edit, plus OUT references."""

    edit_id: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    references: dict[str, list[Reference]] = field(default_factory=dict)

    def env(self, name: str) -> list[Sample]:
        return self.samples.get(name, [])

    @property
    def target(self) -> str:
        return self.samples["in"][0].target


def case_from_record(record: EditRecord, load_image: Callable[[str | None, str], Any]) -> EditCase:
    """Build the environments of `record`; `load_image(path, kind)` returns a PIL image (kind: edit,
    rephrase, locality) or None for a None path."""
    img = load_image(record.image, "edit")
    s: dict[str, list[Sample]] = {"in": [Sample(record.prompt, record.target, img)]}
    if record.rephrase:
        s["se_text"] = [Sample(record.rephrase, record.target, img)]
    if record.image_rephrase:
        s["se_image"] = [Sample(record.prompt, record.target, load_image(record.image_rephrase, "rephrase"))]
    if record.loc and record.loc_ans:
        s["out_text"] = [Sample(record.loc, record.loc_ans, None)]
    if record.m_loc and record.m_loc_q and record.m_loc_a:
        s["out_mm"] = [Sample(record.m_loc_q, record.m_loc_a, load_image(record.m_loc, "locality"))]
    if record.hard_images:
        s["out_hard"] = [
            Sample(record.prompt, a, load_image(p, "edit")) for p, a in zip(record.hard_images, record.hard_answers)
        ]
    return EditCase(record.id, s)


def compute_references(
    adapter: ModelAdapter, samples: Sequence[Sample], k: int = 64, batch_size: int = 32
) -> list[Reference]:
    """Pre-edit top-K references of `samples` (run this with the unedited model).

    [INFERENCE] The model runs in its own dtype (the edit workers', `resources.precision`: the pipeline loads
    it so, so R_loc starts at 0 on the unedited model), but the log-softmax and top-K are taken in fp32 and the
    log-probabilities stored as fp32: in bf16 the K stored log-probs would keep 2-3 significant digits and the
    tail bucket's mass, 1 - sum of K probabilities, would be mostly rounding.
    """
    # deferred: torch only where references are computed; data workers build cases without it
    import torch

    with torch.no_grad():
        return _references(adapter, samples, k, batch_size)


def _references(adapter: ModelAdapter, samples: Sequence[Sample], k: int, batch_size: int) -> list[Reference]:
    # deferred: torch only where references are computed; data workers build cases without it
    import torch

    refs: list[Reference] = []
    for i in range(0, len(samples), batch_size):
        out = adapter.run(list(samples[i : i + batch_size]))
        logp = torch.log_softmax(out.answer_logits().float(), -1)
        kk = min(k, logp.shape[-1])
        vals, ids = logp.topk(kk, dim=-1)
        rows = out.answer_row()
        for b in range(out.batch.size):
            m = rows == b
            refs.append(Reference(ids[m].cpu(), vals[m].cpu()))
    return refs


def attach_references(
    adapter: ModelAdapter, cases: Sequence[EditCase], k: int = 64, envs: Sequence[str] = OUT_ENVS
) -> None:
    """Compute and attach pre-edit references for the OUT environments of `cases` (in place)."""
    for env in envs:
        flat = [(c, s) for c in cases for s in c.env(env)]
        if not flat:
            continue
        refs = compute_references(adapter, [s for _, s in flat], k)
        for c in cases:
            c.references[env] = []
        for (c, _), r in zip(flat, refs):
            c.references[env].append(r)
