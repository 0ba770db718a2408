"""UniKE: unified intrinsic and external multimodal knowledge editing (Pan et al., NeurIPS 2024, arXiv
2409.19872, "Towards Unified Multimodal Editing with Enhanced Knowledge Collaboration").

UniKE treats both kinds of knowledge as vectorised key-value memories acting at the same layers (the paper's
"same semantic levels"), in the FFNs of the last language-model layers:

  * intrinsic knowledge editing ("assimilation"): key-value neurons added to the FFN, T-Patcher style. A
    neuron with key k, bias b and value v adds relu(x . k + b) v to the FFN output for FFN input x;
  * external knowledge resorting ("accommodation"): in-context latent vectors, the shift of the hidden state
    that an in-context demonstration of the new fact induces, stored with a key and added to the residual
    stream (the FFN output) with a weight set by how semantically related the input is to the key;
  * knowledge collaboration: representations are disentangled into a semantic space (sem: d -> d_s), which
    decides how much external knowledge an input receives, and a truthfulness space (truth: d -> d_t), whose
    projection of the in-context latent vector seeds the values of the new intrinsic neurons; both spaces are
    learned with contrastive objectives.

phi_e is the preallocated memory of every edited layer (neuron keys, biases and values, latent vectors, the
two encoders), attached to the decoder layer as `unike_memory`; a step fills the next free neurons and slots,
optimises them with the host loss (+ ODEdit's terms when on) and leaves earlier edits' rows untouched, so
sequential edits accumulate. `restore()` also rewinds the slot keys and the fill counters.

Reconstruction choices (no official code exists; every item is [INFERENCE]):
  1. Layers: the last 3 language-model layers (the UniKE/T-Patcher harness edits OPT-2.7B layers 29-31 fc1/fc2,
     in-context vectors at layers 30-31); intrinsic and external memories share the layers.
  2. Neurons per edit: `neurons_per_edit` (T-Patcher adds one per edit); key = x_e / |x_e|^2 for the FFN input
     x_e at the last prompt token, bias = -key_threshold, so the neuron fires with 1 - key_threshold on the
     edit and not on inputs whose projection on x_e is below the threshold.
  3. In-context latent vector: the demonstration is IKE's "New Fact: {prompt} {target}\\nPrompt: {prompt}"
     (`demo_template`); the latent of layer l is the increment, over the previous edited layer, of the
     residual-stream difference (demonstration minus plain prompt) at the last prompt token, so that with all
     gates open the plain prompt's residual stream reproduces the in-context one at that token, layer by layer
     (the in-context-vector view of ICL as a shift of latent states). Both passes run on the base model, every
     memory switched off: taken with earlier edits' memories on, the shift contained their (gated differently on
     the demonstration) contributions, each new latent vector grew from the previous ones, and over a stream of
     steps of 16 edits the latents and values grew ~100x per step to inf by the 8th step (issue 17 item 6c; the
     NaN-loss rollbacks of docs/results.md's 1,000-edit cells).
  4. Gate (semantic space): for position t the query is the running mean of the FFN inputs up to t (causal, so
     decoding and teacher forcing agree; left padding enters the mean); the slot key is that mean at the edit's
     last prompt token; alpha = sigmoid((cos(sem q, sem key) - gate_threshold) / gate_temperature). Slots are
     gated independently (a slot per fact, no softmax competition). Defaults 0.95 / 0.01 make the gate sharp:
     running means of hidden states are anisotropic (cosines above 0.9 between unrelated image prompts on the
     tiny test models), and the disentangling objective (6) spreads facts apart from there.
  5. Truthfulness guidance: the new neurons' values start at value_scale * P (latent vector), P the orthogonal
     projection on the truthfulness space (the row space of `truth`), split over the edit's neurons (the
     paper's beta * zeta' added to the new key-value pairs); the latent vector itself is kept as the external
     memory's value. P, not truth^T truth: the contrastive objective (6) reads `truth` through normalised
     outputs only, so its weights grow without bound (Frobenius norm 13 -> 44 over 30 steps here) and
     truth^T truth would scale the values with them.
  6. Knowledge-disentangling objective (weight w_disentangle), on every stored slot: a semantic NT-Xent
     (InfoNCE over prompts and demonstrations) that makes a prompt with and without its demonstration
     positives and every state of another fact a negative; a truthfulness
     prototype contrast that separates "new fact in context" states from the plain (pre-edit belief) states.
     It is trained during editing, on the states of the edits themselves (no separate training split).
  7. T-Patcher's memory loss (weight w_memory), applied to both memories: the new neurons must stay inactive
     on earlier edits' inputs, and the new latent vectors' gates shut on earlier edits' queries.
  8. One optimiser over all rows of the current step, for `n_iter` iterations (the harness trains latent
     vectors and neurons in two phases; joint optimisation is simpler and ODEdit wraps it unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import in_range, non_negative, option, positive
from odedit.envs import EditCase
from odedit.methods.base import EditHandle, EditMethod
from odedit.methods.registry import register_method
from odedit.models.base import Sample
from odedit.risks import reliability_risk

MEMORY_ATTR = "unike_memory"
BUFFERS = ("slot_keys", "slot_demo", "slot_x", "n_neurons", "n_slots")


def _ffn_pair(v: tuple[str, ...]) -> str | None:
    return None if tuple(sorted(v)) == ("ffn_in", "ffn_out") else "UniKE attaches to the FFN: must be [ffn_in, ffn_out]"


def _template(v: str) -> str | None:
    return None if "{prompt}" in v and "{target}" in v else "must contain {prompt} and {target}"


@dataclass(frozen=True)
class UniKEConfig(MethodConfig):
    name: str = option("unike", help="host editor")
    modules: tuple[str, ...] = option(
        ("ffn_in", "ffn_out"),
        help="the FFN modules UniKE reads (ffn_in's input) and writes (ffn_out's output)",
        check=_ffn_pair,
    )
    lr: float = option(
        0.01, help="step size of the per-edit optimisation of neurons, latent vectors and encoders", check=positive
    )
    n_iter: int = option(10, help="optimisation iterations per edit step (harness max_epochs_tp)", check=positive)
    pool_size: int = option(256, help="preallocated key-value neurons per edited layer", check=positive)
    neurons_per_edit: int = option(1, help="neurons a new edit takes from the pool (T-Patcher: 1)", check=positive)
    latent_slots: int = option(
        256, help="preallocated in-context latent vectors per edited layer (one per edit)", check=positive
    )
    key_threshold: float = option(
        0.5,
        help="neuron bias at creation is -key_threshold: its activation on the edit input is 1 - key_threshold",
        check=in_range(0.0, 0.99),
    )
    value_scale: float = option(
        0.5,
        help="beta: the new neurons' values start at beta * the truthfulness projection of the latent vector",
        check=non_negative,
    )
    gate_threshold: float = option(
        0.95, help="cosine in the semantic space at which a latent vector is half on", check=in_range(-1.0, 1.0)
    )
    gate_temperature: float = option(0.01, help="width of the gate's sigmoid", check=positive)
    sem_dim: int = option(64, help="semantic space size (capped at the hidden size)", check=positive)
    truth_dim: int = option(64, help="truthfulness space size (capped at the hidden size)", check=positive)
    w_disentangle: float = option(
        0.1, help="weight of the knowledge-disentangling contrastive objective", check=non_negative
    )
    contrast_temperature: float = option(0.1, help="temperature of the contrastive objectives", check=positive)
    w_memory: float = option(
        1.0, help="weight of T-Patcher's memory loss (new neurons inactive on earlier edits)", check=non_negative
    )
    demo_template: str = option(
        "New Fact: {prompt} {target}\nPrompt: {prompt}",
        help="in-context demonstration whose latent effect becomes the external memory",
        check=_template,
    )


class UniKEError(RuntimeError):
    """A full neuron pool or latent-slot pool, or a module UniKE cannot attach to."""


def _running_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, L, d) -> mean over positions <= t at every t (the causal query of reconstruction choice 4)."""
    steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
    return x.cumsum(1) / steps


class UniKEMemory(nn.Module):
    """The intrinsic and external memories of one layer plus its two encoders (see the module docstring).

    Rows [0, n_neurons) of the neuron pool and [0, n_slots) of the latent slots are in use; the rest are
    preallocated and inert.
    """

    def __init__(
        self,
        d: int,
        *,
        pool: int,
        slots: int,
        sem_dim: int,
        truth_dim: int,
        gate_threshold: float,
        gate_temperature: float,
    ) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(pool, d))
        self.bias = nn.Parameter(torch.zeros(pool))
        self.values = nn.Parameter(torch.zeros(pool, d))
        self.latents = nn.Parameter(torch.zeros(slots, d))
        self.sem = nn.Linear(d, min(sem_dim, d), bias=False)
        self.truth = nn.Linear(d, min(truth_dim, d), bias=False)
        nn.init.orthogonal_(self.sem.weight)  # at first the spaces keep cosines (full rank) or approximate them
        nn.init.orthogonal_(self.truth.weight)
        for name, shape, dtype in (
            ("slot_keys", (slots, d), None),
            ("slot_demo", (slots, d), None),
            ("slot_x", (slots, d), None),
            ("n_neurons", (), torch.long),
            ("n_slots", (), torch.long),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=False)
        self.gate_threshold, self.gate_temperature = gate_threshold, gate_temperature
        self.active = True  # False: the hooks leave the layer as the base model computes it (`UniKE._states`)
        self._x: torch.Tensor | None = None
        self._shape: tuple[int, int] | None = None

    def gate(self, queries: torch.Tensor) -> torch.Tensor:
        """(..., d) running-mean queries -> (..., n_slots) gate values in the semantic space."""
        n = int(self.n_slots)
        q = F.normalize(self.sem(queries), dim=-1)
        k = F.normalize(self.sem(self.slot_keys[:n].to(queries.dtype)), dim=-1)
        return torch.sigmoid((q @ k.T - self.gate_threshold) / self.gate_temperature)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """What the memory adds to the FFN output for FFN inputs x of shape (B, L, d)."""
        out = torch.zeros_like(x)
        m, n = int(self.n_neurons), int(self.n_slots)
        if m:
            act = torch.relu(x @ self.keys[:m].T.to(x.dtype) + self.bias[:m].to(x.dtype))
            out = out + act @ self.values[:m].to(x.dtype)
        if n:
            out = out + self.gate(_running_mean(x)) @ self.latents[:n].to(x.dtype)
        return out

    # hooks (registered once, at install)
    def layer_pre_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self._shape = (int(h.shape[0]), int(h.shape[1]))

    def ffn_in_pre_hook(self, module, args):
        self._x = args[0]

    def ffn_out_hook(self, module, inputs, output):
        if not self.active or (int(self.n_neurons) == 0 and int(self.n_slots) == 0):
            self._x = None
            return None  # an empty (or switched-off) memory leaves the model exactly as it was
        x, self._x = self._x, None
        if x.dim() == 2:  # OPT runs its FFN on (B*L, d)
            x = x.view(*self._shape, x.shape[-1])
        return output + self.contribution(x).reshape(output.shape).to(output.dtype)


class _StateCapture:
    """Records, per edited layer, the FFN input (B, L, d) and the layer's output hidden states."""

    def __init__(self, method: UniKE) -> None:
        self.x: dict[int, torch.Tensor] = {}
        self.h: dict[int, torch.Tensor] = {}
        self.handles = []
        for li, mem in method.memories.items():
            ffn_in = method.adapter.edit_modules(["ffn_in"], [li])
            for module in ffn_in.values():
                self.handles.append(
                    module.register_forward_pre_hook(
                        lambda m, a, li=li, mem=mem: self.x.__setitem__(
                            li, a[0] if a[0].dim() == 3 else a[0].view(*mem._shape, -1)
                        )
                    )
                )
            self.handles.append(
                method.adapter.decoder_layers()[li].register_forward_hook(
                    lambda m, a, out, li=li: self.h.__setitem__(li, out[0] if isinstance(out, tuple) else out)
                )
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class UniKE(EditMethod):
    """Intrinsic key-value neurons + external in-context latent vectors with disentangled gating. See the
    module docstring."""

    config_cls = UniKEConfig
    host_envs = ("in",)
    default_last_layers = 3
    # Why UniKE cannot run under DeepSpeed ZeRO-3; `odedit.loading` refuses the combination at load (issue 16 item 3).
    # Measured with 2 gloo workers (tests/pipeline/train/test_zero_editors.py): the first backward failed with
    # "SumBackward0 returned an invalid gradient at index 0 - got [0] but expected shape compatible with [256, 32]".
    zero3_blocker: ClassVar[str] = (
        "UniKE's memory neurons are read by hooks on the FFN output, outside their own module's forward, and under "
        "ZeRO-3 they are empty partitions again by the time the backward pass reaches them"
    )

    def __init__(self, adapter, cfg: UniKEConfig) -> None:
        super().__init__(adapter, cfg)
        self.memories: dict[int, UniKEMemory] = {}
        self._trainable: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._step_rows: tuple[int, int, int, int] | None = None

    # ------------------------------------------------------------------------------------------ setup

    def install(self) -> None:
        layers = self.adapter.decoder_layers()
        n = len(layers)
        for li in sorted({layer % n for layer in self.layers}):
            layer = layers[li]
            ffn_in = next(iter(self.adapter.edit_modules(["ffn_in"], [li]).values()))
            ffn_out = next(iter(self.adapter.edit_modules(["ffn_out"], [li]).values()))
            mem = getattr(layer, MEMORY_ATTR, None)
            if mem is None:  # a second UniKE over the same model reuses the memory and its hooks
                if not isinstance(ffn_out, nn.Linear):
                    raise UniKEError(f"UniKE adds to an nn.Linear FFN output; layer {li} has {type(ffn_out).__name__}")
                d = ffn_out.out_features
                p = next(layer.parameters())
                cfg = self.cfg
                mem = UniKEMemory(
                    d,
                    pool=cfg.pool_size,
                    slots=cfg.latent_slots,
                    sem_dim=cfg.sem_dim,
                    truth_dim=cfg.truth_dim,
                    gate_threshold=cfg.gate_threshold,
                    gate_temperature=cfg.gate_temperature,
                ).to(device=p.device, dtype=p.dtype)
                layer.add_module(MEMORY_ATTR, mem)
                layer.register_forward_pre_hook(mem.layer_pre_hook, with_kwargs=True)
                ffn_in.register_forward_pre_hook(mem.ffn_in_pre_hook)
                ffn_out.register_forward_hook(mem.ffn_out_hook)
            self.memories[li] = mem

    def editable(self) -> Mapping[str, nn.Parameter]:
        mine = {id(p) for mem in self.memories.values() for p in mem.parameters()}
        return {n: p for n, p in self.adapter.model.named_parameters() if id(p) in mine}

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {f"{li}.{b}": getattr(mem, b) for li, mem in self.memories.items() for b in BUFFERS}

    def snapshot(self) -> EditHandle:
        """Editable tensors plus the slot keys and fill counters (all a step may change)."""
        tensors = list(self.editable().values()) + list(self._buffers().values())
        return EditHandle(saved=[(t.data, t.data.detach().clone()) for t in tensors])

    # ------------------------------------------------------------------------------------------ one step

    @torch.no_grad()
    def _states(
        self, samples: Sequence[Sample]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """FFN inputs (B, L, d) and layer outputs per edited layer, and the last prompt positions, of the base
        model: every memory switched off (reconstruction choice 3)."""
        capture = _StateCapture(self)
        for mem in self.memories.values():
            mem.active = False
        try:
            out = self.adapter.run(list(samples))
        finally:
            capture.remove()
            for mem in self.memories.values():
                mem.active = True
        return capture.x, capture.h, out.batch.last_prompt

    def begin_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        """Allocate neurons and a latent slot per edit and initialise them (choices 2, 3, 5)."""
        cfg = self.cfg
        plain = [c.env("in")[0] for c in cases]
        demo = [Sample(cfg.demo_template.format(prompt=s.prompt, target=s.target), s.target, s.image) for s in plain]
        any_mem = next(iter(self.memories.values()))
        m0, n0 = int(any_mem.n_neurons), int(any_mem.n_slots)
        m1, n1 = m0 + len(cases) * cfg.neurons_per_edit, n0 + len(cases)
        if m1 > cfg.pool_size or n1 > cfg.latent_slots:
            raise UniKEError(
                f"UniKE memory full: {m0}/{cfg.pool_size} neurons and {n0}/{cfg.latent_slots} latent "
                f"slots used, this step needs {m1 - m0} and {n1 - n0} more; raise method.pool_size / "
                "method.latent_slots"
            )
        was_training = self.adapter.model.training
        self.adapter.model.eval()
        try:
            xp, hp, lp = self._states(plain)
            xd, hd, ld = self._states(demo)
        finally:
            self.adapter.model.train(was_training)
        rows = torch.arange(len(cases))
        prev = None
        with torch.no_grad():
            for li in sorted(self.memories):
                mem = self.memories[li]
                x_last = xp[li][rows, lp].float()
                q_plain = _running_mean(xp[li].float())[rows, lp]
                q_demo = _running_mean(xd[li].float())[rows, ld]
                shift = (hd[li][rows, ld] - hp[li][rows, lp]).float()
                latent = shift if prev is None else shift - prev
                prev = shift
                basis = torch.linalg.qr(mem.truth.weight.float().T).Q  # (d, d_t): the truth space's row space
                proj = basis @ (basis.T @ latent.T)  # the latent vector projected on it
                value = cfg.value_scale * proj.T / (cfg.neurons_per_edit * (1.0 - cfg.key_threshold))
                key = x_last / x_last.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
                for b in range(len(cases)):
                    r = slice(m0 + b * cfg.neurons_per_edit, m0 + (b + 1) * cfg.neurons_per_edit)
                    mem.keys[r] = key[b].to(mem.keys.dtype)
                    mem.bias[r] = -cfg.key_threshold
                    mem.values[r] = value[b].to(mem.values.dtype)
                mem.latents[n0:n1] = latent.to(mem.latents.dtype)
                for buf, val in (("slot_keys", q_plain), ("slot_demo", q_demo), ("slot_x", x_last)):
                    getattr(mem, buf)[n0:n1] = val.to(getattr(mem, buf).dtype)
                mem.n_neurons.fill_(m1)
                mem.n_slots.fill_(n1)
        self._step_rows = (m0, m1, n0, n1)
        frozen = []
        for mem in self.memories.values():
            for param, lo, hi in ((mem.keys, m0, m1), (mem.bias, m0, m1), (mem.values, m0, m1), (mem.latents, n0, n1)):
                keep = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
                keep[lo:hi] = False
                frozen.append((param, keep, param.detach().clone()))
        self._trainable = frozen

    def after_update(self) -> None:
        """Rows of earlier edits and free rows are held fixed: only this step's neurons and slots move."""
        with torch.no_grad():
            for param, keep, saved in self._trainable:
                param[keep] = saved[keep]

    def end_step(self, cases: Sequence[EditCase], handle: EditHandle) -> None:
        self._trainable = []
        self._step_rows = None

    # ------------------------------------------------------------------------------------------ losses

    def host_loss(self, outs, cases):
        """R_rel on IN + w_disentangle * knowledge-disentangling objective + w_memory * memory loss."""
        o = outs["in"]
        loss = reliability_risk(o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size)
        if self.cfg.w_disentangle > 0:
            loss = loss + self.cfg.w_disentangle * self.disentangle_loss()
        if self.cfg.w_memory > 0 and self._step_rows is not None:
            loss = loss + self.cfg.w_memory * self.memory_loss()
        return loss

    def disentangle_loss(self) -> torch.Tensor:
        """Semantic InfoNCE + truthfulness prototype contrast over the stored slots, averaged over layers."""
        tau = self.cfg.contrast_temperature
        terms = []
        for mem in self.memories.values():
            n = int(mem.n_slots)
            if n == 0:
                continue
            plain, demo = mem.slot_keys[:n].float(), mem.slot_demo[:n].float()
            z = F.normalize(mem.sem(torch.cat([plain, demo])), dim=-1)  # NT-Xent over the 2n states
            sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
            pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            semantic = F.cross_entropy(sim, pair) if n > 1 else z.sum() * 0.0
            tp, td = F.normalize(mem.truth(plain), dim=-1), F.normalize(mem.truth(demo), dim=-1)
            pos, neg = F.normalize(td.mean(0), dim=-1), F.normalize(tp.mean(0), dim=-1)
            zero = torch.zeros(n, dtype=torch.long, device=tp.device)
            truthful = F.cross_entropy(torch.stack([td @ pos, td @ neg], -1) / tau, zero)
            untruthful = F.cross_entropy(torch.stack([tp @ neg, tp @ pos], -1) / tau, zero)
            terms.append(semantic + 0.5 * (truthful + untruthful))
        if not terms:
            return next(iter(self.memories.values())).keys.sum() * 0.0
        return torch.stack(terms).mean()

    def memory_loss(self) -> torch.Tensor:
        """T-Patcher's memory loss, for both memories: the mean activation of this step's neurons on earlier
        edits' inputs plus the mean gate of this step's latent vectors on earlier edits' queries."""
        m0, m1, n0, n1 = self._step_rows
        terms = []
        for mem in self.memories.values():
            if n0 == 0:
                continue
            act = torch.relu(mem.slot_x[:n0] @ mem.keys[m0:m1].T + mem.bias[m0:m1])
            terms.append(act.mean() + mem.gate(mem.slot_keys[:n0])[:, n0:n1].mean())
        if not terms:
            return next(iter(self.memories.values())).keys.sum() * 0.0
        return torch.stack(terms).mean()

    # ------------------------------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({f"buffers.{k}": v.detach().cpu().clone() for k, v in self._buffers().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bufs = {k[len("buffers.") :]: v for k, v in state.items() if k.startswith("buffers.")}
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("buffers.")})
        ours = self._buffers()
        if set(bufs) != set(ours):
            raise ValueError(
                f"checkpoint UniKE memory state does not match: missing {sorted(set(ours) - set(bufs))[:4]}, "
                f"unexpected {sorted(set(bufs) - set(ours))[:4]}"
            )
        with torch.no_grad():
            for k, t in ours.items():
                if tuple(bufs[k].shape) != tuple(t.shape):
                    raise ValueError(
                        f"checkpoint buffer {k!r} has shape {tuple(bufs[k].shape)}, model has {tuple(t.shape)}"
                    )
                t.copy_(bufs[k].to(t.dtype))

    def fill(self) -> dict[str, int]:
        """Neurons and latent slots in use (per layer; every layer fills alike)."""
        mem = next(iter(self.memories.values()))
        return {"neurons": int(mem.n_neurons), "slots": int(mem.n_slots)}


register_method("unike", UniKEConfig, UniKE)

__all__ = ["UniKE", "UniKEConfig", "UniKEError", "UniKEMemory"]
