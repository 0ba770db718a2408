"""The lambda-network and the primal-dual steps of ODEdit (method.md §2.5 Eqs. 11-13, §3.1-3.3).

    G(delta, phi_e) = R_rel + w_loc R_loc + w_gen R_gen + lambda(delta, phi_e) * penalty          (Eq. 11)
    phi_e <- phi_e - gamma_1 * d_phi G(delta, phi_e)              (primal descent, Eq. 13)
    delta <- delta + gamma_2 * grad_delta G(delta, phi_e_new)     (dual ascent, Eq. 13)

Order of one iteration (exactly Eq. 13 with one forward pass per iteration): the forward pass at phi_k gives
the penalty at phi_k; the dual step for delta uses it (this is the delta-update of the previous iteration,
which needs G at the *new* phi); then lambda is re-evaluated with the new delta and the primal step is taken.
The first iteration of an edit step has no previous primal step, so it takes no dual step.

[INFERENCE] choices (each a config option, `ODEditConfig`):
  * lambda = Softplus(Linear(h->1)(ReLU(Linear(d->h)(s(phi_e))))), Xavier init ([TV2] `MLP2LayerParameter`,
    h=32). Its input s(phi_e) is a summary of the editable parameters (mean, std, RMS and max-abs of each
    tensor): flattening phi_e as [TV2] does is infeasible for MLLM layers.
  * steps: the host optimiser for phi_e and plain ascent with `dual_lr` for delta ([TV2] released code), or the
    adaptive rule gamma_k = c / (k^p ||g||) of [TV2] Theorem 3 (`step_rule: adaptive`).
  * saturating dual ascent (`lambda_cap`): Eq. 13's ascent raises lambda whenever the penalty is positive, and
    the TV-l1 penalty is never negative, so over a long stream lambda only grows. On editors whose edits act
    through routed side parameters (WISE, UniKE) it ran past 1e5 within a few steps (docs/results.md §2).
    We saturate the network's output, lambda = min(Softplus(MLP(s)), cap): at the cap the gradient of lambda in
    delta is zero, so the ascent stops there by itself and lambda stays at the cap until the primal steps bring
    it below. (A projection by shifting the output bias was tried first: in float32 the shift cancels outputs
    of ~1e6 and misses the cap.) The paper's unbounded lambda is `lambda_cap: 0`; `lambda_max` still rolls
    back the steps of a lambda that runs past it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from odedit.config import ODEditConfig

SUMMARY_STATS = 4


def parameter_summary(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """s(phi_e): (4 * len(params),) mean, std, RMS and max |.| of each editable tensor (differentiable)."""
    feats = []
    for p in params:
        x = p.float().reshape(-1)
        mean = x.mean()
        # +eps under the roots: LoRA's B starts at exactly 0, where sqrt has an infinite derivative.
        std = ((x - mean).pow(2).mean() + 1e-12).sqrt()
        rms = (x.pow(2).mean() + 1e-12).sqrt()
        feats += [mean, std, rms, x.abs().max()]
    return torch.stack(feats)


class LambdaNet(nn.Module):
    """lambda(delta, phi_e) = Softplus(MLP(s(phi_e))) >= 0, the learned penalty coefficient (Eqs. 11-12).

    Args:
        in_dim: size of the parameter summary.
        hidden: MLP width.
        init_bias: output bias at initialisation; lambda starts near softplus(init_bias).
        cap: lambda saturates here (its gradient is zero above), see the module docstring.
    """

    def __init__(
        self, in_dim: int, *, hidden: int = 32, init_bias: float = 0.0, seed: int = 0, cap: float = float("inf")
    ) -> None:
        super().__init__()
        self.cap = cap
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(seed)  # its own seed: identical on every worker and every run
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight, generator=g)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.fc2.weight.mul_(0.01)  # start close to softplus(init_bias) whatever the summary's scale
            self.fc2.bias.fill_(init_bias)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(summary.to(self.fc1.weight.dtype)))
        lam = nn.functional.softplus(self.fc2(h)).mean()
        return lam.clamp(max=self.cap) if math.isfinite(self.cap) else lam

    @torch.no_grad()
    def parameter_grads(self, summary: torch.Tensor) -> list[torch.Tensor]:
        """d lambda / d delta at `summary` (a 1-D s(phi_e)), by hand, in `parameters()` order.

        The same numbers as `torch.autograd.grad(self(summary), self.parameters())` (tested) for this two-layer
        network: softplus' (with torch's linear branch above 20), the cap's zero gradient above it, ReLU's
        zero gradient at and below 0. Written out because the dual ascent takes it at every iteration and
        an autograd pass over a network this small costs more in bookkeeping than in arithmetic.
        """
        s = summary.detach().to(self.fc1.weight.dtype)
        pre = self.fc1(s)
        h = torch.relu(pre)
        out = self.fc2(h)
        g = torch.where(out > 20.0, torch.ones_like(out), torch.sigmoid(out)) / out.numel()
        if math.isfinite(self.cap):
            g = g * (nn.functional.softplus(out).mean() <= self.cap)
        g_h = (g @ self.fc2.weight) * (pre > 0)
        return [torch.outer(g_h, s), g_h, torch.outer(g, h), g]


def adaptive_step(k: int, grad_norm: float, p: float, scale: float) -> float:
    """gamma_k = scale / (k^p ||g||), 0 when ||g|| = 0  ([TV2] Theorem 3; p > 1 makes sum gamma_k ||g|| finite)."""
    if grad_norm <= 0 or not math.isfinite(grad_norm):
        return 0.0
    return scale / (k**p * grad_norm)


class DualState:
    """The lambda-network, its ascent step and the bookkeeping a primal-dual edit needs.

    The penalty mode decides where lambda comes from: `learned` (the network, ascent on delta),
    `fixed` (a constant), or `off` (lambda = 0, the penalty is not even computed). Built from the `odedit`
    config section by `from_config`; the knobs are keywords (named as `ODEditConfig`'s fields they come from).
    """

    def __init__(
        self,
        mode: str,
        n_tensors: int,
        *,
        hidden: int = 32,
        init_bias: float = 0.0,
        fixed_lambda: float = 1.0,
        dual_lr: float = 1e-3,
        step_rule: str = "optimizer",
        adaptive_p: float = 1.1,
        adaptive_scale: float = 1.0,
        device: torch.device | str = "cpu",
        seed: int = 0,
        cap: float = float("inf"),
    ) -> None:
        self.mode = mode
        self.fixed_lambda = fixed_lambda
        self.dual_lr = dual_lr
        self.step_rule = step_rule
        self.adaptive_p = adaptive_p
        self.adaptive_scale = adaptive_scale
        self.net: LambdaNet | None = None
        if mode == "learned":
            self.net = LambdaNet(SUMMARY_STATS * n_tensors, hidden=hidden, init_bias=init_bias, seed=seed, cap=cap).to(
                device
            )
        # s(phi_e); ZeRO-3 replaces it with a gathered, gradient-free summary (parameters are partitioned).
        self.summary_fn = parameter_summary

    @classmethod
    def from_config(
        cls, cfg: ODEditConfig, n_tensors: int, *, device: torch.device | str = "cpu", seed: int = 0
    ) -> DualState:
        """The dual state of the `odedit` section for `n_tensors` editable tensors (`lambda_cap: 0` = no cap)."""
        return cls(
            cfg.penalty,
            n_tensors,
            hidden=cfg.lambda_hidden,
            init_bias=cfg.lambda_init_bias,
            fixed_lambda=cfg.fixed_lambda,
            dual_lr=cfg.dual_lr,
            step_rule=cfg.step_rule,
            adaptive_p=cfg.adaptive_p,
            adaptive_scale=cfg.adaptive_scale,
            device=device,
            seed=seed,
            cap=cfg.lambda_cap or float("inf"),
        )

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters()) if self.net is not None else []

    def lam(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """lambda(delta, phi_e): differentiable in phi_e (and delta) for the learned mode."""
        if self.net is None:
            ref = params[0]
            return torch.tensor(self.fixed_lambda if self.mode == "fixed" else 0.0, device=ref.device)
        return self.net(self.summary_fn(params))

    def ascent(self, penalty: float, params: Sequence[torch.Tensor], k: int) -> float:
        """delta <- delta + gamma_2 * grad_delta G, where grad_delta G = penalty * grad_delta lambda (Eq. 13).

        Only the lambda-network moves; phi_e enters detached. Returns gamma_2 * ||grad||, the step length.
        """
        if self.net is None or penalty <= 0:
            return 0.0
        return self._ascent_at(penalty, self.summary_fn([p.detach() for p in params]), k)

    def ascend_then_lam(
        self, penalty: float | None, params: Sequence[torch.Tensor], k: int
    ) -> tuple[float, torch.Tensor]:
        """`ascent` (when `penalty` is given) then `lam` at the new delta, sharing one s(phi_e) (one iteration's
        dual bookkeeping, Eq. 13). Returns (step length, lambda)."""
        if self.net is None:
            return 0.0, self.lam(params)
        summary = self.summary_fn(params)
        step = 0.0
        if penalty is not None and penalty > 0:
            step = self._ascent_at(penalty, summary.detach(), k)
        return step, self.net(summary)

    def _ascent_at(self, penalty: float, summary: torch.Tensor, k: int) -> float:
        params = list(self.net.parameters())
        grads = self.net.parameter_grads(summary)  # grad_delta G = penalty * grad_delta lambda
        norm = penalty * float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        lr = (
            self.dual_lr
            if self.step_rule == "optimizer"
            else adaptive_step(k, norm, self.adaptive_p, self.adaptive_scale)
        )
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=lr * penalty)
        return lr * norm

    def state_dict(self) -> dict:
        return {"mode": self.mode, "net": self.net.state_dict() if self.net is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"odedit.penalty: checkpoint has penalty mode {state.get('mode')!r}, config has {self.mode!r}"
            )
        if self.net is not None:
            self.net.load_state_dict(state["net"])
