"""The model-adapter interface: how a batch of (image or none, prompt, target) becomes model inputs and labels.

One adapter per MLLM family (`odedit.models.<family>`) subclasses `ModelAdapter` and fills in a few hooks:
where image tokens go and how many there are, how images become tensors, which modules are the language
model's decoder layers, and (rarely) how to run the forward pass. Everything else, tokenisation, padding on
either side, the answer-position mask, pooling of the last hidden state and greedy decoding, is shared here,
so no code outside this package branches on a family name.

Alignment convention (used by every metric and risk): logits at position t predict token t+1. `targets[b, t]`
holds token t+1 where that token belongs to the target answer and -100 elsewhere; `answer_mask = targets >= 0`.
So `logits[answer_mask]` are exactly the answer-position logits and `targets[answer_mask]` their labels,
whatever the padding side.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from odedit.models.pixels import BatchedPixels
from odedit.sample import Sample  # noqa: F401  (re-exported: adapters encode Samples)

IGNORE = -100
IMAGE_MARKER = "<image>"  # where a template puts the image; rows without an image drop it


@dataclass
class EncodedBatch:
    """Model inputs plus the bookkeeping every metric and risk needs.

    Attributes:
        inputs: keyword arguments of the model's forward (input_ids, attention_mask, pixel_values, ...).
        targets: (B, L) next-token answer labels aligned with logits, -100 off the answer.
        prompt_mask: (B, L) True on prompt positions (image tokens included), False on answer and padding.
        last_prompt: (B,) index of the last prompt token, whose logits predict the first answer token.
        has_image: (B,) whether the row carries an image.
    """

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    prompt_mask: torch.Tensor
    last_prompt: torch.Tensor
    has_image: torch.Tensor

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.targets >= 0

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    def rows(self, rows: slice) -> EncodedBatch:
        """A contiguous range of the batch's rows (one environment of a merged batch)."""
        return EncodedBatch(
            {k: v[rows] for k, v in self.inputs.items() if v.shape[:1] == self.targets.shape[:1]},
            self.targets[rows],
            self.prompt_mask[rows],
            self.last_prompt[rows],
            self.has_image[rows],
        )

    def to(self, device: torch.device | str) -> EncodedBatch:
        return EncodedBatch(
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            targets=self.targets.to(device),
            prompt_mask=self.prompt_mask.to(device),
            last_prompt=self.last_prompt.to(device),
            has_image=self.has_image.to(device),
        )


@dataclass
class ForwardOutput:
    """Logits and last hidden states of one forward pass, with the batch that produced them."""

    logits: torch.Tensor  # (B, L, V)
    hidden: torch.Tensor  # (B, L, H), last layer
    batch: EncodedBatch

    def select(self, rows: slice, batch: EncodedBatch | None = None) -> ForwardOutput:
        """The outputs of a contiguous range of batch rows (one environment of a merged forward pass);
        `batch`: `self.batch.rows(rows)` when the caller already cut it."""
        return ForwardOutput(
            self.logits[rows], self.hidden[rows], batch if batch is not None else self.batch.rows(rows)
        )

    def take_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, V) logits at flat positions `flat` (row * length + column)."""
        return self.logits.reshape(-1, self.logits.shape[-1]).index_select(0, flat)

    def take_hidden(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, H) last hidden states at flat positions `flat` (row * length + column)."""
        return self.hidden.reshape(-1, self.hidden.shape[-1]).index_select(0, flat)

    def answer_logits(self) -> torch.Tensor:
        """(N, V) logits at all answer positions of the batch, row-major."""
        return self.logits[self.batch.answer_mask]

    def answer_targets(self) -> torch.Tensor:
        """(N,) answer token ids matching `answer_logits`."""
        return self.batch.targets[self.batch.answer_mask]

    def answer_row(self) -> torch.Tensor:
        """(N,) the batch row of each answer position (for per-sample reductions)."""
        mask = self.batch.answer_mask
        rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
        return rows[mask]

    def pooled(self, pooling: str) -> torch.Tensor:
        """(B, H) the prompt representation z(m, x) used by R_gen (method.md §2.4, Eq. 6).

        [INFERENCE] "last hidden states" is read as the final layer's state at the last prompt token
        (`pooling="last"`: the state from which the answer is decoded) or its mean over prompt positions,
        image tokens included (`pooling="mean"`).
        """
        if pooling == "last":
            idx = self.batch.last_prompt.to(self.hidden.device)
            return self.hidden[torch.arange(self.hidden.shape[0], device=self.hidden.device), idx]
        if pooling == "mean":  # summed in fp32: a bf16 sum over ~600 positions keeps about 2 significant digits
            hidden = self.hidden.float()
            m = self.batch.prompt_mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


# (model class, name or path, dtype, device) -> the loaded model, on its device (ModelAdapter.from_pretrained).
ModelLoader = Callable[[Any, str, torch.dtype, str], nn.Module]


class ModelLoadError(ValueError):
    """A model directory or hub name that cannot be loaded as the configured family."""


class ModelAdapter(ABC):
    """Base class of the per-family adapters.

    Subclasses set `family`, `model_class`, `default_template`, `MODULE_KINDS`, and implement
    `_image_block`, `decoder_layers`, `build_tiny`, and optionally `_forward_model`, `_extra_inputs`,
    `_collate_images`, `_load_processors`.
    """

    family: ClassVar[str] = ""
    model_type: ClassVar[str] = ""  # config.model_type of checkpoints of this family
    default_template: ClassVar[str] = "Question: {} Short answer:"
    image_before_bos: ClassVar[bool] = False
    # Module kinds -> attribute path inside one decoder layer.
    MODULE_KINDS: ClassVar[Mapping[str, str]] = {
        "ffn_in": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
        "attn_out": "self_attn.o_proj",
    }
    # Module kind -> the submodule of the same decoder layer whose input is the residual stream that the
    # kind's output is added to, where the layer ends with `residual + module(x)` (LLaMA, Qwen2, Vicuna: the
    # MLP's output projection after post_attention_layernorm). Used by `odedit.models.tail.TailRunner`, which
    # also checks the claim on every step's full pass.
    RESIDUAL_INPUTS: ClassVar[Mapping[str, str]] = {"ffn_out": "post_attention_layernorm"}

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_processor: Any,
        template: str = "",
        pooling: str = "last",
        max_prompt_tokens: int = 96,
        image_size: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template or self.default_template
        self.pooling = pooling
        self.max_prompt_tokens = max_prompt_tokens
        self.image_size = image_size
        self._pixels: Any = None  # odedit.models.pixels.BatchedPixels, made on first use

    # ------------------------------------------------------------------------------------------ loading

    model_class: ClassVar[Any] = None  # callable returning the transformers class (lazy import)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        loader: ModelLoader | None = None,
        **kwargs: Any,
    ) -> ModelAdapter:
        """Load model, tokenizer and image processor from a hub name or a local directory.

        `loader(model_class, name_or_path, dtype, device)` builds the model instead of transformers'
        `from_pretrained` + `.to(device)`: the distributed engine passes one that loads the weights already
        partitioned under DeepSpeed ZeRO-3 (issue 16 item 2, `pipeline.train.zero_loading`).
        """
        check_loadable(name_or_path, cls.model_type, cls.family)
        if loader is None:
            model = cls.model_class().from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
            model.to(device)
        else:
            model = loader(cls.model_class(), name_or_path, dtype, device)
        model.eval()
        tokenizer, image_processor = cls._load_processors(name_or_path)
        return cls(model, tokenizer, image_processor, **kwargs)

    @classmethod
    def _load_processors(cls, name_or_path: str) -> tuple[Any, Any]:
        # deferred: transformers is imported only when a model is loaded
        from transformers import AutoImageProcessor, AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out_dir)

    @classmethod
    @abstractmethod
    def build_tiny(
        cls, out_dir: str | os.PathLike, corpus: Sequence[str] | None = None, seed: int = 0, **sizes: Any
    ) -> str:
        """Build a tiny random model of this family with an offline tokenizer and save it to `out_dir`."""

    # ------------------------------------------------------------------------------------------ family hooks

    @abstractmethod
    def _image_block(self, image: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Token ids standing for one image, and its processed tensors (each with a leading image dim)."""

    def _image_blocks(self, images: Sequence[Any]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """`_image_block` of each image; families whose processor takes a batch override it with one call."""
        return [self._image_block(image) for image in images]

    def _fixed_pixel_blocks(
        self, images: Sequence[Any], n_tokens: int
    ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        """One image-processor call for images that each become `n_tokens` image tokens and one (1, C, H, W)
        slice of pixel_values (LLaVA, BLIP-2, MiniGPT-4). Needs `self.image_token_id`."""
        pixels = self.pixel_values([image.convert("RGB") for image in images])
        ids = [self.image_token_id] * n_tokens  # type: ignore[attr-defined]
        return [(ids, {"pixel_values": pixels[i : i + 1]}) for i in range(len(images))]

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """The image processor's `pixel_values` for RGB images, batched (`odedit.models.pixels`; bit-identical,
        verified per image kind)."""
        if self._pixels is None or self._pixels.processor is not self.image_processor:
            self._pixels = BatchedPixels(self.image_processor)
        return self._pixels(images)

    def _collate_images(self, feats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not feats:
            return {}
        return {k: torch.cat([f[k] for f in feats], 0) for k in feats[0]}

    def _extra_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers (where editors act)."""

    def _forward_model(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        return out.logits, out.hidden_states[-1]

    # ------------------------------------------------------------------------------------------ shared

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def _tok(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prompt_parts(self, prompt: str, has_image: bool) -> tuple[str, str]:
        text = self.template.replace("{}", prompt, 1) if "{}" in self.template else f"{self.template} {prompt}"
        if IMAGE_MARKER in text:
            before, after = text.split(IMAGE_MARKER, 1)
            if not has_image:  # drop the marker and the line break or space that follows it
                return "", before + (after[1:] if after[:1] in ("\n", " ") else after)
            return before, after
        return "", text

    def _tok_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`_tok` of each text in one tokenizer call (empty texts give [])."""
        todo = [t for t in dict.fromkeys(texts) if t]
        ids = dict(zip(todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"])) if todo else {}
        return [list(ids[t]) if t else [] for t in texts]

    @staticmethod
    def _with_target(prompt_tail: str, target: str) -> str:
        """The prompt's last segment followed by the target: a space between them unless the template already
        ends with white space (chat templates end with a newline)."""
        return prompt_tail + ("" if prompt_tail[-1:].isspace() else " ") + target

    def _target_ids(self, prompt_tail: str, target: str, alone: list[int], joint: list[int]) -> list[int]:
        """Token ids of `target` as they follow `prompt_tail` in the full text.

        `alone` and `joint` are the prompt's last segment tokenised without and with the target
        (`_with_target`); when the latter extends the former (true for word-level, BPE and sentencepiece
        tokenizers on a word boundary) the extension is the target, so answers are tokenised as the model
        sees them in context.
        """
        if not target:
            return []
        if len(joint) > len(alone) and joint[: len(alone)] == alone:
            return joint[len(alone) :]
        return self._tok(self._with_target(prompt_tail, target)[len(prompt_tail) :])

    def _resize(self, image: Any) -> Any:
        if self.image_size and image is not None:
            image = image.convert("RGB").resize((self.image_size, self.image_size))
        return image

    def encode(
        self, samples: Sequence[Sample], padding_side: str = "right", append_eos: bool = False, with_target: bool = True
    ) -> EncodedBatch:
        """Tokenise a batch: [image block] + BOS + prompt (+ target [+ EOS]) with answer-aligned targets.

        Args:
            samples: the rows; rows with and without images may be mixed.
            padding_side: "right" or "left".
            append_eos: add EOS after the target (used to train models that stop after an answer).
            with_target: False encodes the prompt only (for generation).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tok = self.tokenizer
        bos = tok.bos_token_id
        rows: list[list[int]] = []
        prompt_lens: list[int] = []
        # One image-processor call and one tokenizer call for the whole batch (per-sample calls dominated the
        # encoding of a 16-edit step's 80 rows).
        parts = [self._prompt_parts(s.prompt, s.image is not None) for s in samples]
        # Each distinct image object is processed once (a step's text rephrases share the edit prompt's image).
        images = {id(s.image): s.image for s in samples if s.image is not None}
        processed = dict(zip(images, self._image_blocks([self._resize(image) for image in images.values()])))
        blocks = iter([processed[id(s.image)] for s in samples if s.image is not None])
        tails = [after if after else before for before, after in parts]  # the segment the target follows
        texts = [
            t
            for (before, after), tail, s in zip(parts, tails, samples)
            for t in (before, after, self._with_target(tail, s.target) if with_target and s.target else "")
        ]
        tokens = iter(self._tok_many(texts))
        feats: list[dict[str, torch.Tensor]] = []
        for s, (_before, after), tail in zip(samples, parts, tails):
            has_image = s.image is not None
            img_ids: list[int] = []
            if has_image:
                img_ids, f = next(blocks)
                feats.append(f)
            before_ids, after_ids, joint_ids = next(tokens), next(tokens), next(tokens)
            tail_ids = after_ids if after else before_ids  # untruncated, as the target's context
            budget = self.max_prompt_tokens
            if len(before_ids) + len(after_ids) > budget:  # truncate text from the left, keep image tokens
                drop = len(before_ids) + len(after_ids) - budget
                cut = min(drop, len(before_ids))
                before_ids = before_ids[cut:]
                after_ids = after_ids[drop - cut :]
            ids: list[int] = []
            if has_image and self.image_before_bos:
                ids += img_ids
            if bos is not None:
                ids.append(bos)
            ids += before_ids
            if has_image and not self.image_before_bos:
                ids += img_ids
            ids += after_ids
            prompt_lens.append(len(ids))
            if with_target:
                ids = ids + self._target_ids(tail, s.target, tail_ids, joint_ids)
                if append_eos:
                    ids.append(tok.eos_token_id)
            rows.append(ids)
        L = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Rows are laid out in Python lists and become tensors in one call each (per-row tensor writes cost
        # ~6 dispatched ops per row, ~500 for a 16-edit step).
        offsets = [L - len(ids) if padding_side == "left" else 0 for ids in rows]
        padded, labels = [], []
        for ids, plen, off in zip(rows, prompt_lens, offsets):
            padded.append([pad] * off + ids + [pad] * (L - off - len(ids)))
            # positions plen-1 .. len-2 predict tokens plen .. len-1
            answer = ids[plen:]
            start = off + plen - 1
            labels.append([IGNORE] * start + answer + [IGNORE] * (L - start - len(answer)) if answer else [IGNORE] * L)
        input_ids = torch.tensor(padded, dtype=torch.long)
        targets = torch.tensor(labels, dtype=torch.long)
        pos = torch.arange(L)
        off_t = torch.tensor(offsets, dtype=torch.long).unsqueeze(1)
        attention = ((pos >= off_t) & (pos < off_t + torch.tensor([len(r) for r in rows]).unsqueeze(1))).long()
        prompt_end = off_t + torch.tensor(prompt_lens, dtype=torch.long).unsqueeze(1)
        prompt_mask = (pos >= off_t) & (pos < prompt_end)
        last_prompt = prompt_end.squeeze(1) - 1
        inputs = {"input_ids": input_ids, "attention_mask": attention}
        inputs.update(self._collate_images(feats))
        inputs.update(self._extra_inputs(input_ids, attention))
        has_image = torch.tensor([s.image is not None for s in samples], dtype=torch.bool)
        return EncodedBatch(inputs, targets, prompt_mask, last_prompt, has_image)

    def forward(self, batch: EncodedBatch) -> ForwardOutput:
        """One forward pass; gradients flow unless the caller disables them."""
        batch = batch.to(self.device)
        inputs = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
        # Editors' hooks read the rows' last prompt positions from here (`odedit.methods.taps.ForwardTap`).
        self.batch_in_flight = batch
        try:
            logits, hidden = self._forward_model(inputs)
        finally:
            self.batch_in_flight = None
        return ForwardOutput(logits=logits, hidden=hidden, batch=batch)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def run(self, samples: Sequence[Sample], **encode_kwargs: Any) -> ForwardOutput:
        return self.forward(self.encode(samples, **encode_kwargs))

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int = 8) -> list[str]:
        """Greedy decoding from each prompt (no KV cache: answers are short), stopping at EOS."""
        batch = self.encode(samples, padding_side="left", with_target=False)
        eos = self.tokenizer.eos_token_id
        ids, att = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(ids.shape[0])]
        for _ in range(max_new_tokens):
            step = EncodedBatch(
                {**batch.inputs, "input_ids": ids, "attention_mask": att},
                batch.targets,
                batch.prompt_mask,
                batch.last_prompt,
                batch.has_image,
            )
            step.inputs.update(self._extra_inputs(ids, att))
            logits = self.forward(step).logits[:, -1].float().cpu()
            nxt = logits.argmax(-1)
            for b in range(ids.shape[0]):
                if not done[b]:
                    if nxt[b].item() == eos:
                        done[b] = True
                    else:
                        out[b].append(int(nxt[b]))
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt.unsqueeze(1)], 1)
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]

    # ------------------------------------------------------------------------------------------ modules

    def edit_modules(self, kinds: Sequence[str], layers: Sequence[int]) -> dict[str, nn.Module]:
        """Qualified name -> module for each (layer, kind); names are relative to `self.model`."""
        layer_list = self.decoder_layers()
        n = len(layer_list)
        prefix = _module_name(self.model, layer_list)
        out: dict[str, nn.Module] = {}
        for layer in layers:
            if not -n <= layer < n:
                raise ValueError(
                    f"method.layers: layer {layer} is out of range for a {n}-layer language model; use 0..{n - 1}"
                )
            li = layer % n
            for kind in kinds:
                if kind not in self.MODULE_KINDS:
                    raise ValueError(
                        f"method.modules: unknown module kind {kind!r} for {self.family}; "
                        f"known: {', '.join(self.MODULE_KINDS)}"
                    )
                path = self.MODULE_KINDS[kind]
                module = layer_list[li].get_submodule(path)
                out[f"{prefix}.{li}.{path}"] = module
        return out

    def position_tail(self, kind: str) -> tuple[nn.Module, nn.Module] | None:
        """(the last decoder layer's `kind` module, the module whose input is the residual it is added to), or
        None where the family declares no such pair (`RESIDUAL_INPUTS`)."""
        path = self.RESIDUAL_INPUTS.get(kind)
        layer = self.decoder_layers()[-1]
        if path is None or kind not in self.MODULE_KINDS:
            return None
        try:
            return layer.get_submodule(self.MODULE_KINDS[kind]), layer.get_submodule(path)
        except AttributeError:
            return None

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """What the model does between its last decoder layer and the LM head (the final norm; OPT also has an
        optional projection). The result is the "last hidden state" every adapter returns."""
        stack = self._decoder_stack()
        norm = getattr(stack, "norm", None)
        if norm is not None:  # LLaMA, Qwen2, Vicuna
            return norm(h)
        final = getattr(stack, "final_layer_norm", None)  # OPT
        if final is not None:
            h = final(h)
        project = getattr(stack, "project_out", None)
        return project(h) if project is not None else h

    def _decoder_stack(self) -> nn.Module:
        """The module holding `decoder_layers()` as its `layers` attribute."""
        layers = self.decoder_layers()
        for module in self.model.modules():
            if getattr(module, "layers", None) is layers:
                return module
        raise ValueError(f"{self.family}: no module holds the decoder layers as `.layers`; override final_hidden")

    def output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")


def check_loadable(name_or_path: str, model_type: str, family: str) -> None:
    """Fail early with a clear message on a missing directory or a checkpoint of another family."""
    if not name_or_path:
        raise ModelLoadError(f"model.name_or_path: empty for family {family!r}; give a hub name or a local directory")
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local:
        cfg_path = os.path.join(name_or_path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelLoadError(
                f"model.name_or_path: {name_or_path!r} has no config.json; point it at a directory written by "
                "save_pretrained (or a hub name where a hub is reachable)"
            )
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                found = json.load(fh).get("model_type")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model.name_or_path: {cfg_path!r} is not readable JSON ({exc})") from None
        if model_type and found != model_type:
            raise ModelLoadError(
                f"model.family: {family!r} expects a {model_type!r} checkpoint but {name_or_path!r} holds "
                f"model_type={found!r}; set model.family to the matching adapter"
            )
        check_safetensors(name_or_path)


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(directory: str) -> None:
    """Refuse a local checkpoint whose weights are pickled: unpickling a file can run any code in it.

    Model weights are loaded with `use_safetensors=True`; this check gives the project's own message (what was
    found and how to convert it) before transformers' generic one.
    """
    names = os.listdir(directory)
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHTS))
    if pickled:
        raise ModelLoadError(
            f"model.name_or_path: {directory!r} holds pickled weights ({', '.join(pickled)}) and no .safetensors; "
            "this project never unpickles checkpoints (a pickle can run code). Convert them once, in an "
            "environment you trust, with transformers' save_pretrained (it writes safetensors), and point "
            "model.name_or_path at the result"
        )
