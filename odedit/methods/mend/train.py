"""Meta-training of a trainable editor's hypernetwork (MEND §3.3, Alg. 1), in process or inside a Ray Train worker.

    trainer = MetaTrainer(method, objective, train_cases, val_cases)
    before = trainer.evaluate(); trainer.train(steps); after = trainer.evaluate()

One step samples `train_batch` edits, computes the editor-training loss `method.meta_loss` (the objective's G,
so ODEdit's terms join it when ODEdit is on) and moves theta with the method's optimiser groups. With several
workers, `reduce_sum` (an in-place sum over workers, e.g. a gloo all-reduce) keeps the replicas identical:
meta-gradients are averaged, running statistics summed. ODEdit's lambda-network is not trained
(`EPISODE_K`).

`synthetic_cases` builds stand-in edits from a model's own vocabulary and random images, for the in-process
bootstrap of tiny models ([INFERENCE] MEND needs *some* training distribution; this one is only meant to make
tests and smoke runs possible, real runs train on the benchmark's training split with `jobs.train_editor`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from odedit.editstep import encode_envs, forward_envs
from odedit.envs import OUT_ENVS, EditCase, attach_references
from odedit.evaluation import evaluate_cases
from odedit.models.base import ModelAdapter, Sample
from odedit.objective import HostObjective
from odedit.risks import reliability_risk

ReduceSum = Callable[[list[torch.Tensor]], None]

# [INFERENCE] issue 17 item 6c: a meta-training step is one edit episode, scored by the objective as the first
# iteration of an edit step (k = 1): lambda at the lambda-network's initial state (no dual step), R_gen's kernel
# bandwidths estimated on this episode's states, `before_step` references from this episode's pass. Scored with
# the meta-step count as k (as before), the dual ascent of 1,500 unrelated episodes accumulated (the TV-l1
# penalty is never 0, so lambda rose to `odedit.lambda_cap` and lambda * penalty dominated the meta-loss), and
# the bandwidths of the first batch served every later one. Eq. 13's ascent is an edit's primal-dual problem:
# lambda follows the edits at edit time (`MEND.apply`), not the hypernetwork's training.
EPISODE_K = 1


@runtime_checkable
class TrainableEditor(Protocol):
    """What `MetaTrainer` needs from an editor with trained components (MEND's hypernetwork)."""

    adapter: ModelAdapter
    cfg: Any
    trained: bool

    def meta_parameters(self) -> list[torch.nn.Parameter]: ...

    def meta_param_groups(self) -> list[dict[str, Any]]: ...

    def meta_loss(
        self, cases: Sequence[EditCase], objective: Any, k: int, reduce_sum: ReduceSum | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def apply(self, cases: Sequence[EditCase], objective: Any, stepper_factory: Any) -> tuple[Any, Any]: ...

    def save_hypernet(self, path: str) -> str: ...


class MetaTrainer:
    """Meta-trains `method` on `train_cases` under `objective`.

    Args:
        method: a `TrainableEditor` (its config gives lr, lr_lr, optimizer, train_batch, grad_clip).
        objective: the edit objective (host-only or ODEdit); its lambda-network stays as it is (`EPISODE_K`).
        train_cases, val_cases: edits (OUT references are attached when missing).
        reduce_sum: in-place sum over workers; None in a single process.
        world_size: number of workers `reduce_sum` sums over.
        seed: batch sampling seed (offset by the worker rank by the caller).
        reference_k: top-K of the OUT references attached to cases without them (ODEdit's R_loc reads them).
    """

    def __init__(
        self,
        method: TrainableEditor,
        objective: Any,
        train_cases: Sequence[EditCase],
        val_cases: Sequence[EditCase] = (),
        *,
        reduce_sum: ReduceSum | None = None,
        world_size: int = 1,
        seed: int = 0,
        reference_k: int = 64,
    ) -> None:
        if not train_cases:
            raise ValueError("meta-training needs at least one training edit")
        self.method, self.objective = method, objective
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.reduce_sum, self.world_size = reduce_sum, world_size
        self.rng = random.Random(seed)
        for cases in (self.train_cases, self.val_cases):
            missing = [c for c in cases if any(c.env(e) and e not in c.references for e in OUT_ENVS)]
            if missing:
                attach_references(method.adapter, missing, k=reference_k)
        opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[method.cfg.optimizer]
        self.params = method.meta_parameters()
        self.opt = opt_cls(method.meta_param_groups())

    def _mean_over_workers(self, tensors: list[torch.Tensor]) -> None:
        if self.reduce_sum is not None and self.world_size > 1:
            self.reduce_sum(tensors)
            for t in tensors:
                t.div_(self.world_size)

    def step(self) -> dict[str, float]:
        """One meta-training step; returns the loss parts (plus the meta-gradient norm)."""
        batch = self.rng.sample(self.train_cases, min(self.method.cfg.train_batch, len(self.train_cases)))
        model = self.method.adapter.model
        was_training = model.training
        model.eval()
        try:
            loss, parts = self.method.meta_loss(batch, self.objective, EPISODE_K, self.reduce_sum)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        finally:
            model.train(was_training)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        self._mean_over_workers(grads)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        clip = self.method.cfg.grad_clip
        scale = clip / norm if clip > 0 and norm > clip else 1.0
        for p, g in zip(self.params, grads):
            p.grad = g * scale
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {**parts, "meta_grad_norm": norm}

    def train(
        self, steps: int, on_step: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        history = []
        for i in range(steps):
            parts = self.step()
            history.append(parts)
            if on_step is not None:
                on_step(i, parts)
        self.method.trained = True
        return history

    @torch.no_grad()
    def _edit_loss(self, cases: Sequence[EditCase]) -> float:
        outs = forward_envs(self.method.adapter, encode_envs(self.method.adapter, cases, ("in", "se_text", "se_image")))
        vals = [
            reliability_risk(o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size) for o in outs.values()
        ]
        return float(torch.stack(vals).mean())

    def evaluate(self, cases: Sequence[EditCase] | None = None) -> dict[str, float]:
        """Each held-out edit applied alone with the current hypernetwork, scored and undone: mean post-edit
        NLL on IN and SE (`edit_loss`), teacher-forced exact-match reliability (`rel`), and the pre-edit NLL.
        The edits run under the host objective, so scoring never moves ODEdit's lambda-network. Sums are reduced
        over workers, so every worker returns the same numbers."""
        host = HostObjective(self.method)  # scoring must not move the lambda-network
        cases = self.val_cases if cases is None else list(cases)
        was_trained = self.method.trained
        self.method.trained = True  # scoring an untrained network is the point of the "before" numbers
        sums = torch.zeros(4, dtype=torch.float64)
        t0 = time.perf_counter()
        try:
            for case in cases:
                pre = self._edit_loss([case])
                handle, _ = self.method.apply([case], host, None)
                try:
                    post = self._edit_loss([case])
                    rel = evaluate_cases(self.method.adapter, [case], exact_match=True, metrics=["rel"])[0]["rel"]
                finally:
                    handle.restore()
                sums += torch.tensor([1.0, pre, post, float(rel)], dtype=torch.float64)
        finally:
            self.method.trained = was_trained
        if self.reduce_sum is not None and self.world_size > 1:
            self.reduce_sum([sums])
        n = max(1.0, float(sums[0]))
        return {
            "edits": int(sums[0]),
            "pre_edit_loss": float(sums[1]) / n,
            "edit_loss": float(sums[2]) / n,
            "rel": float(sums[3]) / n,
            "seconds": time.perf_counter() - t0,
        }


def _vocabulary_words(adapter: ModelAdapter, limit: int = 2000) -> list[str]:
    tok = adapter.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    words = []
    for i in range(min(len(tok), limit)):
        if i in special:
            continue
        w = tok.decode([i]).strip()
        if w.isalpha() and w not in words:
            words.append(w)
    if len(words) < 4:
        raise ValueError(f"the tokenizer has only {len(words)} alphabetic tokens; synthetic edits need >= 4")
    return words


def _random_image(rng: random.Random, size: int = 48) -> Any:
    # deferred: PIL is needed only for the synthetic bootstrap edits of tiny models
    from PIL import Image

    a = np.random.default_rng(rng.randrange(2**31)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    lo, hi = sorted(rng.sample(range(4, size - 4), 2))
    a[lo : hi + 4, lo : hi + 4] = [rng.randrange(256) for _ in range(3)]
    return Image.fromarray(a)


def synthetic_cases(adapter: ModelAdapter, n: int, seed: int = 0, prompt_words: int = 4) -> list[EditCase]:
    """`n` stand-in edits: a random prompt of vocabulary words about a random image -> a random target word;
    SE-text the same words in another order, SE-image a re-drawn image with the same prompt, OUT-text and
    OUT-mm unrelated random prompts (with and without an image) answered by a random word."""
    rng = random.Random(seed)
    words = _vocabulary_words(adapter)

    def prompt() -> list[str]:
        return [rng.choice(words) for _ in range(prompt_words)]

    cases = []
    for i in range(n):
        p = prompt()
        shuffled = p[:]
        rng.shuffle(shuffled)
        target = rng.choice(words)
        image = _random_image(rng)
        cases.append(
            EditCase(
                f"synthetic-{seed}-{i}",
                {
                    "in": [Sample(" ".join(p), target, image)],
                    "se_text": [Sample(" ".join(shuffled), target, image)],
                    "se_image": [Sample(" ".join(p), target, _random_image(rng))],
                    "out_text": [Sample(" ".join(prompt()), rng.choice(words), None)],
                    "out_mm": [Sample(" ".join(prompt()), rng.choice(words), _random_image(rng))],
                },
            )
        )
    return cases
