"""Position-wise tail replay: when only the last layer's FFN output module changes, replay just the positions
the losses read.

`odedit.models.prefix.PrefixRunner` replays the decoder layers from the first edited one on, at every position.
For the most common edit, a position-wise editor (FT, LoRA) on the FFN output projection of the LAST decoder
layer, even that is mostly wasted: the layer ends with

    y = r + f(x)        (r: the residual stream after attention, x: the edited module's input, f: the module)

and only the final norm and the LM head follow, both per position. Everything but f is frozen within a step,
so r and x are fixed; and the step's losses read a few positions per row (the answer tokens, whose logits the
reliability and locality risks score, and the last prompt token, whose state R_gen pools, Eq. 6). `TailRunner`
captures r and x at those positions during the step's one full forward pass (run without autograd) and, at
every iteration including the first, computes

    logits_P = head(norm(r_P + f(x_P)))

at the positions P only: a 16-edit step scores ~1-3 of ~40 positions per row and skips the attention of the
last layer and the image tokens entirely.

Exactness: the replay computes the same operations as the model on the same values, except that the module's
matrix product runs on a (|P|, I) matrix instead of (B * L, I), which may change the last bits of a sum
(tested within 1e-5 of the full forward; gradients likewise). The claimed structure `y = r + f(x)` is checked,
not assumed: on the full pass the runner verifies that the layer's output equals `r + f(x)` bit for bit, and
replays the whole layer (`PrefixRunner`) where it does not (e.g. OPT with post-layer norm).

Replays return a `PositionOutput`: logits and hidden states of the positions P only, (|P|, V) and (|P|, H),
with the `ForwardOutput` accessors the losses use (answer logits, last-token pooling, flat-position gathers,
row ranges). Reading a position outside P is an index error, never a stale value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from odedit.models.base import EncodedBatch, ForwardOutput, ModelAdapter
from odedit.models.prefix import PrefixRunner

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # fallback reasons already logged (once per process, not once per step)


def read_positions(batch: EncodedBatch) -> torch.Tensor:
    """(B, L) the positions a step's losses read: answer positions and each row's last prompt token."""
    mask = batch.answer_mask.clone()
    mask[torch.arange(batch.size, device=mask.device), batch.last_prompt.to(mask.device)] = True
    return mask


class TailRunner(PrefixRunner):
    """A `PrefixRunner` whose replays run only `module`, the final norm and the LM head at `read_positions`.

    Args:
        adapter: the model adapter.
        module: the edited module, inside the last decoder layer, whose output the layer adds to its residual.
        residual: the module of the same layer whose input is that residual (`ModelAdapter.position_tail`).
    """

    def __init__(self, adapter: ModelAdapter, module: torch.nn.Module, residual: torch.nn.Module) -> None:
        super().__init__(adapter, adapter.num_layers - 1)
        self.module = module
        self.residual = residual
        self._tail: tuple[PositionIndex, torch.Tensor, torch.Tensor] | None = None  # index, r_P, x_P
        self.fallback: str | None = None  # why the last full pass could not use the tail, if it could not

    def _full(self, batch: EncodedBatch) -> ForwardOutput:
        seen: dict[str, Any] = {}

        def first_input(key: str):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                seen[key] = args[0] if args else next(iter(kwargs.values()))

            return hook

        def output(key: str):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                seen[key] = out[0] if isinstance(out, tuple) else out

            return hook

        handles = [
            self.residual.register_forward_pre_hook(first_input("r"), with_kwargs=True),
            self.module.register_forward_pre_hook(first_input("x"), with_kwargs=True),
            self.module.register_forward_hook(output("f"), with_kwargs=True),
            self.layers[self.first].register_forward_hook(output("y"), with_kwargs=True),
        ]
        try:
            with torch.no_grad():  # only the captured inputs are kept; the first iteration is a replay too
                out = super()._full(batch)
        finally:
            for h in handles:
                h.remove()
        self._tail = None
        self.fallback = self._check(seen)
        if self.fallback is not None:
            if self.fallback not in _WARNED:
                _WARNED.add(self.fallback)
                log.warning("tail replay off (%s); replaying the whole last layer instead", self.fallback)
            return super()._replay()
        index = PositionIndex(read_positions(batch), out.logits.device)  # the host-side batch: no device copy
        n = index.slot.shape[0]
        r, x = seen["r"], seen["x"]
        self._tail = (index, r.reshape(n, -1).index_select(0, index.flat), x.reshape(n, -1).index_select(0, index.flat))
        return self._replay()

    @staticmethod
    def _check(seen: dict[str, Any]) -> str | None:
        """None when the last layer's output is exactly residual + module output; else the reason it is not."""
        if not all(isinstance(seen.get(k), torch.Tensor) for k in ("r", "x", "f", "y")):
            return f"hooks saw {sorted(k for k in seen if isinstance(seen[k], torch.Tensor))} of r, x, f, y"
        r, f, y = seen["r"], seen["f"], seen["y"]
        positions = y.numel() // y.shape[-1]  # OPT runs its FFN on (B * L, H) rows: compare element counts
        if r.numel() != y.numel() or f.numel() != y.numel() or seen["x"].numel() % positions:
            return f"shapes differ (residual {tuple(r.shape)}, module {tuple(f.shape)}, layer {tuple(y.shape)})"
        with torch.no_grad():
            if not torch.equal(r.reshape(y.shape) + f.reshape(y.shape), y):
                return "the last layer's output is not residual + module output"
        return None

    def _replay(self) -> ForwardOutput:
        if self._tail is None:
            return super()._replay()
        assert self._device_batch is not None
        index, r, x = self._tail
        z = self.adapter.final_hidden(r + self.module(x))
        logits = self.adapter.output_embeddings()(z)
        return PositionOutput(logits=logits, hidden=z, batch=self._device_batch, index=index)


class PositionIndex:
    """Where the positions of a (B, L) mask sit in compact (N, ...) outputs (row-major order).

    Attributes:
        flat: (N,) the positions' flat indices row * L + column, ascending.
        slot: (B * L,) each flat position's row in the compact outputs, -1 where not computed.
        offsets: B + 1 ints, the compact rows of batch row b are offsets[b]:offsets[b + 1].
    """

    def __init__(self, mask: torch.Tensor, device: torch.device | str = "cpu") -> None:
        mask = mask.cpu()  # a (B, L) bool tensor: the bookkeeping is built on the host, then moved once
        self.mask = mask
        flat = mask.reshape(-1).nonzero().squeeze(1)
        slot = torch.full((mask.numel(),), -1, dtype=torch.long)
        slot[flat] = torch.arange(flat.shape[0])
        self.offsets = [0] + mask.sum(1).cumsum(0).tolist()
        self.flat, self.slot, self.device = flat.to(device), slot.to(device), device
        self._memo: dict[Any, Any] = {}

    def _cached(self, key: Any, build) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def slots(self, flat: torch.Tensor) -> torch.Tensor:
        """Compact rows of flat positions (a position outside the mask maps to -1: an index error downstream)."""
        return self.slot.index_select(0, flat)

    def rows(self, rows: slice) -> PositionIndex:
        """The index of a contiguous range of batch rows."""
        return self._cached(("rows", rows.start, rows.stop), lambda: PositionIndex(self.mask[rows], self.device))

    def at(self, name: str, where: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Compact rows of the positions where the (B, L) mask `where()` is True, row-major; memoised by `name`
        (a step's batch does not change)."""
        return self._cached(name, lambda: self.slots(where().reshape(-1).nonzero().squeeze(1).to(self.device)))


@dataclass
class PositionOutput(ForwardOutput):
    """A forward output computed at some positions only: `logits` (N, V) and `hidden` (N, H) in `index` order."""

    index: PositionIndex | None = None

    def _index(self) -> PositionIndex:
        assert self.index is not None
        return self.index

    def select(self, rows: slice, batch: EncodedBatch | None = None) -> PositionOutput:
        start, stop, _ = rows.indices(self.batch.size)
        lo, hi = self._index().offsets[start], self._index().offsets[stop]
        return PositionOutput(
            self.logits[lo:hi],
            self.hidden[lo:hi],
            batch if batch is not None else self.batch.rows(rows),
            self._index().rows(slice(start, stop)),
        )

    def answer_logits(self) -> torch.Tensor:
        return self.logits.index_select(0, self._index().at("answers", lambda: self.batch.answer_mask))

    def take_logits(self, flat: torch.Tensor) -> torch.Tensor:
        return self.logits.index_select(0, self._index().slots(flat))

    def take_hidden(self, flat: torch.Tensor) -> torch.Tensor:
        return self.hidden.index_select(0, self._index().slots(flat))

    def pooled(self, pooling: str) -> torch.Tensor:
        if pooling != "last":
            raise ValueError(
                f"pooling={pooling!r} reads every prompt position; a tail replay computed the answer "
                "and last-prompt positions only (objectives that pool otherwise set reads_all_positions)"
            )

        def last() -> torch.Tensor:
            mask = torch.zeros_like(self.batch.answer_mask)
            mask[torch.arange(self.batch.size, device=mask.device), self.batch.last_prompt.to(mask.device)] = True
            return mask

        return self.hidden.index_select(0, self._index().at("last", last))
