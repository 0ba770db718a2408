"""Forward taps for the editors that act through hooks inside the language model (T-Patcher, WISE, GRACE).

    tap = ForwardTap.of(adapter)       # one per model, shared by every editor installed on it
    x = tap.rows(h)                    # a hooked module's (B, L, D) or flattened (B*L, D) tensor, as (B, L, D)
    tap.valid                          # (B, L) True on real tokens of the current forward (its attention mask)
    tap.key_positions()                # (B,) each row's last prompt token (GRACE's key position)

A module hook sees only its own tensors: it cannot tell padding from tokens, and it does not know which
environment a forward belongs to. The tap gets both from one forward pre-hook on the language model's base
module (the parent of `adapter.decoder_layers()`), which every adapter family calls with the keyword
`attention_mask` (B, L) aligned with `EncodedBatch.targets` (checked for llava, blip2_opt, instructblip, minigpt4
and qwen2_vl under transformers 5; OPT's FFN sees its input flattened to (B*L, D), hence `rows`).

A forward may also skip the base module: `odedit.models.prefix.PrefixRunner` replays only the decoder layers
above the first edited one, on the batch of its preceding full forward. A pre-hook on every decoder layer
notices the layer sequence restarting and treats it as a new forward of that same batch (same mask).

While an edit step records (`start` ... `stop`), each forward opens one record into which hooks `put` what their
editor's loss needs. `take(outs)` hands each environment its rows of the iteration's recorded forward(s): the
environments' outputs are consecutive row ranges of one merged forward (`odedit.editstep.forward_envs`), or of
one forward each; shapes are checked, so a mismatch fails loudly instead of pairing the wrong tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from odedit.models.base import ForwardOutput, ModelAdapter

ATTR = "_odedit_forward_tap"


def layer_at_depth(n_layers: int, fraction: float) -> int:
    """The decoder layer at `fraction` of the depth (0 = first, 1 = last), for editors whose papers pick a
    mid-to-late layer rather than the last one."""
    return min(n_layers - 1, max(0, round(fraction * (n_layers - 1))))


def _base_module(adapter: ModelAdapter) -> nn.Module:
    """The module that owns the decoder layers (LlamaModel, OPTDecoder, Qwen2VLTextModel, ...)."""
    layers = adapter.decoder_layers()
    for name, module in adapter.model.named_modules():
        if module is layers:
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            return adapter.model.get_submodule(parent) if parent else adapter.model
    raise ValueError("the adapter's decoder layers are not part of its model")


class ForwardTap:
    """Per-forward context for editor hooks: the current row mask and, while recording, one record per forward.

    Attributes:
        valid: (B, L) bool, True on real tokens of the forward in progress (all True without an attention mask).
        recording: whether forwards open records.
        records: one dict per recorded forward: "_valid" plus whatever hooks `put`.
    """

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None
        self.last_prompt: torch.Tensor | None = None  # (B,) of the forward in progress, when its adapter says
        self.adapter: ModelAdapter | None = None
        self.recording = False
        self.records: list[dict[str, Any]] = []
        self._pos = -1  # index of the last decoder layer entered in the current forward
        self._handles: list[Any] = []

    @classmethod
    def of(cls, adapter: ModelAdapter) -> ForwardTap:
        """The tap of `adapter`'s model, installed on first use."""
        base = _base_module(adapter)
        tap = getattr(base, ATTR, None)
        if tap is None:
            tap = cls()
            tap._handles.append(base.register_forward_pre_hook(tap._on_forward, with_kwargs=True))
            for i, layer in enumerate(adapter.decoder_layers()):
                tap._handles.append(layer.register_forward_pre_hook(tap._on_layer(i), with_kwargs=True))
            setattr(base, ATTR, tap)
        tap.adapter = adapter  # whose `batch_in_flight` gives the rows' last prompt positions
        return tap

    def _open(self) -> None:
        if self.recording:
            self.records.append({"_valid": self.valid})

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        ref = ids if torch.is_tensor(ids) else embeds if torch.is_tensor(embeds) else None
        if ref is None and args and torch.is_tensor(args[0]):
            ref = args[0]
        if ref is None:
            self.valid = None
        elif torch.is_tensor(mask) and mask.dim() == 2 and tuple(mask.shape) == tuple(ref.shape[:2]):
            self.valid = mask.to(ref.device).bool()
        else:  # no padding mask (or a pre-expanded one): every position is a token
            self.valid = torch.ones(tuple(ref.shape[:2]), dtype=torch.bool, device=ref.device)
        batch = getattr(self.adapter, "batch_in_flight", None)
        self.last_prompt = None
        if batch is not None and self.valid is not None and batch.last_prompt.shape[0] == self.valid.shape[0]:
            self.last_prompt = batch.last_prompt.to(self.valid.device)
        self._pos = -1
        self._open()

    def _on_layer(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index <= self._pos:  # the layers restart without the base module: a prefix replay
                h = args[0] if args else kwargs.get("hidden_states")
                if self.valid is None or (torch.is_tensor(h) and tuple(h.shape[:2]) != tuple(self.valid.shape)):
                    raise RuntimeError(
                        "a decoder-layer replay does not match the last full forward's batch; "
                        "editor hooks cannot tell its padding"
                    )
                self._open()
            self._pos = index

        return hook

    # ------------------------------------------------------------------------------------------ shapes

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, L, D) or (B*L, D) from inside the current forward, as (B, L, D)."""
        if self.valid is None:
            raise RuntimeError("no forward in progress: the language model was called without input_ids/inputs_embeds")
        b, length = self.valid.shape
        if x.dim() == 3 and tuple(x.shape[:2]) == (b, length):
            return x
        if x.dim() == 2 and x.shape[0] == b * length:
            return x.reshape(b, length, x.shape[-1])
        raise RuntimeError(
            f"hooked tensor of shape {tuple(x.shape)} does not match the forward's (B, L) = {(b, length)}"
        )

    def key_positions(self) -> torch.Tensor:
        """(B,) one position per row of the current forward: its last prompt token (`EncodedBatch.last_prompt`,
        from the adapter's forward), or, for a forward that did not come through an adapter, its last real token."""
        if self.last_prompt is not None:
            return self.last_prompt
        if self.valid is None:
            raise RuntimeError("no forward in progress: the language model was called without input_ids/inputs_embeds")
        length = self.valid.shape[1]
        return length - 1 - self.valid.flip(1).long().argmax(1)

    def row_mean(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B,): the mean over each row's real tokens."""
        m = self.valid.to(values.dtype)
        return (values * m).sum(1) / m.sum(1).clamp_min(1.0)

    # ------------------------------------------------------------------------------------------ records

    def start(self) -> None:
        self.records = []
        self.recording = True

    def stop(self) -> None:
        self.recording = False
        self.records = []

    def clear(self) -> None:
        self.records = []

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.recording and self.records:
            self.records[-1][key] = value

    def take(self, outs: Mapping[str, ForwardOutput]) -> dict[str, dict[str, Any]]:
        """The recorded tensors behind `outs`, by env: each env's rows of the forward(s) that produced them.

        `outs` are consecutive row ranges of the last recorded forwards, in order: one merged forward for all
        environments (`odedit.editstep.forward_envs`), or one forward per environment. Every recorded tensor
        is sliced along its first (row) dimension.
        """
        need = sum(o.batch.size for o in outs.values())
        start, have = len(self.records), 0
        while have < need and start > 0:
            start -= 1
            have += 0 if self.records[start]["_valid"] is None else self.records[start]["_valid"].shape[0]
        if have != need:
            raise RuntimeError(
                f"the environment outputs have {need} rows but the last recorded forwards "
                f"{have}; was the edit step's recording started (begin_step)?"
            )
        recs, r, off = self.records[start:], 0, 0
        matched: dict[str, dict[str, Any]] = {}
        for env, out in outs.items():
            n, length = out.batch.targets.shape
            rec = recs[r]
            valid = rec["_valid"]
            if off + n > valid.shape[0] or valid.shape[1] != length:
                raise RuntimeError(
                    f"environment {env!r} ({n} x {length}) does not line up with the recorded forward "
                    f"({tuple(valid.shape)}, from row {off})"
                )
            matched[env] = {k: v[off : off + n] for k, v in rec.items()}
            off += n
            if off == valid.shape[0]:
                r, off = r + 1, 0
        return matched


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of `x` (0 when none): the hinge reduction of WISE's reference code, which
    averages only the violated margins."""
    pos = x > 0
    if not bool(pos.any()):
        return x.sum() * 0.0
    return x[pos].mean()
