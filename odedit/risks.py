"""ODEdit's risks as pure tensor functions (method.md §2): no model, config or tracker in sight.

All functions take answer-position logits in the packed form of `ForwardOutput.answer_logits()`:
`logits` (N, V) for the N answer positions of a batch, `rows` (N,) the batch row of each position, and
`n_rows` the batch size. Per-sample means are taken first and then averaged over samples, so a long
target does not outweigh a short one ([INFERENCE]: the paper writes expectations over samples).

Every risk takes a logit scale `omega` (default 1.0): the dummy classifier of IRM (method.md §2.5) through
which the TV-l1 penalty measures how each environment's risk reacts to the environment ([TV1]/[TV2] code).

[INFERENCE] Every risk, slope and kernel here is computed in fp32 whatever the model's dtype
(`resources.precision`): logits are cast before the log-softmax (and before the omega scaling, so the slope in
omega is not taken on bf16 products), hidden states before the MMD kernels. In bf16 (8 mantissa bits) a
log-softmax over a large vocabulary loses the small probabilities that R_loc's KL and the references' tail
bucket are made of, and the TV-l1 penalty's slopes (E_q[z] - z_y) are differences of nearly equal numbers.
The casts are differentiable, so gradients still reach the bf16 model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _sample_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean over samples of the per-sample mean of `values` (samples without positions are skipped).

    `values` is (N,) or (N, C): C columns reduced at once (a risk and its slope share one reduction).
    """
    rows = rows.to(values.device)
    ones = torch.ones(values.shape[0], *([1] * (values.dim() - 1)), dtype=values.dtype, device=values.device)
    both = torch.cat([values.reshape(values.shape[0], -1), ones.reshape(-1, 1)], 1)
    sums = torch.zeros(n_rows, both.shape[1], dtype=values.dtype, device=values.device).index_add(0, rows, both)
    present = sums[:, -1] > 0
    if not bool(present.any()):
        return values.sum(0) * 0.0
    means = (sums[present, :-1] / sums[present, -1:]).mean(0)
    return means.reshape(values.shape[1:])


def reliability_risk(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int, omega: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """R_rel = -log p_{phi_e}(y_e | m_e, x_e)  (method.md Eq. 2).

    Teacher-forced NLL of the target tokens given the edit prompt, averaged per sample then over samples.

    Args:
        logits: (N, V) answer-position logits of the edited model.
        targets: (N,) target token ids.
        rows, n_rows: batch row of each position, batch size.
        omega: logit scale (1.0 outside the penalty).
    """
    nll = F.cross_entropy(logits.float() * omega, targets.to(logits.device), reduction="none")
    return _sample_mean(nll, rows, n_rows)


def locality_risk(
    logits: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    omega: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """R_loc = KL(p_{phi_e}(.|m_t, x_t) || p_phi(.|m_t, x_t))  (method.md Eq. 3), direction edited || original.

    Computed per answer position against pre-edit references computed once (`odedit.envs.Reference`):
    the K stored tokens plus one tail bucket with the rest of the mass on both sides. With K >= V this is
    the exact KL; with K < V it is the KL between the coarse-grained distributions ([INFERENCE], a lower
    bound of the full KL by the data-processing inequality) so references stay small at any vocabulary size.

    Args:
        logits: (N, V) edited-model logits at the OUT answer positions.
        ref_ids, ref_logprobs: (N, K) pre-edit top-K token ids and log-probabilities at the same positions.
        rows, n_rows: batch row of each position, batch size.
        omega: logit scale of the edited model.
    """
    logq = torch.log_softmax(logits.float() * omega, -1)
    ref_ids = ref_ids.to(logits.device).long()
    ref_logprobs = ref_logprobs.to(logits.device).float()
    logq_k = logq.gather(-1, ref_ids)
    q_k = logq_k.exp()
    q_tail = (1.0 - q_k.sum(-1)).clamp_min(_EPS)
    p_tail = (1.0 - ref_logprobs.exp().sum(-1)).clamp_min(_EPS)
    kl = (q_k * (logq_k - ref_logprobs)).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    return _sample_mean(kl, rows, n_rows)


def nll_and_slope(z: torch.Tensor, logq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, 2): per position, -log q_y and its omega-slope d/domega CE(omega z, y) = E_q[z] - z_y at omega = 1.

    `z` are float logits, `logq` their log-softmax (shared by the callers), `targets` (N,) token ids.
    (`position_risks` on reliability rows.)
    """
    value, slope = position_risks(z, logq, targets.unsqueeze(-1), any_out=False)
    return torch.stack([value, slope], 1)


def kl_and_slope(
    z: torch.Tensor, logq: torch.Tensor, ref_ids: torch.Tensor, ref_logprobs: torch.Tensor
) -> torch.Tensor:
    """(N, 2): per position, the tail-bucket KL of `locality_risk` and its omega-slope at omega = 1.

    With q = softmax(omega z): dq_i/domega = q_i (z_i - E_q[z]). For the K stored tokens and the tail bucket t
    (q_t = 1 - sum_k q_k, so dq_t = -sum_k dq_k): dKL/domega = sum_k dq_k (log q_k - log p_k + 1)
    + dq_t (log q_t - log p_t + 1), where the +1 terms cancel; where the tail is clamped at eps (all mass in
    the K tokens) its term is constant, as autograd has it. (`position_risks` on OUT rows.)
    """
    log_p_tail = (1.0 - ref_logprobs.exp().sum(-1)).clamp_min(_EPS).log()
    value, slope = position_risks(z, logq, ref_ids, ref_logprobs, log_p_tail, any_rel=False)
    return torch.stack([value, slope], 1)


def position_risks(
    z: torch.Tensor,
    logq: torch.Tensor,
    ids: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    log_p_tail: torch.Tensor | None = None,
    is_rel: torch.Tensor | None = None,
    any_out: bool = True,
    any_rel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (N,), the risk and its omega-slope at omega = 1: the NLL of `nll_and_slope` on reliability
    rows (`is_rel`, target id in column 0 of `ids`), the tail-bucket KL of `kl_and_slope` on OUT rows (`ids` /
    `ref_logprobs` the K references, `log_p_tail` log of their tail mass), computed for all rows at once and
    picked per row. Those two functions are this one on rows of a single kind (`any_out` / `any_rel` False
    skips the kind that has no row; the OUT arguments are then not needed).

    All rows at once rather than cut apart because on small models every tensor operation, forward and
    backward, costs its dispatch time.
    """
    zbar = (logq.exp() * z).sum(-1)  # E_q[z]
    logq_k = logq.gather(-1, ids)
    z_k = z.gather(-1, ids)
    if any_rel:
        nll, nll_slope = -logq_k[:, 0], zbar - z_k[:, 0]
        if not any_out:
            return nll, nll_slope
    q_k = logq_k.exp()
    raw_tail = 1.0 - q_k.sum(-1)
    q_tail = raw_tail.clamp_min(_EPS)
    tail = q_tail.log() - log_p_tail
    log_ratio = logq_k - ref_logprobs
    kl = (q_k * log_ratio).sum(-1) + q_tail * tail
    dq_k = q_k * (z_k - zbar.unsqueeze(-1))
    d_sum = dq_k.sum(-1)
    kl_slope = (dq_k * log_ratio).sum(-1) + torch.where(raw_tail > _EPS, -d_sum * tail, d_sum)
    if not any_rel:
        return kl, kl_slope
    return torch.where(is_rel, nll, kl), torch.where(is_rel, nll_slope, kl_slope)


def reliability_risk_and_slope(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_rel, dR_rel/domega) at omega = 1, both differentiable in the logits, without double backward.

    The penalty only needs each risk's derivative in the logit scale omega at omega = 1, and for a scale it is
    closed-form (`nll_and_slope`; the per-sample means are linear). This equals `autograd.grad(
    reliability_risk(logits, targets, rows, n_rows, omega), omega, create_graph=True)` (tested) at a fraction
    of the cost: no second-order graph, so the penalty's gradient reaches the model through one ordinary
    backward.
    """
    z = logits.float()
    value, slope = _sample_mean(
        nll_and_slope(z, torch.log_softmax(z, -1), targets.to(z.device).long()), rows, n_rows
    ).unbind(0)
    return value, slope


def locality_risk_and_slope(
    logits: torch.Tensor, ref_ids: torch.Tensor, ref_logprobs: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_loc, dR_loc/domega) at omega = 1 in closed form (`kl_and_slope`; see `reliability_risk_and_slope`)."""
    z = logits.float()
    per_position = kl_and_slope(
        z, torch.log_softmax(z, -1), ref_ids.to(z.device).long(), ref_logprobs.to(z.device).float()
    )
    value, slope = _sample_mean(per_position, rows, n_rows).unbind(0)
    return value, slope


def median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Median heuristic: sigma^2 = median of pairwise squared distances of the pooled sample (no gradient)."""
    z = torch.cat([x, y], 0).detach().float()
    d2 = torch.cdist(z, z).pow(2)
    off = d2[~torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)]
    med = off.median() if off.numel() else torch.tensor(1.0, device=z.device)
    return med.clamp_min(_EPS).sqrt()


def kernel_bandwidths(
    x: torch.Tensor, y: torch.Tensor, n_kernels: int = 5, base: float = 0.0, mult: float = 2.0
) -> torch.Tensor:
    """The sigma_q of the multi-scale Gaussian kernel ([INFERENCE] method.md §2.4: DAN/MK-MMD practice).

    Bandwidths base * mult^(q - (n-1)/2) for q = 0..n-1, centred on `base` (median heuristic when 0):
    5 kernels with mult 2 give base x {1/4, 1/2, 1, 2, 4}.
    """
    sigma = median_bandwidth(x, y) if base <= 0 else torch.tensor(float(base), device=x.device)
    exps = torch.arange(n_kernels, dtype=torch.float32, device=x.device) - (n_kernels - 1) / 2
    return sigma * (mult**exps)


def multi_gaussian_kernel(a: torch.Tensor, b: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = sum_q exp(-||a_i - b_j||^2 / (2 sigma_q^2)); returns (n, m)."""
    d2 = (a.float().unsqueeze(1) - b.float().unsqueeze(0)).pow(2).sum(-1)
    return torch.exp(-d2.unsqueeze(-1) / (2 * sigmas.float().pow(2))).sum(-1)


def generality_risk(
    z_edit: torch.Tensor, z_rephrase: torch.Tensor, sigmas: torch.Tensor, estimator: str = "biased"
) -> torch.Tensor:
    """R_gen = MMD^2(Z_E, Z_R) with a sum of Gaussian kernels  (method.md Eq. 6).

    E[k(z_e, z_e')] + E[k(z_r, z_r')] - 2 E[k(z_e, z_r)]. `estimator="biased"` (default) takes the first two
    expectations over all pairs (the V-statistic, so one edit and one rephrase give 2 k_max - 2 k(z_e, z_r), as
    method.md §2.4 notes); "unbiased" over distinct pairs only (`mmd_weights`, issue 17).

    Args:
        z_edit: (n, H) last hidden states of the edited model on the edit prompts.
        z_rephrase: (m, H) the same on their rephrases (text and image).
        sigmas: (Q,) kernel bandwidths.
    """
    if z_edit.shape[0] == 0 or z_rephrase.shape[0] == 0:
        return (z_edit.sum() + z_rephrase.sum()) * 0.0
    n, m = z_edit.shape[0], z_rephrase.shape[0]
    weights = mmd_weights(n, m, z_edit.device) if estimator == "unbiased" else None
    return generality_risk_stacked(torch.cat([z_edit, z_rephrase]), n, sigmas, weights=weights)


def mmd_weights(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """W ((n+m), (n+m)) with sum(W * K) the unbiased MMD^2 (U-statistic) of z[:n] vs z[n:] (issue 17).

    [INFERENCE] W_ee = 1 / (n (n-1)) off the diagonal, W_rr = 1 / (m (m-1)) off the diagonal, W_er = W_re =
    -1 / (n m), 0 on the diagonal: the within-set expectations run over distinct pairs, so a state's similarity
    to itself (k_max, whatever the states) no longer counts. The biased V-statistic (`mmd_signs`) counts it: with
    1 IN and 2 SE states and 5 kernels that is 5 + 2.5 of constant mass on top of the cross term, and R_gen is
    about 2 before any update (issue 17). A set of one state has no distinct pair: its within-set term is 0. The
    estimate is unbiased for MMD^2 and can be negative.
    """
    w = torch.full((n + m, n + m), -1.0 / (n * m), device=device)
    w[:n, :n] = 1.0 / (n * (n - 1)) if n > 1 else 0.0
    w[n:, n:] = 1.0 / (m * (m - 1)) if m > 1 else 0.0
    w.fill_diagonal_(0.0)
    return w


def mmd_signs(n: int, m: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """s = (1/n, ..., 1/n, -1/m, ..., -1/m): s^T K s over stacked samples is MMD^2's three block means."""
    return torch.cat([torch.full((n,), 1.0 / n, device=device), torch.full((m,), -1.0 / m, device=device)])


def generality_risk_stacked(
    z: torch.Tensor,
    n: int,
    sigmas: torch.Tensor,
    signs: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`generality_risk` of z[:n] (edit prompts) vs z[n:] (rephrases), from one kernel matrix over both.

    With s = `mmd_signs(n, m)` (pass it to reuse it), s^T K s = mean K_ee + mean K_rr - 2 mean K_er: the
    three block means of Eq. 6 in a third of the operations (the biased estimate). With `weights` (W of
    `mmd_weights`), sum(W * K): the unbiased one.
    """
    m = z.shape[0] - n
    if n == 0 or m == 0:
        return z.sum() * 0.0
    k = multi_gaussian_kernel(z, z, sigmas)
    if weights is not None:
        return (weights.to(k.dtype) * k).sum()
    s = signs if signs is not None else mmd_signs(n, m, k.device)
    return s @ (k @ s)


EnvRisk = Callable[[torch.Tensor], torch.Tensor]  # omega -> R_e(omega o phi_e)


def omega_gradients(env_risks: Sequence[EnvRisk], omega: torch.Tensor) -> list[torch.Tensor]:
    """dR_e/domega at `omega` for each environment, kept differentiable (create_graph=True)."""
    return risks_and_omega_gradients(env_risks, omega)[1]


def risks_and_omega_gradients(
    env_risks: Sequence[EnvRisk], omega: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(R_e(omega), dR_e/domega) for each environment; both differentiable.

    Each environment gets its own copy of omega (all at the same value), so one backward pass through the
    sum of the risks yields every environment's derivative. Only the ops between omega and the risks (the
    scaled logits and the losses) are differentiated twice; gradients then reach the model through an
    ordinary first-order backward of the penalty, which keeps this compatible with DeepSpeed ZeRO's hooks.
    The risk values at omega = 1 are the ordinary risks, so callers reuse them (R_loc) instead of
    computing them again.
    """
    omegas = omega.reshape(1).expand(len(env_risks)).clone()
    values = [risk(omegas[i]) for i, risk in enumerate(env_risks)]
    (g,) = torch.autograd.grad(sum(values), omegas, create_graph=True, allow_unused=True)
    grads = [omega * 0.0 for _ in env_risks] if g is None else list(g.unbind(0))
    return values, grads


def penalty_from_gradients(
    grads: Sequence[torch.Tensor], reduction: str = "mean", smoothing: float = 0.0
) -> torch.Tensor:
    """(reduce_e |dR_e/domega|)^2 with reduce = mean or sum (the TV-l1 penalty of `tv_l1_penalty`)."""
    return penalty_from_slopes(torch.stack([x.reshape(()) for x in grads]), reduction, smoothing)


def penalty_from_slopes(slopes: torch.Tensor, reduction: str = "mean", smoothing: float = 0.0) -> torch.Tensor:
    """`penalty_from_gradients` for the environments' slopes as one (E,) tensor (method.md Eq. 9).

    [INFERENCE] `smoothing` = eps > 0 replaces |s| by sqrt(s^2 + eps^2) - eps, which differs from |s| by less
    than eps and whose derivative goes smoothly through 0. An environment at its optimum has slope exactly 0
    in exact arithmetic: OUT at its pre-edit reference on a step's first iteration, where R_loc = KL = 0. The
    subgradient of |s| there is sign(s), so with the plain absolute value that environment pushes phi_e one way
    or the other with full weight depending on the sign of a rounding error of 1e-7 (how the reference was
    batched, which kernel ran the forward pass). With eps = 1e-3 such an environment contributes about
    |s| / eps of its gradient, nothing in practice, while slopes above ~1e-2 keep over 99% of theirs.
    """
    g = (slopes.square() + smoothing**2).sqrt() - smoothing if smoothing > 0 else slopes.abs()
    return (g.mean() if reduction == "mean" else g.sum()).pow(2)


def tv_l1_penalty(
    env_risks: Sequence[EnvRisk], omega: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """TV-l1 invariance penalty (E_omega |grad_omega R_edit(omega o phi_e)|)^2  (method.md Eq. 9, §2.5).

    [INFERENCE] from [TV1]/[TV2]: omega is a dummy scalar logit scale at 1.0; the expectation runs over the
    training environments (IN, SE-text, SE-image, OUT-text, OUT-mm), each with its own risk; the absolute
    gradients are averaged (`reduction="mean"`, default) or summed, then squared.

    Args:
        env_risks: one callable per environment mapping omega to that environment's risk.
        omega: the dummy scale (a fresh scalar 1.0 with requires_grad when None).
        reduction: "mean" or "sum" over environments.
    """
    if omega is None:
        omega = torch.tensor(1.0, requires_grad=True)
    if not env_risks:
        return omega * 0.0
    return penalty_from_gradients(omega_gradients(env_risks, omega), reduction)
