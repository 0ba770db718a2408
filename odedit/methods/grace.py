"""GRACE: a discrete key-value codebook adaptor at one layer, with deferral radii.

Hartvigsen et al., NeurIPS 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors"
(EasyEdit `easyeditor/models/grace`). A codebook wraps one module of one decoder layer (default the FFN output
layer, `ffn_out`: down_proj / fc2). Each entry holds a key (the module's input for an edited prompt), a value
(a learned replacement for the module's output) and a deferral radius eps. At a position whose module input
lies within eps of its nearest key, the module's output is replaced by that key's value; everywhere else the
layer computes exactly what it computed before (GRACE §3, the epsilon-ball adaptor).

Writing an edit (per IN sample, in `begin_step`; GRACE §3.2 codebook maintenance):
  * no entry, or nearest key farther than eps_init + its eps: add an entry (key, value, eps_init);
  * nearest key within that distance with the same target: expand its radius to the distance ("coverage")
    and train its value;
  * with a different target: add an entry and split the two radii at half the distance.
The chosen entries' values are then optimised for n_iter steps on the host loss (the edit NLL, R_rel); with
ODEdit on, that optimisation gets ODEdit's terms too (method.md §2.5). Every other value stays where it was.

Design (each point a reconstruction choice):
  * Key = the module's input at the edit prompt's last token (`replace_last`). The lookup keys one position per
    sequence, its last prompt token, as GRACE does (`key_positions: last`, default; issue 17): comparing every
    position with the codebook put every position of the demo-size model inside the first entry's radius after
    a single edit (locality 0.00, against 0.90 for the incumbent implementation that keys one position).
    `key_positions: all` keeps the every-position lookup. Either way an input far from every key is untouched
    bit for bit, and only the looked-up position is replaced: later answer tokens see the edit through
    attention in later layers, so multi-token targets need a layer below the top.
  * [INFERENCE] Entries are written in `begin_step`, before the value is trained (GRACE adds the key at its
    first iteration); undo callbacks on the step's handle remove them bit-exactly. A step that fills the
    codebook midway is undone before `CodebookFull` is raised.
  * [INFERENCE] Only the step's chosen entries train: every other value is projected back after each update
    (GRACE optimises the chosen key's value alone).
  * [INFERENCE] Labels are compared as target strings (EasyEdit compares label token ids).
  * [INFERENCE] Value initialisation "warm" (the module's current output at that position, so training
    starts from the unedited prediction) by default; "cold" draws uniform [0, 1) values as GRACE's default.
  * [INFERENCE] Distances are Euclidean, computed in float64 (the expanded |x|^2 + |k|^2 - 2 x.k form loses
    the eps scale to cancellation in float32 on large activations). An expanded radius exceeds the distance
    by that form's rounding bound (`Codebook.covering_radius`), so the key it covers stays inside whatever
    batch the lookup computes its distance in.
  * [INFERENCE] Defaults: layer at 65% of the depth (EasyEdit: layer 18 of Qwen2-VL-7B's 28), eps 1.0,
    n_iter 20 (EasyEdit Qwen2-VL hparams), Adam with lr 1.0.

The codebook's capacity is preallocated (`capacity`): phi_e is the (capacity, d_out) value tensor; keys,
radii, labels and the entry counter are method state (`state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import Problem, non_negative, option, positive
from odedit.envs import EditCase
from odedit.methods.base import EditHandle, EditMethod, attach_side_module, weight_shape
from odedit.methods.registry import register_method
from odedit.methods.taps import ForwardTap, layer_at_depth

ATTR = "odedit_grace"
DEPTH = 0.65


class CodebookFull(ValueError):
    """An edit needs a new codebook entry but all `capacity` entries are taken."""


@dataclass(frozen=True)
class GRACEConfig(MethodConfig):
    name: str = option("grace", help="host editor")
    lr: float = option(1.0, help="step size of the value optimisation", check=positive)
    n_iter: int = option(20, help="optimisation iterations per edit step (EasyEdit n_iter)", check=positive)
    eps: float = option(1.0, help="initial deferral radius of a new codebook entry (EasyEdit eps)", check=positive)
    capacity: int = option(
        1024, help="codebook entries preallocated: the capacity of a sequential stream", check=positive
    )
    val_init: Literal["warm", "cold"] = option(
        "warm", help="a new value starts at the module's output (warm) or uniform [0, 1) (cold)"
    )
    seed: int = option(0, help="seed of cold value initialisation", check=non_negative)
    key_positions: Literal["last", "all"] = option(
        "last",
        help="positions the codebook looks up: each sequence's last prompt token (GRACE; default) or every position",
    )

    def _cross_checks(self) -> Iterable[Problem]:
        if len(self.modules) != 1:
            yield Problem("modules", list(self.modules), "GRACE wraps exactly one module", "e.g. [ffn_out]")
        if len(self.layers) > 1:
            yield Problem("layers", list(self.layers), "GRACE wraps one layer: give at most one", "e.g. [18]")


class Codebook(nn.Module):
    """Keys (C, d_in), radii (C,) and values (C, d_out) of one module; the first `n` entries are in use."""

    def __init__(
        self, d_in: int, d_out: int, capacity: int, like: torch.Tensor, tap: ForwardTap, key_positions: str = "last"
    ) -> None:
        super().__init__()
        self.key_positions = key_positions
        self.values = nn.Parameter(torch.zeros(capacity, d_out, dtype=like.dtype, device=like.device))
        self.register_buffer(
            "keys", torch.zeros(capacity, d_in, dtype=torch.float32, device=like.device), persistent=False
        )
        self.register_buffer("eps", torch.zeros(capacity, dtype=torch.float64, device=like.device), persistent=False)
        self.capacity = capacity
        self.n = 0
        self.labels: list[str] = []
        self.tap = tap
        self.grab: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to the nearest key and its index for each row of `x` (N, d_in); float64."""
        k = self.keys[: self.n].double()
        q = x.double()
        d2 = q.pow(2).sum(1, keepdim=True) + k.pow(2).sum(1).unsqueeze(0) - 2 * q @ k.T
        d, idx = d2.clamp_min(0).sqrt().min(1)
        return d, idx

    def covering_radius(self, d: float, x: torch.Tensor, j: int) -> float:
        """A radius for entry `j` that surely covers `x`, found at distance `d` from its key by `nearest`.

        `nearest` rounds d^2 = |x|^2 + |k|^2 - 2 x.k by up to about (2 d_in + 4) 2^-53 (|x|^2 + |k|^2), and the
        rounding depends on the shape of the batch the lookup runs on (BLAS blocks the product differently), so
        a radius of exactly d leaves x on the boundary: inside when the radius was set, outside in the edit's
        own forward pass on some CPUs (the tiny test model on AMD EPYC: d = 0.008929956788537636 for one key,
        ...684 for the same key in the 29-row batch of the step). sqrt(d^2 + that bound) exceeds d by a relative
        6e-13 there; with d_in = 1e4, |x|^2 = |k|^2 = 1e4 and d = 1, by 2e-8.
        """
        q, k = x.double(), self.keys[j].double()
        bound = (2 * q.shape[-1] + 4) * 2.0**-53 * float(q.pow(2).sum() + k.pow(2).sum())
        return math.sqrt(d * d + bound)

    def lookup(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.grab is not None:
            self.grab.append((self.tap.rows(args[0].detach()), self.tap.rows(out.detach())))
        if self.n == 0:
            return None
        if self.key_positions == "last":
            return self._lookup_last(args[0], out)
        x = args[0].reshape(-1, args[0].shape[-1])
        d, idx = self.nearest(x)
        hit = d <= self.eps[idx]
        if not bool(hit.any()) and not (torch.is_grad_enabled() and self.values.requires_grad):
            return None
        # While a step trains, the output stays tied to the values even where nothing hits (torch.where picks
        # `flat` bit for bit there): a step whose keys no entry covers (a later split in the same step, or a
        # re-edit of a key with another target, whose radius is 0) then gets zero gradients, as an unused
        # parameter does, instead of a loss without a grad_fn that backward rejects.
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(hit.unsqueeze(1), self.values[idx].to(flat.dtype), flat).reshape(out.shape)

    def _lookup_last(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """`lookup` at one position per row, its last prompt token (`ForwardTap.key_positions`)."""
        x3, out3 = self.tap.rows(x), self.tap.rows(out)
        pos = self.tap.key_positions().to(x3.device)
        rows = torch.arange(x3.shape[0], device=x3.device)
        d, idx = self.nearest(x3[rows, pos])
        hit = d <= self.eps[idx]
        if not bool(hit.any()) and not (torch.is_grad_enabled() and self.values.requires_grad):
            return None
        at = torch.zeros(x3.shape[:2], dtype=torch.bool, device=x3.device)
        at[rows, pos] = hit
        new = torch.where(at.unsqueeze(-1), self.values[idx].to(out3.dtype).unsqueeze(1), out3)
        return new.reshape(out.shape)


class GRACE(EditMethod):
    """GRACE codebook on one module of one decoder layer."""

    config_cls = GRACEConfig
    host_envs = ("in",)

    def __init__(self, adapter, cfg: GRACEConfig) -> None:
        super().__init__(adapter, cfg)
        self._book: Codebook | None = None
        self._name = ""
        self._module: nn.Module | None = None
        self._start: torch.Tensor | None = None
        self._train_rows: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        if self.cfg.layers:
            return list(self.cfg.layers)
        return [layer_at_depth(self.adapter.num_layers, DEPTH)]

    def install(self) -> None:
        if self._book is not None:
            return
        self._tap = ForwardTap.of(self.adapter)
        ((name, module),) = self.target_modules().items()
        book = attach_side_module(
            module,
            name,
            ATTR,
            lambda: Codebook(
                weight_shape(module.weight)[1],
                weight_shape(module.weight)[0],
                self.cfg.capacity,
                module.weight,
                self._tap,
                self.cfg.key_positions,
            ),
            "lookup",
            self.cfg.capacity,
            "capacity",
        )
        book.key_positions = self.cfg.key_positions  # a codebook found again follows this editor's config
        self._book, self._name, self._module = book, name, module

    def editable(self) -> Mapping[str, nn.Parameter]:
        self.install()
        return {f"{self._name}.{ATTR}.values": self._book.values}

    @property
    def codebook(self) -> Codebook:
        self.install()
        return self._book

    def keys_of(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's input (keys) and output at each sample's last prompt token: (n, d_in), (n, d_out)."""
        book = self.codebook
        batch = self.adapter.encode(samples)
        book.grab = []
        try:
            with torch.no_grad():
                self.adapter.forward(batch)
            x, out = book.grab[0]
        finally:
            book.grab = None
        rows = torch.arange(x.shape[0], device=x.device)
        last = batch.last_prompt.to(x.device)
        return x[rows, last].float(), out[rows, last]

    # ------------------------------------------------------------------------------------------ one step

    def begin_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        """Write the step's keys into the codebook (add, expand or split), register their undo."""
        book = self.codebook
        samples = [s for c in cases for s in c.env("in")]
        keys, outs = self.keys_of(samples)
        n0, eps0, labels0 = book.n, book.eps.clone(), list(book.labels)
        keys0 = book.keys.clone()

        def undo() -> None:
            book.n, book.labels = n0, labels0
            book.eps.copy_(eps0)
            book.keys.copy_(keys0)

        handle.undo.append(undo)
        rows = torch.zeros(book.capacity, dtype=torch.bool, device=book.values.device)
        try:
            for key, out, sample in zip(keys, outs, samples):
                rows[self._write(key, out, sample.target)] = True
        except CodebookFull:
            handle.restore()  # entries written before the codebook filled up go again
            raise
        self._train_rows = rows
        self._start = book.values.detach().clone()

    def _write(self, key: torch.Tensor, out: torch.Tensor, label: str) -> int:
        """GRACE's codebook update for one key; returns the entry whose value this edit trains."""
        book = self.codebook
        if book.n:
            d_t, j_t = book.nearest(key.unsqueeze(0))
            d, j = float(d_t[0]), int(j_t[0])
            if d <= self.cfg.eps + float(book.eps[j]):
                if book.labels[j] == label:
                    if d > float(book.eps[j]):
                        book.eps[j] = book.covering_radius(d, key, j)  # expand the radius to cover the new key
                    return j
                new = self._add(key, out, label)
                book.eps[j] = d / 2 - 1e-5  # split: the two balls meet halfway
                book.eps[new] = d / 2
                return new
        return self._add(key, out, label)

    def _add(self, key: torch.Tensor, out: torch.Tensor, label: str) -> int:
        book = self.codebook
        if book.n >= book.capacity:
            raise CodebookFull(
                f"GRACE codebook of {self._name} is full ({book.capacity} entries); raise method.capacity "
                "(single mode frees each entry on restore)"
            )
        i = book.n
        with torch.no_grad():
            book.keys[i] = key
            book.eps[i] = self.cfg.eps
            if self.cfg.val_init == "warm":
                book.values[i] = out.to(book.values.dtype)
            else:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)
                book.values[i] = torch.rand(book.values.shape[1], generator=g).to(book.values)
        book.labels.append(label)
        book.n = i + 1
        return i

    def after_update(self) -> None:
        """Only the step's entries move: every other value goes back to its start."""
        with torch.no_grad():
            v = self._book.values
            v.copy_(torch.where(self._train_rows.unsqueeze(1), v, self._start))

    def end_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        self._start = None
        self._train_rows = None

    # ------------------------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """The entries in use: keys, values, radii, labels."""
        book = self.codebook
        n = book.n
        return {
            "n": n,
            "keys": book.keys[:n].cpu().clone(),
            "values": book.values[:n].detach().cpu().clone(),
            "eps": book.eps[:n].cpu().clone(),
            "labels": list(book.labels),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        book = self.codebook
        n = int(state["n"])
        if n > book.capacity:
            raise ValueError(f"GRACE checkpoint holds {n} entries; method.capacity is {book.capacity}")
        expect = {"keys": (n, book.keys.shape[1]), "values": (n, book.values.shape[1]), "eps": (n,)}
        for k, shape in expect.items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"GRACE checkpoint tensor {k!r} has shape {tuple(state[k].shape)}, expected {shape}")
        if len(state["labels"]) != n:
            raise ValueError(f"GRACE checkpoint has {len(state['labels'])} labels for {n} entries")
        with torch.no_grad():
            for k in ("keys", "values", "eps"):
                live = getattr(book, k)
                live.zero_()
                live[:n] = state[k].to(live.dtype)
        book.n, book.labels = n, list(state["labels"])


register_method("grace", GRACEConfig, GRACE)
