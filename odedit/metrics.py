"""MMEdit metrics as EasyEdit computes them (reference.md §1.4), plus generation exact match and M-Loc-hard.

Every function here is pure: it takes a `ForwardOutput` (logits at answer positions, see `odedit.models.base`)
or strings, and returns one score per sample. Pre-edit and post-edit numbers come from the same functions.
Each metric name maps to a `MetricProtocol` that travels with the number (`MetricValue`), because
EasyEdit's own numbers are not comparable across its versions (PR #687) and its locality is agreement, not
accuracy (issue #243).

[INFERENCE] Scores are taken from fp32 copies of the logits whatever the model dtype (`resources.precision`):
the cast is exact, so argmax and top-k see the model's own numbers, and every mean is an fp32 one.

| name        | inputs                               | scorer                                                    |
|-------------|--------------------------------------|-----------------------------------------------------------|
| rel         | (image, prompt) -> target            | teacher-forced token accuracy (exact match optional)      |
| t_gen       | (image, text rephrase) -> target     | same                                                      |
| m_gen       | (image rephrase, prompt) -> target   | same                                                      |
| t_loc       | (-, NQ question) -> answer           | top-1 agreement with the pre-edit model at answer tokens  |
| m_loc       | (OK-VQA image, question) -> answer   | top-10 agreement with the pre-edit model                  |
| m_loc_hard  | (other image, edit prompt) -> answer | top-10 agreement with the pre-edit model [EXTENSION]      |
| *_gen_em    | prompt only                          | greedy decoding == target after normalisation [EXTENSION] |
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from odedit.models.base import ForwardOutput

METRIC_VERSION = "1"


@dataclass(frozen=True)
class MetricProtocol:
    """How a number was produced. `comparable` names the group of numbers that may be compared with it."""

    name: str
    environment: str
    scorer: str
    k: int = 1
    exact_match: bool = False
    comparable: str = ""

    def describe(self) -> str:
        em = ", exact match" if self.exact_match else ""
        return f"{self.name}: {self.scorer} (k={self.k}{em}) on {self.environment}; metric version {METRIC_VERSION}"


TF = "teacher-forced token accuracy at target positions (logits shifted by one, padding masked)"
AGREE = "top-k token-id agreement with the pre-edit model, position by position, at answer tokens"
GEN = "greedy decoding until EOS, normalised string equality with the target"

PROTOCOLS: dict[str, MetricProtocol] = {
    "rel": MetricProtocol("rel", "in", TF, 1, False, "easyedit-mmedit-tf"),
    "t_gen": MetricProtocol("t_gen", "se_text", TF, 1, False, "easyedit-mmedit-tf"),
    "m_gen": MetricProtocol("m_gen", "se_image", TF, 1, False, "easyedit-mmedit-tf"),
    "t_loc": MetricProtocol("t_loc", "out_text", AGREE, 1, False, "easyedit-mmedit-agree"),
    "m_loc": MetricProtocol("m_loc", "out_mm", AGREE, 10, False, "easyedit-mmedit-agree"),
    "m_loc_hard": MetricProtocol("m_loc_hard", "out_hard", AGREE, 10, False, "odedit-hard-agree"),
    "rel_gen_em": MetricProtocol("rel_gen_em", "in", GEN, 1, True, "odedit-generation"),
    "t_gen_gen_em": MetricProtocol("t_gen_gen_em", "se_text", GEN, 1, True, "odedit-generation"),
    "m_gen_gen_em": MetricProtocol("m_gen_gen_em", "se_image", GEN, 1, True, "odedit-generation"),
}
# The six headline metrics, in table order.
HEADLINE = ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "m_loc_hard")
# Environment -> the teacher-forced / agreement metric scored on it.
METRIC_OF_ENV = {p.environment: name for name, p in PROTOCOLS.items() if p.scorer != GEN}


def protocol(name: str, exact_match: bool = False) -> MetricProtocol:
    """The protocol of metric `name`; `exact_match` applies to the teacher-forced ones."""
    p = PROTOCOLS[name]
    if exact_match and p.scorer == TF:
        return MetricProtocol(p.name, p.environment, p.scorer, p.k, True, p.comparable + "-em")
    return p


@dataclass(frozen=True)
class MetricValue:
    """A mean score with its sample count and protocol."""

    name: str
    value: float
    n: int
    protocol: MetricProtocol

    def as_dict(self) -> dict:
        return {"value": self.value, "n": self.n, "protocol": self.protocol.describe()}


# ---------------------------------------------------------------------------------------------- scorers


def _per_sample(values: torch.Tensor, rows: torch.Tensor, batch_size: int, reduce: str) -> torch.Tensor:
    """Reduce per-position values (N,) to per-sample (B,) by mean or all(); samples without positions get nan."""
    out = torch.full((batch_size,), float("nan"), dtype=torch.float32)
    values = values.float().cpu()
    rows = rows.cpu()
    for b in range(batch_size):
        v = values[rows == b]
        if v.numel():
            out[b] = v.min() if reduce == "all" else v.mean()
    return out


def token_accuracy(out: ForwardOutput, exact_match: bool = False) -> torch.Tensor:
    """(B,) teacher-forced accuracy of the target tokens: mean of correct tokens, or 1.0 only if all are.

    argmax of the logits at each answer position is compared with the next target token (EasyEdit's
    `rewrite_acc` etc.). Padding never counts, on either side.
    """
    logits = out.answer_logits().float()
    correct = (logits.argmax(-1) == out.answer_targets()).float()
    return _per_sample(correct, out.answer_row(), out.batch.size, "all" if exact_match else "mean")


def answer_topk(out: ForwardOutput, k: int) -> list[torch.Tensor]:
    """Per sample, the (n_i, k) top-k token ids at its answer positions (the pre-edit reference)."""
    logits = out.answer_logits().float()
    k = min(k, logits.shape[-1])
    ids = logits.topk(k, dim=-1).indices.cpu()
    rows = out.answer_row().cpu()
    return [ids[rows == b] for b in range(out.batch.size)]


def topk_agreement(out: ForwardOutput, reference: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """(B,) fraction of top-k slots whose token id equals the reference's, position by position.

    This is EasyEdit's `topk_token_match`, restricted to answer positions: k=1 is T-Loc, k=10 is M-Loc.
    The reference must come from the unedited model on the same inputs (`answer_topk`).
    """
    post = answer_topk(out, k)
    scores = torch.full((len(post),), float("nan"))
    for b, (p, r) in enumerate(zip(post, reference)):
        r = r[:, : p.shape[1]] if r.numel() else r
        if p.numel() == 0 or r.numel() == 0:
            continue
        if p.shape != r.shape:
            raise ValueError(
                f"sample {b}: reference top-k {tuple(r.shape)} does not match {tuple(p.shape)}; "
                "references must be computed on the same inputs"
            )
        scores[b] = (p == r).float().mean()
    return scores


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style normalisation)."""
    text = _PUNCT.sub(" ", text.lower())
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def generation_exact_match(predictions: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """(B,) 1.0 where the greedy generation equals the target after `normalize_answer`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return torch.tensor([float(normalize_answer(p) == normalize_answer(t)) for p, t in zip(predictions, targets)])


def mean_value(name: str, scores: torch.Tensor | Sequence[float], exact_match: bool = False) -> MetricValue:
    """Mean over samples, ignoring nan (samples that lack the environment)."""
    t = torch.as_tensor(scores, dtype=torch.float32).flatten()
    t = t[~torch.isnan(t)]
    value = float(t.mean()) if t.numel() else float("nan")
    return MetricValue(name, value, int(t.numel()), protocol(name, exact_match))
