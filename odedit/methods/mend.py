"""MEND: Model Editor Networks with gradient decomposition (Mitchell et al., ICLR 2022, "Fast Model Editing at
Scale", arXiv 2110.11309), as a host editor that ODEdit plugs into (method.md §2.5).

For an edited Linear W (d_out x d_in) the fine-tuning gradient of a batch is a sum of rank-1 terms,
dL/dW = sum_i delta_i u_i^T, with u_i the layer input and delta_i the gradient of the loss w.r.t. the layer
output at position i (MEND §3.1). MEND's hypernetwork g maps each pair to (u~_i, delta~_i) and edits

    W <- W - alpha_W * sum_i delta~_i u~_i^T                                  (MEND Eq. 3 / Alg. 2)

with a learned step alpha_W per edited matrix. g normalises u and delta to zero mean and unit variance
(running statistics over meta-training), concatenates them, and passes the vector through residual low-rank
MLP blocks z <- z + U relu(s_m * (V z + b) + o_m) with a scale s_m and shift o_m per edited matrix ("mode");
U starts at zero, so g starts as the identity (MEND §3.2: identity initialisation). Matrices of the same
shape share one network (EasyEdit `shared: True`).

At edit time (`apply`) one forward/backward pass of R_rel on the step's IN samples yields the factors, g
transforms them and the update is written into the weights; `restore()` puts the weights back bit for bit.
phi_e (`editable`) is the set of edited weights; the hypernetwork is editor state, trained by
`odedit.methods.mend_train` (in process, or as the Ray Train job `jobs.train_editor`) and saved with
safetensors (`save_hypernet` / `load_hypernet`, which rejects a network trained for other modules or shapes).

Editor-training loss (MEND §3.3; EasyEdit's multimodal trainer weights): with p the pre-edit and p~ the
post-edit model,

    L = cedit * NLL_p~(IN + SE-text) + iedit * NLL_p~(SE-image) + cloc * KL(p || p~ on OUT-text + OUT-mm)

It is the host loss of the objective during meta-training, so with ODEdit on the objective adds its terms:
G = L + w_loc R_loc + w_gen R_gen + lambda * penalty, the risks taken over the hypernetwork through the edit
([INFERENCE] method.md §2.5 for meta-learned editors). Reconstruction choices, all [INFERENCE]:
  * the edit NLL covers the edit prompt and its text rephrase under `cedit` (the brief's "on the edit and its
    rephrases"), image rephrases under `iedit`; KL(pre || post) as in MEND's code, at OUT answer positions
    (the positions T-Loc/M-Loc score), full vocabulary;
  * the bottleneck activation sits between V and U so that the zero-initialised U still receives gradients
    (a relu(0) pre-activation, as a literal reading of MEND's block would give, passes none);
  * factors of all non-zero positions of the IN batch are used (MEND's code skips zero rows the same way);
  * at edit time the objective is evaluated before the update and after it; the second evaluation takes
    Eq. 13's dual step at the new phi_e, so the lambda-network follows the edits (lambda shapes MEND's edits
    through the editor-training loss only);
  * without a trained hypernetwork (`hypernet_path`), `bootstrap_steps` > 0 meta-trains in process at the
    first edit on synthetic edits drawn from the model's own vocabulary and random images
    (`mend_train.synthetic_cases`): a smoke-scale stand-in for the training split, used by the test matrix.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import each, non_negative, option, positive
from odedit.envs import EditCase
from odedit.methods.base import EditHandle, EditMethod
from odedit.methods.registry import register_method
from odedit.risks import reliability_risk

HYPERNET_FORMAT = "odedit.mend.hypernet/1"
TEXT_EDIT_ENVS = ("in", "se_text")
IMAGE_EDIT_ENVS = ("se_image",)
LOC_ENVS = ("out_text", "out_mm")
TRAIN_ENVS = TEXT_EDIT_ENVS + IMAGE_EDIT_ENVS + LOC_ENVS


def _must_be_one(v: int) -> str | None:
    return None if v == 1 else "MEND applies exactly one hypernetwork update per edit step; must be 1"


@dataclass(frozen=True)
class MENDConfig(MethodConfig):
    name: str = option("mend", help="host editor")
    modules: tuple[str, ...] = option(("ffn_in", "ffn_out"), help="module kinds whose weights MEND edits (EasyEdit: OPT fc1/fc2)", check=each(lambda v: None if v in ("ffn_in", "ffn_out", "attn_out") else "unknown module kind"))
    lr: float = option(1e-6, help="meta-training learning rate of the hypernetwork (EasyEdit MEND lr)", check=positive)
    n_iter: int = option(1, help="hypernetwork updates per edit step (always 1 for MEND)", check=_must_be_one)
    edit_lr: float = option(1e-4, help="initial step alpha of every edited matrix (learned in meta-training)", check=positive)
    lr_lr: float = option(1e-4, help="meta-training learning rate of the per-matrix steps alpha", check=non_negative)
    rank: int = option(1920, help="bottleneck rank of the hypernetwork blocks (capped at d_in + d_out)", check=positive)
    n_hidden: int = option(1, help="residual low-rank blocks in the hypernetwork", check=positive)
    cedit: float = option(0.1, help="weight of the post-edit NLL on IN and SE-text in the editor-training loss", check=non_negative)
    iedit: float = option(0.1, help="weight of the post-edit NLL on SE-image in the editor-training loss", check=non_negative)
    cloc: float = option(1.0, help="weight of KL(pre || post) on OUT in the editor-training loss", check=non_negative)
    grad_clip: float = option(100.0, help="meta-gradient norm clip; 0 = off", check=non_negative)
    hypernet_path: str = option("", help="safetensors hypernetwork written by jobs.train_editor; empty = none loaded")
    train_steps: int = option(1000, help="meta-training steps of jobs.train_editor", check=positive)
    train_batch: int = option(1, help="edits per meta-training step (edited jointly)", check=positive)
    val_edits: int = option(16, help="training edits held out to measure the editor before and after meta-training", check=non_negative)
    bootstrap_steps: int = option(0, help="without hypernet_path: meta-train in process for this many steps on synthetic edits at the first edit (tests, tiny models); 0 = require a trained hypernetwork", check=non_negative)
    bootstrap_edits: int = option(16, help="synthetic edits of the in-process bootstrap", check=positive)


class MENDError(ValueError):
    """A hypernetwork that does not fit the edited model, or an edit without a trained hypernetwork."""


# ---------------------------------------------------------------------------------------------- hypernetwork


class LowRankBlock(nn.Module):
    """z <- z + U relu(s_m * (V z + b) + o_m): a residual low-rank block with per-mode scale and shift.

    U is zero at initialisation, so the block is the identity (MEND §3.2).
    """

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.ones(n_modes, rank))
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        h = torch.relu(self.scale[mode] * self.down(z) + self.shift[mode])
        return z + self.up(h)


class FactorNet(nn.Module):
    """g for all edited matrices of one shape: normalise (u, delta), transform, split (MEND §3.2).

    Running statistics are sums in float64 (count, sum, sum of squares), so increments from several Ray Train
    workers add up exactly; mean and std are derived from them (std 1 and mean 0 before any statistic).
    """

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.blocks = nn.ModuleList([LowRankBlock(dim, min(rank, dim), n_modes) for _ in range(n_hidden)])
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("sumsq", torch.zeros(dim, dtype=torch.float64))

    @staticmethod
    def increments(u: torch.Tensor, d: torch.Tensor) -> list[torch.Tensor]:
        z = torch.cat([u, d], -1).detach().double()
        return [torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device), z.sum(0), z.pow(2).sum(0)]

    def add_statistics(self, incs: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for buf, inc in zip((self.count, self.sum, self.sumsq), incs):
                buf.add_(inc.to(buf.device))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if float(self.count) < 1:
            return torch.zeros_like(self.sum), torch.ones_like(self.sum)
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean.pow(2)).clamp_min(0.0)
        return mean, var.sqrt().clamp_min(1e-7) if float(self.count) >= 2 else torch.ones_like(var)

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.moments()
        z = (torch.cat([u, d], -1).double() - mean) / std
        z = z.to(self.blocks[0].down.weight.dtype)
        for block in self.blocks:
            z = block(z, mode)
        return z[:, :self.d_in], z[:, self.d_in:]


def _shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class Hypernet(nn.Module):
    """One `FactorNet` per weight shape, a mode per edited matrix, and the learned steps alpha.

    Args:
        shapes: edited module name -> (d_in, d_out).
        rank, n_hidden: block sizes.
        edit_lr: initial alpha of every matrix.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rank: int, n_hidden: int, edit_lr: float) -> None:
        super().__init__()
        self.shapes = dict(sorted(shapes.items()))
        groups: dict[str, list[str]] = {}
        for name, (d_in, d_out) in self.shapes.items():
            groups.setdefault(_shape_key(d_in, d_out), []).append(name)
        self.route = {name: (key, members.index(name)) for key, members in groups.items() for name in members}
        self.nets = nn.ModuleDict({key: FactorNet(*map(int, key.split("x")), len(members), rank, n_hidden)
                                   for key, members in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))
        self.index = {name: i for i, name in enumerate(self.shapes)}
        self.rank, self.n_hidden = rank, n_hidden

    def transform(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], update_stats: bool = False,
                  reduce_sum: Callable[[list[torch.Tensor]], None] | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(u, delta) per module -> (u~, delta~). With `update_stats`, the running statistics first take this
        batch's increments (summed over workers by `reduce_sum`, which adds tensors in place)."""
        if update_stats:
            incs: dict[str, list[torch.Tensor]] = {}
            for name, (u, d) in factors.items():
                key = self.route[name][0]
                new = FactorNet.increments(u, d)
                incs[key] = new if key not in incs else [a + b for a, b in zip(incs[key], new)]
            for key in self.nets:  # every worker reduces every group, present in its batch or not
                net = self.nets[key]
                incs.setdefault(key, [torch.zeros_like(net.count), torch.zeros_like(net.sum), torch.zeros_like(net.sumsq)])
            flat = [t for key in sorted(incs) for t in incs[key]]
            if reduce_sum is not None:
                reduce_sum(flat)
            for i, key in enumerate(sorted(incs)):
                self.nets[key].add_statistics(flat[3 * i:3 * i + 3])
        out = {}
        for name, (u, d) in factors.items():
            key, mode = self.route[name]
            out[name] = self.nets[key](u, d, mode)
        return out

    def step_size(self, name: str) -> torch.Tensor:
        return self.edit_lrs[self.index[name]]

    def metadata(self) -> dict[str, str]:
        return {"format": HYPERNET_FORMAT, "modules": json.dumps({n: list(s) for n, s in self.shapes.items()}),
                "rank": str(self.rank), "n_hidden": str(self.n_hidden)}


# ---------------------------------------------------------------------------------------------- factor capture


class _Capture:
    """Forward hooks that record each edited module's input u and, once a backward pass reaches it, the
    gradient delta of its output; `factors()` keeps the calls whose delta arrived, non-zero rows only."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.calls: dict[str, list[dict[str, torch.Tensor]]] = {n: [] for n in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            rec = {"u": inputs[0].detach()}
            self.calls[name].append(rec)
            output.register_hook(lambda g, rec=rec: rec.__setitem__("d", g.detach()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for name, calls in self.calls.items():
            us, ds = [], []
            for rec in calls:
                if "d" not in rec:
                    continue
                u = rec["u"].reshape(-1, rec["u"].shape[-1])
                d = rec["d"].reshape(-1, rec["d"].shape[-1])
                keep = (u != 0).any(-1) & (d != 0).any(-1)
                us.append(u[keep])
                ds.append(d[keep])
            if not us:
                raise MENDError(f"no gradient reached {name}: is it used by the forward pass of the IN samples?")
            out[name] = (torch.cat(us).float(), torch.cat(ds).float())
        return out


@contextlib.contextmanager
def _low_rank_edit(modules: Mapping[str, nn.Module], deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                   ) -> Iterator[None]:
    """Run the modules as if W <- W - alpha * d~^T u~, differentiably: out - alpha * (x u~^T) d~ (cheap for
    few positions, and the base weights stay untouched)."""

    def hook_for(name: str):
        alpha, u_t, d_t = deltas[name]

        def hook(module, inputs, output):
            x = inputs[0]
            return output - alpha.to(output.dtype) * ((x @ u_t.to(x.dtype).T) @ d_t.to(x.dtype))
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in deltas]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- the editor


class MEND(EditMethod):
    """Gradient-decomposition hypernetwork editor. See the module docstring."""

    config_cls = MENDConfig
    host_envs = ("in",)
    default_last_layers = 3  # EasyEdit: OPT-2.7B layers 29-31

    def __init__(self, adapter, cfg: MENDConfig) -> None:
        super().__init__(adapter, cfg)
        self.hypernet: Hypernet | None = None
        self.trained = False
        self._meta_pre: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------ setup

    def install(self) -> None:
        modules = self.target_modules()
        for name, m in modules.items():
            if not isinstance(m, nn.Linear):
                raise MENDError(f"MEND edits nn.Linear weights; {name} is a {type(m).__name__}")
        shapes = {n: (m.in_features, m.out_features) for n, m in modules.items()}
        self.hypernet = Hypernet(shapes, self.cfg.rank, self.cfg.n_hidden, self.cfg.edit_lr).to(self.adapter.device)
        if self.cfg.hypernet_path:
            self.load_hypernet(self.cfg.hypernet_path)

    def editable(self) -> Mapping[str, nn.Parameter]:
        return {f"{n}.weight": m.weight for n, m in self.target_modules().items()}

    def meta_parameters(self) -> list[nn.Parameter]:
        """theta: what meta-training moves (the hypernetwork and the steps alpha)."""
        self.prepare()
        return list(self.hypernet.parameters())

    def meta_param_groups(self) -> list[dict[str, Any]]:
        nets = [p for n, p in self.hypernet.named_parameters() if n != "edit_lrs"]
        return [{"params": nets, "lr": self.cfg.lr}, {"params": [self.hypernet.edit_lrs], "lr": self.cfg.lr_lr}]

    # ------------------------------------------------------------------------------------------ losses

    def host_loss(self, outs, cases):
        """R_rel on IN at edit time (its gradient is what MEND transforms); the editor-training loss during
        meta-training (module docstring)."""
        if self._meta_pre is None:
            return super().host_loss(outs, cases)
        cfg = self.cfg
        total = None
        terms = [(cfg.cedit, e, "nll") for e in TEXT_EDIT_ENVS] + [(cfg.iedit, e, "nll") for e in IMAGE_EDIT_ENVS]
        terms += [(cfg.cloc / max(1, sum(e in outs for e in LOC_ENVS)), e, "kl") for e in LOC_ENVS]
        text_n = max(1, sum(e in outs for e in TEXT_EDIT_ENVS))
        for weight, env, kind in terms:
            if env not in outs or weight == 0:
                continue
            o = outs[env]
            if kind == "nll":
                w = weight / text_n if env in TEXT_EDIT_ENVS else weight
                term = w * reliability_risk(o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size)
            else:
                term = weight * _kl_pre_post(self._meta_pre[env], o.answer_logits(), o.answer_row(), o.batch.size)
            total = term if total is None else total + term
        if total is None:
            raise MENDError("meta-training batch has no IN/SE/OUT samples to score the edit on")
        return total

    # ------------------------------------------------------------------------------------------ the edit

    def _factors(self, cases: Sequence[EditCase], objective: Any, k: int, params: Sequence[torch.Tensor]
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """One forward pass of the objective's environments with factor capture; the objective's parts at
        phi_e, and the (u, delta) of R_rel on IN."""
        from odedit.editstep import forward_envs

        capture = _Capture(self.target_modules())
        try:
            outs, owners = forward_envs(self.adapter, cases, objective.envs)
        finally:
            capture.remove()
        if "in" not in outs:
            raise MENDError("a MEND edit needs IN samples")
        if hasattr(objective, "owners"):
            objective.owners = owners
        _, parts = objective.loss(self, outs, cases, k, params)
        rel = super().host_loss(outs, cases)
        torch.autograd.grad(rel, list(params))  # the backward pass through every edited module fills delta
        return capture.factors(), parts

    def _write_update(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        modules = self.target_modules()
        with torch.no_grad():
            transformed = self.hypernet.transform(factors)
            for name, (u_t, d_t) in transformed.items():
                w = modules[name].weight
                w.sub_((self.hypernet.step_size(name) * (d_t.T @ u_t)).to(w.dtype))

    def apply(self, cases: Sequence[EditCase], objective: Any, stepper_factory: Any) -> tuple[EditHandle, Any]:
        """One MEND edit of `cases` (jointly): factors of R_rel on IN, hypernetwork, weight update."""
        from odedit.editstep import StepReport, forward_envs

        t0 = time.perf_counter()
        self.prepare()
        self._ensure_trained(objective)
        handle = self.snapshot()
        report = StepReport()
        params = list(self.editable().values())
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            factors, parts = self._factors(cases, objective, 1, params)
            report.parts.append(parts)
            self._write_update(factors)
            report.iterations = 1
            if not all(torch.isfinite(p).all() for p in params):
                handle.restore()
                report.failed = "non-finite weights after the MEND update; step rolled back"
                return handle, report
            outs, owners = forward_envs(self.adapter, cases, objective.envs)
            if hasattr(objective, "owners"):
                objective.owners = owners
            loss, parts = objective.loss(self, outs, cases, 2, params)  # G at the new phi_e (+ Eq. 13 dual step)
            report.parts.append(parts)
            if not bool(torch.isfinite(loss.detach()).all()):
                handle.restore()
                report.failed = f"post-edit loss is {float(loss.detach())}; step rolled back"
        finally:
            model.train(was_training)
            report.seconds = time.perf_counter() - t0
        return handle, report

    def _ensure_trained(self, objective: Any) -> None:
        if self.trained:
            return
        if self.cfg.bootstrap_steps <= 0:
            raise MENDError("MEND has no trained hypernetwork: set method.hypernet_path to a file written by "
                            "`python -m jobs.train_editor`, or method.bootstrap_steps > 0 for an in-process "
                            "meta-training on synthetic edits (tiny models, tests)")
        from odedit.methods.mend_train import MetaTrainer, synthetic_cases

        cases = synthetic_cases(self.adapter, self.cfg.bootstrap_edits, seed=0)
        MetaTrainer(self, objective, cases).train(self.cfg.bootstrap_steps)
        self.trained = True

    # ------------------------------------------------------------------------------------------ meta-training

    def meta_loss(self, cases: Sequence[EditCase], objective: Any, k: int,
                  reduce_sum: Callable[[list[torch.Tensor]], None] | None = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """The editor-training loss of one batch of edits (the objective's G with the host loss of the module
        docstring), differentiable in the hypernetwork; the base weights are never written."""
        from odedit.editstep import forward_envs

        self.prepare()
        envs = tuple(dict.fromkeys(TRAIN_ENVS + tuple(objective.envs)))
        with torch.no_grad():
            pre, _ = forward_envs(self.adapter, cases, [e for e in LOC_ENVS if e in envs])
            pre_logp = {e: torch.log_softmax(o.answer_logits().float(), -1) for e, o in pre.items()}
        capture = _Capture(self.target_modules())
        try:
            outs_in, _ = forward_envs(self.adapter, cases, ["in"])
        finally:
            capture.remove()
        if "in" not in outs_in:
            raise MENDError("meta-training edits need IN samples")
        rel = super().host_loss(outs_in, cases)
        torch.autograd.grad(rel, [m.weight for m in self.target_modules().values()])
        factors = capture.factors()
        transformed = self.hypernet.transform(factors, update_stats=True, reduce_sum=reduce_sum)
        modules = self.target_modules()
        deltas = {n: (self.hypernet.step_size(n), u_t, d_t) for n, (u_t, d_t) in transformed.items()}
        edited = [modules[n].weight - (deltas[n][0] * (deltas[n][2].T @ deltas[n][1])).to(modules[n].weight.dtype)
                  for n in modules]
        self._meta_pre = pre_logp
        try:
            with _low_rank_edit(modules, deltas):
                outs, owners = forward_envs(self.adapter, cases, envs)
            if hasattr(objective, "owners"):
                objective.owners = owners
            loss, parts = objective.loss(self, outs, cases, k, edited)
        finally:
            self._meta_pre = None
        return loss, parts

    # ------------------------------------------------------------------------------------------ persistence

    def save_hypernet(self, path: str | os.PathLike) -> str:
        """Write the hypernetwork (weights, steps, running statistics) and its module shapes as safetensors."""
        from safetensors.torch import save_file

        self.prepare()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.hypernet.state_dict().items()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        save_file(tensors, tmp, metadata=self.hypernet.metadata())
        os.replace(tmp, path)
        return str(path)

    def load_hypernet(self, path: str | os.PathLike) -> None:
        """Load a hypernetwork saved by `save_hypernet`; MENDError if it was trained for other modules,
        shapes or sizes (the message names the mismatch)."""
        from safetensors import safe_open

        if self.hypernet is None:
            self.prepare()
        if not os.path.isfile(path):
            raise MENDError(f"method.hypernet_path: {str(path)!r} does not exist; train one with "
                            "`python -m jobs.train_editor --config <yaml>`")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types on a damaged or foreign file
            raise MENDError(f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != HYPERNET_FORMAT:
            raise MENDError(f"{path}: not a MEND hypernetwork of this project (format {meta.get('format')!r}, "
                            f"expected {HYPERNET_FORMAT!r})")
        theirs = {n: tuple(s) for n, s in json.loads(meta.get("modules", "{}")).items()}
        ours = self.hypernet.shapes
        problems = [f"{n}: trained for (d_in, d_out)={theirs[n]}, this model has {ours[n]}"
                    for n in sorted(set(theirs) & set(ours)) if tuple(theirs[n]) != tuple(ours[n])]
        if set(theirs) - set(ours):
            problems.append(f"modules this model does not edit: {sorted(set(theirs) - set(ours))[:4]}")
        if set(ours) - set(theirs):
            problems.append(f"edited modules it was not trained for: {sorted(set(ours) - set(theirs))[:4]}")
        for key, want in (("rank", self.hypernet.rank), ("n_hidden", self.hypernet.n_hidden)):
            if meta.get(key) != str(want):
                problems.append(f"method.{key}={want} but the file has {key}={meta.get(key)}")
        if problems:
            raise MENDError(f"hypernetwork {str(path)!r} does not fit this model/config: " + "; ".join(problems))
        self.hypernet.load_state_dict({k: v.to(self.adapter.device) for k, v in tensors.items()})
        self.trained = True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({f"hypernet.{k}": v.detach().cpu().clone() for k, v in self.hypernet.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        net = {k[len("hypernet."):]: v for k, v in state.items() if k.startswith("hypernet.")}
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("hypernet.")})
        ours = self.hypernet.state_dict()
        bad = [k for k in ours if k not in net or tuple(net[k].shape) != tuple(ours[k].shape)]
        if bad or set(net) - set(ours):
            raise MENDError(f"checkpoint hypernetwork does not match this MEND config: {sorted(bad)[:4]}")
        self.hypernet.load_state_dict({k: v.to(self.adapter.device) for k, v in net.items()})
        self.trained = True


def _kl_pre_post(pre_logp: torch.Tensor, post_logits: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """KL(p_pre || p_post) per answer position (full vocabulary), averaged per sample then over samples."""
    post = torch.log_softmax(post_logits.float(), -1)
    kl = (pre_logp.exp() * (pre_logp - post)).sum(-1)
    rows = rows.to(kl.device)
    sums = torch.zeros(n_rows, dtype=kl.dtype, device=kl.device).index_add(0, rows, kl)
    counts = torch.zeros(n_rows, dtype=kl.dtype, device=kl.device).index_add(0, rows, torch.ones_like(kl))
    present = counts > 0
    return (sums[present] / counts[present]).mean() if bool(present.any()) else kl.sum() * 0.0


register_method("mend", MENDConfig, MEND)

__all__ = ["MEND", "MENDConfig", "MENDError", "Hypernet", "FactorNet", "LowRankBlock", "HYPERNET_FORMAT"]
