"""Train the demo MLLM on easy-vqa (design.md §7's measured recipe), on CPU, within a time budget.

    adapter = new_demo_adapter(work_dir, seed=0)
    stats = train_demo(adapter, DemoData.build(adapter, train_images=0, seed=0), budget_s=420, pretrain_s=60)

The recipe: a vision tower trained on the VQA loss alone never learns shape (both shape question types stay
at their answer prior), so an auxiliary linear head on the tower's mean-pooled patch features (CLS excluded)
predicts shape (3) and colour (8), with labels inferred from each training image's own questions
(`pipeline.demo.world.labels_from_questions`; images without a label are skipped for that label). The tower
is first pre-trained with that head alone (`pretrain_s`), then everything is trained jointly with
loss = answer CE + EOS CE + 1.0 x aux CE; AdamW 2e-3, weight decay 0.01, 100 warm-up steps, cosine to 0 over
the remaining time, gradient clip 1.0, horizontal flips (p 0.5) and +-3 px shifts, text-fact prompts making up
~10% of each epoch and half of the questions asked in a paraphrased form (so SE-text prompts are understood),
batches of 128. The head is training-only: it is not part of the saved model. One addition to the measured
recipe: balanced yes/no questions (`DemoData.balanced_yes_no`), which break the "answer from the question's
form" shortcut (in one run without them, colour yes/no was still at its form prior after 1,200 joint steps).

Batches are assembled from rows tokenised once by the adapter's own `encode` (`append_eos=True`) and images
preprocessed once by its image processor, so training sees exactly the inputs `encode` would build, at a
fraction of the cost per step (`DemoData.collate` is checked against `encode` in the tests).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from odedit.models.base import IGNORE, Sample
from odedit.models.llava import LlavaAdapter
from pipeline.demo.facts import text_facts
from pipeline.demo.questions import COLORS, EASY_VQA_FORMS, PARAPHRASES, SHAPES, ParsedQuestion, paraphrase
from pipeline.demo.world import DEMO_PROMPT_TEMPLATE, labels_from_questions, load_split, vocabulary_corpus
from pipeline.reporting.progress import progress as progress_bar

# design.md §7: CLIP tower 32 px, patch 8, hidden 64, 2 layers (16 image tokens); Llama hidden 128, 2 layers.
# The head count is not given there: with 4 the yes/no questions started using the image within 400 joint
# steps, as early as with 2 (single runs), and were at 96% (shape) / 94% (colour) after 800.
_SMALL = {
    "vision_hidden": 64,
    "vision_layers": 2,
    "text_hidden": 128,
    "text_layers": 2,
    "heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


@dataclass(frozen=True)
class Backbone:
    """A demo backbone (`data.demo.backbone`): its LLaVA's sizes, and how it is trained.

    Attributes:
        sizes: `LlavaAdapter.build_tiny`'s size arguments.
        grow_from: '' = trained from scratch with the recipe and `data.demo`'s step counts; else the backbone whose
            trained model (same config otherwise) is grown into this one by block expansion
            (`pipeline.demo.grow`) and trained jointly for `grow_steps` more steps at `grow_lr`.
    """

    sizes: dict[str, int]
    grow_from: str = ""
    grow_steps: int = 0
    grow_lr: float = 0.0
    grow_warmup_steps: int = 0


# 'deep' (issue 17 item 5): the same tower and widths with 6 LM layers, so an edit at an upper-middle layer (4 of
# 0-5) leaves layers above it to carry the change, as on the paper's 7B models (32 layers, edited around layers
# 20-30), instead of editing half the language model. Grown from 'small' (see pipeline.demo.grow for why).
BACKBONES: dict[str, Backbone] = {
    "small": Backbone(_SMALL),
    "deep": Backbone(
        {**_SMALL, "text_layers": 6}, grow_from="small", grow_steps=600, grow_lr=1e-3, grow_warmup_steps=50
    ),
}


def backbone(name: str) -> Backbone:
    """Demo backbone `name` (`data.demo.backbone`)."""
    if name not in BACKBONES:
        raise ValueError(
            f"data.demo.backbone={name!r} is not a demo backbone; choose one of {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[name]


def backbone_sizes(name: str) -> dict[str, int]:
    """The model sizes of demo backbone `name` (`data.demo.backbone`)."""
    return backbone(name).sizes


@dataclass(frozen=True)
class Recipe:
    """The training recipe's knobs (design.md §7); part of the demo model's cache key."""

    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    batch_size: int = 128
    aux_weight: float = 1.0
    flip_p: float = 0.5
    max_shift: int = 3
    fact_fraction: float = 0.10
    paraphrase_p: float = 0.5
    balanced_yes_no: float = 0.15  # extra balanced yes/no rows per epoch, as a share of the questions


@dataclass
class TrainStats:
    """What one training run did."""

    pretrain_steps: int = 0
    joint_steps: int = 0
    pretrain_seconds: float = 0.0
    joint_seconds: float = 0.0
    final_loss: float = float("nan")
    final_aux_loss: float = float("nan")
    aux_label_coverage: dict[str, float] = field(default_factory=dict)

    @property
    def train_seconds(self) -> float:
        return self.pretrain_seconds + self.joint_seconds


def new_demo_adapter(work_dir: str | Path, seed: int, backbone_name: str = "small") -> LlavaAdapter:
    """A freshly initialised demo-size LLaVA of `backbone_name`'s sizes (word vocabulary of the whole world), saved
    to `work_dir` and loaded back through the adapter, with the demo prompt template."""
    sizes = backbone_sizes(backbone_name)
    path = LlavaAdapter.build_tiny(work_dir, corpus=vocabulary_corpus(), seed=seed, **sizes)
    adapter = LlavaAdapter.from_pretrained(path, template=DEMO_PROMPT_TEMPLATE)
    unknown = adapter.tokenizer.unk_token_id
    for text in vocabulary_corpus():
        assert unknown not in adapter._tok(text), f"demo vocabulary misses a word of {text!r}"
    return adapter


@dataclass
class _Row:
    input_ids: list[int]
    targets: list[int]  # next-token answer labels, IGNORE off the answer


class DemoData:
    """Training rows of the demo model: easy-vqa train questions (on preprocessed image tensors) and facts.

    Attributes:
        pixels: (N_images, 3, S, S) the train images as the adapter's image processor outputs them.
        shape_labels / color_labels: (N_images,) auxiliary labels, -1 where the image's questions leave it open.
        items: (question, answer, image index) of every training question.
        facts: the text facts (question, answer).
    """

    def __init__(
        self,
        adapter: LlavaAdapter,
        pixels: torch.Tensor,
        shape_labels: torch.Tensor,
        color_labels: torch.Tensor,
        items: list[tuple[str, str, int]],
        facts: list[tuple[str, str]],
        recipe: Recipe,
        seed: int,
    ) -> None:
        self.adapter = adapter
        self.pixels = pixels
        self.shape_labels = shape_labels
        self.color_labels = color_labels
        self.items = items
        self.facts = facts
        self.recipe = recipe
        self.rng = random.Random(f"demo-train:{seed}")
        self._rows: dict[tuple[str, str, bool], _Row] = {}
        self._dummy = Image.new("RGB", (8, 8))

    @classmethod
    def build(cls, adapter: LlavaAdapter, train_images: int, seed: int, recipe: Recipe = Recipe()) -> DemoData:
        """Load the easy-vqa train split (all images, or a seeded sample of `train_images`) and preprocess it."""
        split = load_split("train")
        ids = split.image_ids()
        if train_images:
            if train_images > len(ids):
                raise ValueError(
                    f"data.demo.train_images={train_images}: easy-vqa has only {len(ids)} training "
                    f"images; use at most {len(ids)} (0 = all)"
                )
            ids = sorted(random.Random(f"demo-train-images:{seed}").sample(ids, train_images))
        index = {image_id: n for n, image_id in enumerate(ids)}
        pixels = []
        for start in range(0, len(ids), 512):
            images = [adapter._resize(split.load_image(i)) for i in ids[start : start + 512]]
            pixels.append(adapter.image_processor(images=images, return_tensors="pt")["pixel_values"])
        qas: dict[int, list[tuple[str, str]]] = {i: [] for i in ids}
        items = []
        for item in split.items:
            if item.image_id in index:
                items.append((item.question, item.answer, index[item.image_id]))
                qas[item.image_id].append((item.question, item.answer))
        labels = [labels_from_questions(qas[i]) for i in ids]
        shape_labels = torch.tensor([SHAPES.index(s) if s else -1 for s, _ in labels])
        color_labels = torch.tensor([COLORS.index(c) if c else -1 for _, c in labels])
        return cls(adapter, torch.cat(pixels), shape_labels, color_labels, items, text_facts(), recipe, seed)

    # ---------------------------------------------------------------------------------------------- rows

    def row(self, prompt: str, answer: str, has_image: bool) -> _Row:
        """One row tokenised by the adapter's own `encode` (cached per text)."""
        key = (prompt, answer, has_image)
        if key not in self._rows:
            sample = Sample(prompt, answer, self._dummy if has_image else None)
            enc = self.adapter.encode([sample], append_eos=True)
            self._rows[key] = _Row(enc.inputs["input_ids"][0].tolist(), enc.targets[0].tolist())
        return self._rows[key]

    def epoch(self) -> list[tuple[str, str, int]]:
        """One shuffled epoch of (prompt, answer, image index or -1): every question once (a paraphrase with
        probability `paraphrase_p`), balanced yes/no questions (`balanced_yes_no`), and text facts making up
        `fact_fraction` of the epoch."""
        r = self.recipe
        rows = [(paraphrase(q, self.rng) if self.rng.random() < r.paraphrase_p else q, a, i) for q, a, i in self.items]
        rows += self.balanced_yes_no(round(len(rows) * r.balanced_yes_no))
        n_facts = round(len(rows) * r.fact_fraction / (1 - r.fact_fraction))
        facts = [self.facts[k % len(self.facts)] for k in range(n_facts)]
        rows += [(q, a, -1) for q, a in facts]
        self.rng.shuffle(rows)
        return rows

    def balanced_yes_no(self, count: int) -> list[tuple[str, str, int]]:
        """`count` yes/no questions about labelled images that name the image's own shape or colour half the
        time (easy-vqa's name it 1 time in 3 for shapes, 1 in 8 for colours).

        [ADDED to design.md §7's recipe] With easy-vqa's own questions a model first learns to answer yes/no
        from the question's form alone ("is there a red shape?" -> "no" is right 7 times in 8) and only later
        looks at the image; balanced questions make the image the only useful cue from the start. Labels come
        from each image's own questions (`labels_from_questions`), like the auxiliary head's.
        """
        both = torch.nonzero((self.shape_labels >= 0) & (self.color_labels >= 0)).flatten().tolist()
        if not both or count <= 0:
            return []
        rows = []
        for _ in range(count):
            i = self.rng.choice(both)
            shape, color = SHAPES[int(self.shape_labels[i])], COLORS[int(self.color_labels[i])]
            qtype = self.rng.choice(("shape_yes_no", "color_yes_no"))
            own, pool = (shape, SHAPES) if qtype == "shape_yes_no" else (color, COLORS)
            slot = own if self.rng.random() < 0.5 else self.rng.choice([v for v in pool if v != own])
            question = ParsedQuestion(qtype, self.rng.choice(("pos", "neg")), slot)
            forms = PARAPHRASES if self.rng.random() < self.recipe.paraphrase_p else EASY_VQA_FORMS
            rows.append((question.render(self.rng.choice(forms[question.key])), question.answer(shape, color), i))
        return rows

    def collate(
        self, rows: Sequence[tuple[str, str, int]], augment: bool, generator: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(model inputs, (B, L) targets, (N_img,) image indices) of a batch, right-padded like `encode`."""
        encoded = [self.row(p, a, i >= 0) for p, a, i in rows]
        length = max(len(e.input_ids) for e in encoded)
        pad = self.adapter.tokenizer.pad_token_id
        input_ids = torch.tensor([e.input_ids + [pad] * (length - len(e.input_ids)) for e in encoded])
        attention = torch.tensor([[1] * len(e.input_ids) + [0] * (length - len(e.input_ids)) for e in encoded])
        targets = torch.tensor([e.targets + [IGNORE] * (length - len(e.targets)) for e in encoded])
        image_index = torch.tensor([i for _, _, i in rows if i >= 0], dtype=torch.long)
        inputs = {"input_ids": input_ids, "attention_mask": attention}
        if image_index.numel():
            pixels = self.pixels[image_index]
            inputs["pixel_values"] = self.augment(pixels, generator) if augment else pixels
        return inputs, targets, image_index

    def augment(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random horizontal flips and shifts of up to `max_shift` pixels; uncovered borders take the image's
        own background (its corner pixel), so no shape is smeared or wrapped around."""
        r = self.recipe
        b, c, h, w = pixels.shape
        s = r.max_shift
        canvas = pixels[:, :, :1, :1].expand(b, c, h + 2 * s, w + 2 * s).clone()  # the background colour
        canvas[:, :, s : s + h, s : s + w] = pixels
        dy, dx = torch.randint(0, 2 * s + 1, (2, b, 1), generator=generator)
        cols = torch.arange(w).expand(b, w)
        flip = torch.rand(b, generator=generator) < r.flip_p
        cols = torch.where(flip[:, None], cols.flip(-1), cols) + dx
        rows = torch.arange(h).expand(b, h) + dy
        out = canvas[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
        return out.permute(0, 3, 1, 2).contiguous()


class AuxHead(nn.Module):
    """Linear shape (3) + colour (8) classifier on the mean of the tower's patch features (no CLS)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, len(SHAPES) + len(COLORS))

    def loss(self, patch_states: torch.Tensor, shape_labels: torch.Tensor, color_labels: torch.Tensor) -> torch.Tensor:
        """Mean CE of shape and of colour over the labelled images; `patch_states` is (N, 1 + P, H)."""
        logits = self.linear(patch_states[:, 1:].mean(1))
        shape_logits, color_logits = logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]
        loss = patch_states.new_zeros(())
        if (shape_labels >= 0).any():
            loss = loss + F.cross_entropy(shape_logits, shape_labels, ignore_index=-1)
        if (color_labels >= 0).any():
            loss = loss + F.cross_entropy(color_logits, color_labels, ignore_index=-1)
        return loss


def _lr(recipe: Recipe, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup_steps)
    return recipe.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(data: DemoData):
    """Endless batches of rows, epoch after epoch."""
    while True:
        rows = data.epoch()
        for start in range(0, len(rows) - data.recipe.batch_size + 1, data.recipe.batch_size):
            yield rows[start : start + data.recipe.batch_size]


def _image_batches(data: DemoData, generator: torch.Generator):
    """Endless batches of indices of images with at least one aux label (the tower's pre-training)."""
    labelled = torch.nonzero((data.shape_labels >= 0) | (data.color_labels >= 0)).flatten()
    if labelled.numel() == 0:
        raise ValueError("no training image has a shape or colour label; raise data.demo.train_images")
    size = min(data.recipe.batch_size, int(labelled.numel()))
    while True:
        order = labelled[torch.randperm(labelled.numel(), generator=generator)]
        for start in range(0, order.numel() - size + 1, size):
            yield order[start : start + size]


def train_demo(
    adapter: LlavaAdapter,
    data: DemoData,
    budget_s: float,
    pretrain_s: float,
    seed: int = 0,
    progress: bool = True,
    max_steps: int = 0,
    max_pretrain_steps: int = 0,
) -> TrainStats:
    """Pre-train the tower with the aux head for `pretrain_s`, then train everything for the rest of
    `budget_s` (wall-clock seconds, so results depend on the machine's speed and load).

    `max_pretrain_steps` / `max_steps` (0 = train for the time) make a phase exactly that many steps, whatever
    its time: the time budget then ends nothing (the caller warns when it was exceeded), and with `max_steps`
    the cosine schedule follows steps instead of time, so the model is the same whatever the machine's load
    (issue 19 item 20: a time cap that cut a run short had cached a weaker model under the same key).
    """
    if not 0 <= pretrain_s < budget_s:
        raise ValueError(
            f"pretrain time {pretrain_s}s must be >= 0 and below the budget {budget_s}s "
            "(data.demo.pretrain_minutes < data.demo.train_minutes)"
        )
    r = data.recipe
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = adapter.model
    model.train()
    tower = adapter.vision_tower()
    head = AuxHead(tower.config.hidden_size)
    captured: dict[str, torch.Tensor] = {}
    hook = tower.register_forward_hook(lambda _m, _i, out: captured.__setitem__("states", out.last_hidden_state))
    stats = TrainStats(
        aux_label_coverage={
            "shape": float((data.shape_labels >= 0).float().mean()),
            "color": float((data.color_labels >= 0).float().mean()),
        }
    )
    bar = progress_bar(  # a tqdm bar on a terminal, a line per 10% in a log
        total=round(budget_s),
        unit="s",
        desc="demo model",
        disable=not progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{postfix}]",
    )
    try:
        # --- phase 1: the tower and the aux head alone
        params = list(tower.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        start = time.perf_counter()
        batches = _image_batches(data, generator)
        while (
            stats.pretrain_steps < max_pretrain_steps
            if max_pretrain_steps
            else time.perf_counter() - start < pretrain_s
        ):
            idx = next(batches)
            pixels = data.augment(data.pixels[idx], generator)
            for g in opt.param_groups:
                g["lr"] = _lr(r, stats.pretrain_steps, 0.0)
            tower(pixels)
            loss = head.loss(captured["states"], data.shape_labels[idx], data.color_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
            opt.step()
            stats.pretrain_steps += 1
            stats.final_aux_loss = float(loss.detach())
            _tick(bar, start, 0.0, f"tower step {stats.pretrain_steps} aux {float(loss.detach()):.3f}")
        stats.pretrain_seconds = time.perf_counter() - start

        # --- phase 2: everything, answer + EOS CE + aux CE
        params = list(model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        joint_budget = budget_s - stats.pretrain_seconds
        start = time.perf_counter()
        batches = _batches(data)
        while stats.joint_steps < max_steps if max_steps else (elapsed := time.perf_counter() - start) < joint_budget:
            inputs, targets, idx = data.collate(next(batches), augment=True, generator=generator)
            done = stats.joint_steps / max_steps if max_steps else elapsed / joint_budget
            for g in opt.param_groups:
                g["lr"] = _lr(r, stats.joint_steps, done)
            captured.clear()
            logits = model(**inputs, use_cache=False, return_dict=True).logits
            mask = targets >= 0
            loss = F.cross_entropy(logits[mask], targets[mask])
            aux = (
                head.loss(captured["states"], data.shape_labels[idx], data.color_labels[idx])
                if idx.numel()
                else loss.new_zeros(())
            )
            total = loss + r.aux_weight * aux
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, r.grad_clip)
            opt.step()
            stats.joint_steps += 1
            stats.final_loss, stats.final_aux_loss = float(loss.detach()), float(aux.detach())
            _tick(
                bar,
                start,
                stats.pretrain_seconds,
                f"step {stats.joint_steps} loss {float(loss.detach()):.3f} aux {float(aux.detach()):.3f}",
            )
        stats.joint_seconds = time.perf_counter() - start
    finally:
        hook.remove()
        bar.close()
    model.eval()
    return stats


def _tick(bar: Any, start: float, offset: float, postfix: str) -> None:
    done = min(bar.total, offset + time.perf_counter() - start)
    bar.update(done - bar.n)
    if bar.n and int(bar.n) % 5 == 0:
        bar.set_postfix_str(postfix, refresh=False)
