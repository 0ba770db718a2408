"""The MEND host editor: config, edit (`apply`), editor-training loss (`meta_loss`) and hypernetwork files.

See `odedit.methods.mend` for the method and its reconstruction choices.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from odedit.config import MethodConfig
from odedit.configlib import each, non_negative, option, positive
from odedit.editstep import DIRECT, ParamAccess, StepReport, encode_envs, forward_envs
from odedit.envs import EditCase
from odedit.methods.base import EditHandle, EditMethod
from odedit.methods.mend.hypernet import HYPERNET_FORMAT, FactorCapture, Hypernet, MENDError, low_rank_edit
from odedit.methods.mend.train import MetaTrainer, synthetic_cases
from odedit.methods.registry import register_method
from odedit.objective import Objective
from odedit.risks import reliability_risk

TEXT_EDIT_ENVS = ("in", "se_text")
IMAGE_EDIT_ENVS = ("se_image",)
LOC_ENVS = ("out_text", "out_mm")
TRAIN_ENVS = TEXT_EDIT_ENVS + IMAGE_EDIT_ENVS + LOC_ENVS


def _must_be_one(v: int) -> str | None:
    return None if v == 1 else "MEND applies exactly one hypernetwork update per edit step; must be 1"


@dataclass(frozen=True)
class MENDConfig(MethodConfig):
    name: str = option("mend", help="host editor")
    modules: tuple[str, ...] = option(
        ("ffn_in", "ffn_out"),
        help="module kinds whose weights MEND edits (EasyEdit: OPT fc1/fc2)",
        check=each(lambda v: None if v in ("ffn_in", "ffn_out", "attn_out") else "unknown module kind"),
    )
    lr: float = option(1e-6, help="meta-training learning rate of the hypernetwork (EasyEdit MEND lr)", check=positive)
    n_iter: int = option(1, help="hypernetwork updates per edit step (always 1 for MEND)", check=_must_be_one)
    edit_lr: float = option(
        1e-4, help="initial step alpha of every edited matrix (learned in meta-training)", check=positive
    )
    lr_lr: float = option(1e-4, help="meta-training learning rate of the per-matrix steps alpha", check=non_negative)
    rank: int = option(1920, help="bottleneck rank of the hypernetwork blocks (capped at d_in + d_out)", check=positive)
    n_hidden: int = option(1, help="residual low-rank blocks in the hypernetwork", check=positive)
    cedit: float = option(
        0.1, help="weight of the post-edit NLL on IN and SE-text in the editor-training loss", check=non_negative
    )
    iedit: float = option(
        0.1, help="weight of the post-edit NLL on SE-image in the editor-training loss", check=non_negative
    )
    cloc: float = option(1.0, help="weight of KL(pre || post) on OUT in the editor-training loss", check=non_negative)
    grad_clip: float = option(100.0, help="meta-gradient norm clip; 0 = off", check=non_negative)
    hypernet_path: str = option("", help="safetensors hypernetwork written by jobs.train_editor; empty = none loaded")
    train_steps: int = option(1000, help="meta-training steps of jobs.train_editor", check=positive)
    train_batch: int = option(1, help="edits per meta-training step (edited jointly)", check=positive)
    val_edits: int = option(
        16, help="training edits held out to measure the editor before and after meta-training", check=non_negative
    )
    bootstrap_steps: int = option(
        0,
        help=(
            "without hypernet_path: meta-train in process for this many steps on synthetic edits at the first edit "
            "(tests, tiny models); 0 = require a trained hypernetwork"
        ),
        check=non_negative,
    )
    bootstrap_edits: int = option(16, help="synthetic edits of the in-process bootstrap", check=positive)


# ---------------------------------------------------------------------------------------------- the editor


class MEND(EditMethod):
    """Gradient-decomposition hypernetwork editor. See the module docstring."""

    config_cls = MENDConfig
    host_envs = ("in",)
    default_last_layers = 3  # EasyEdit: OPT-2.7B layers 29-31

    @classmethod
    def zero3_problem(cls, cfg: MENDConfig) -> str:
        """An edit runs under ZeRO-3 (factors from the modules' inputs and output gradients, the update written
        inside a gather); meta-training in process does not: it reads the edited weights outside a forward pass
        (`meta_loss`), where ZeRO-3 leaves them empty partitions."""
        if cfg.hypernet_path:
            return ""
        return (
            "without method.hypernet_path MEND meta-trains its hypernetwork in process (method.bootstrap_steps), "
            "reading the edited weights outside a forward pass, where ZeRO-3 leaves them empty partitions; train it "
            "first with `python -m jobs.train_editor` (no ZeRO sharding) and set method.hypernet_path to the file it "
            "writes"
        )

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

    def _encode(self, cases: Sequence[EditCase], envs: Sequence[str]) -> Any:
        """All environments of the step encoded once (frozen-prefix replay from the first edited layer)."""
        first = self.first_edited_layer() if self.cfg.cache_prefix else None
        encoded = encode_envs(self.adapter, cases, envs, first)
        if encoded is None or "in" not in encoded.spans:
            raise MENDError("a MEND edit needs IN samples")
        return encoded

    def _factors(
        self, encoded: Any, cases: Sequence[EditCase]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Any]:
        """One forward pass of all environments with factor capture, then the backward pass of R_rel on IN:
        (u, delta) per edited module (rows of other environments get no gradient and are dropped) and the
        forward outputs."""
        modules = self.target_modules()
        capture = FactorCapture(modules)
        try:
            outs = forward_envs(self.adapter, encoded)
        finally:
            capture.remove()
        rel = super().host_loss(outs, cases)
        # Differentiated with respect to the edited modules' outputs, which fills delta at every one of them:
        # the weights' own gradients are never formed (MEND reads only u and delta), and under ZeRO-3, where a
        # weight is an empty partition outside its module's forward, there is nothing of them to differentiate.
        torch.autograd.grad(rel, capture.outputs, allow_unused=True)
        return capture.factors(), outs

    def _write_update(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        modules = self.target_modules()
        with torch.no_grad():
            transformed = self.hypernet.transform(factors)
            for name, (u_t, d_t) in transformed.items():
                w = modules[name].weight
                w.sub_((self.hypernet.step_size(name) * (d_t.T @ u_t)).to(w.dtype))

    def apply(
        self, cases: Sequence[EditCase], objective: Objective, stepper_factory: Any, access: ParamAccess | None = None
    ) -> tuple[EditHandle, StepReport]:
        """One MEND edit of `cases` (jointly): factors of R_rel on IN, hypernetwork, weight update."""
        access = access or DIRECT
        t0 = time.perf_counter()
        self.prepare()
        self._ensure_trained(objective)
        params = list(self.editable().values())
        with access.modify(params):
            handle = self.snapshot()
        report = StepReport()
        model = self.adapter.model
        was_training = model.training
        model.eval()
        try:
            encoded = self._encode(cases, objective.envs)
            if hasattr(objective, "owners"):
                objective.owners = encoded.owners
            factors, outs = self._factors(encoded, cases)
            _, parts = objective.loss(self, outs, cases, 1, params)  # G at phi_e before the edit
            report.parts.append(parts)
            with access.modify(params):
                self._write_update(factors)
                finite = all(bool(torch.isfinite(p).all()) for p in params)
            report.iterations = 1
            if not finite:
                with access.modify(params):
                    handle.restore()
                report.failed = "non-finite weights after the MEND update; step rolled back"
                return handle, report
            outs = forward_envs(self.adapter, encoded)
            loss, parts = objective.loss(self, outs, cases, 2, params)  # G at the new phi_e (+ Eq. 13 dual step)
            report.parts.append(parts)
            if not bool(torch.isfinite(loss.detach()).all()):
                with access.modify(params):
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
            raise MENDError(
                "MEND has no trained hypernetwork: set method.hypernet_path to a file written by "
                "`python -m jobs.train_editor`, or method.bootstrap_steps > 0 for an in-process "
                "meta-training on synthetic edits (tiny models, tests)"
            )
        cases = synthetic_cases(self.adapter, self.cfg.bootstrap_edits, seed=0)
        MetaTrainer(self, objective, cases).train(self.cfg.bootstrap_steps)
        self.trained = True

    # ------------------------------------------------------------------------------------------ meta-training

    def meta_loss(
        self,
        cases: Sequence[EditCase],
        objective: Any,
        k: int,
        reduce_sum: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The editor-training loss of one batch of edits (the objective's G with the host loss of the module
        docstring), differentiable in the hypernetwork; the base weights are never written."""
        self.prepare()
        envs = tuple(dict.fromkeys(TRAIN_ENVS + tuple(objective.envs)))
        encoded = self._encode(cases, envs)
        factors, outs = self._factors(encoded, cases)  # the same pass gives the pre-edit OUT distributions
        pre_logp = {
            e: torch.log_softmax(o.answer_logits().detach().float(), -1) for e, o in outs.items() if e in LOC_ENVS
        }
        transformed = self.hypernet.transform(factors, update_stats=True, reduce_sum=reduce_sum)
        modules = self.target_modules()
        deltas = {n: (self.hypernet.step_size(n), u_t, d_t) for n, (u_t, d_t) in transformed.items()}
        edited = [
            modules[n].weight - (deltas[n][0] * (deltas[n][2].T @ deltas[n][1])).to(modules[n].weight.dtype)
            for n in modules
        ]
        if hasattr(objective, "owners"):
            objective.owners = encoded.owners
        self._meta_pre = pre_logp
        try:
            with low_rank_edit(modules, deltas):
                outs = forward_envs(self.adapter, encoded)
            loss, parts = objective.loss(self, outs, cases, k, edited)
        finally:
            self._meta_pre = None
        return loss, parts

    # ------------------------------------------------------------------------------------------ persistence

    def save_hypernet(self, path: str | os.PathLike) -> str:
        """Write the hypernetwork (weights, steps, running statistics) and its module shapes as safetensors."""
        # deferred: safetensors is needed only to write a hypernetwork file
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
        # deferred: safetensors is needed only to read a hypernetwork file
        from safetensors import safe_open

        if self.hypernet is None:
            self.prepare()
        if not os.path.isfile(path):
            raise MENDError(
                f"method.hypernet_path: {str(path)!r} does not exist; train one with "
                "`python -m jobs.train_editor --config <yaml>`"
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types on a damaged or foreign file
            raise MENDError(f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != HYPERNET_FORMAT:
            raise MENDError(
                f"{path}: not a MEND hypernetwork of this project (format {meta.get('format')!r}, "
                f"expected {HYPERNET_FORMAT!r})"
            )
        theirs = {n: tuple(s) for n, s in json.loads(meta.get("modules", "{}")).items()}
        ours = self.hypernet.shapes
        problems = [
            f"{n}: trained for (d_in, d_out)={theirs[n]}, this model has {ours[n]}"
            for n in sorted(set(theirs) & set(ours))
            if tuple(theirs[n]) != tuple(ours[n])
        ]
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
        net = {k[len("hypernet.") :]: v for k, v in state.items() if k.startswith("hypernet.")}
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
