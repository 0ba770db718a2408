"""Distributed plumbing of the edit engine: DeepSpeed ZeRO steppers, parameter access, the DeepSpeed config.

    comm = TorchComm(local_rank=...)                     # pipeline.train.collectives: every collective goes there
    wire_editor(editor, cfg, comm)                       # DeepSpeed ZeRO-2/3 (or all-reduce) for phi_e updates

On GPU workers: NCCL, bf16 by default (`resources.precision`); on CPU: gloo, fp32 by default, with a torch
optimiser handed to DeepSpeed (no FusedAdam JIT, platform.md §2). DeepSpeed wraps the whole model but optimises
only phi_e; it averages phi_e's gradients over workers, so a step whose edits are split between workers moves
every replica identically. This module calls no torch.distributed collective itself: the all-reduce of
zero_stage 0 and ODEdit's penalty mean go through `TorchComm`, ZeRO's own through DeepSpeed on its engine's
device, checked to be the communicator's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from odedit.dual import SUMMARY_STATS, parameter_summary
from odedit.editstep import ParamAccess, TorchStepper, torch_stepper_factory
from pipeline.train.collectives import CollectiveDeviceError, TorchComm

# DeepSpeed's dynamic loss scaling for fp16 (`loss_scale: 0` = dynamic): start at 2^16, halve on an overflow
# (after `hysteresis` overflows in a row), double after `loss_scale_window` steps without one, never below
# `min_loss_scale`. DeepSpeed's documented defaults.
FP16_LOSS_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
PRECISIONS = ("fp32", "bf16", "fp16")


# ZeRO-3's gathering knobs, in units of the model's hidden size h (`deepspeed_config`).
PERSISTENCE_PER_HIDDEN = 10  # parameters of at most 10 h elements (norms, biases) stay whole on every worker
PREFETCH_PER_HIDDEN_SQ = 0.9  # GPU: prefetch about one h x h projection ahead
LIVE_PER_HIDDEN_SQ = 12  # GPU: at most about one LLaMA decoder layer (4 h^2 attention + 3 h x 2.7h FFN) gathered
DEFAULT_HIDDEN = 4096  # LLaVA-1.5-7B's, where the model's hidden size is not known


def deepspeed_config(stage: int, use_gpu: bool, precision: str, hidden_size: int = 0) -> dict[str, Any]:
    """The DeepSpeed config of an edit stream: ZeRO `stage`, one micro-batch, and the resolved `precision`
    (`Config.training_precision()`): a `bf16` section for bf16, an `fp16` section with dynamic loss scaling
    (`FP16_LOSS_SCALING`) for fp16, neither for fp32.

    The model is loaded in the same dtype (`Config.model_dtype()`); DeepSpeed keeps fp32 master copies of the
    optimised parameters (phi_e) under bf16/fp16. [INFERENCE] what must stay fp32 whatever the model dtype is
    computed in fp32 from the model's outputs: the risks, their omega-slopes and the TV-l1 penalty
    (`odedit.risks`, `odedit.envrisks`: logits cast before log-softmax, MMD kernels on fp32 states), the
    lambda-network (fp32 parameters), the metrics (`odedit.metrics`) and the pre-edit references' log-probs
    (`odedit.envs`). A half-precision log-softmax over a 32k vocabulary loses the small probabilities R_loc's KL
    and the top-K references are made of, and the penalty's slopes are differences of nearly equal numbers.

    On CPU (gloo) ZeRO's `overlap_comm` and `contiguous_gradients` are off: there is no communication stream to
    overlap with and no device-memory fragmentation to avoid, so they only add copies to every iteration (an
    in-process A/B on the demo model, alternating steps: 5-7 ms less per 10-iteration step of ~70 ms).

    ZeRO-3 (issue 16 item 2) sets its four gathering knobs from the model's `hidden_size` h (`DEFAULT_HIDDEN`
    when 0). [INFERENCE] DeepSpeed's defaults (max_live_parameters = max_reuse_distance = 1e9) keep every
    parameter of a model under ~1 B parameters gathered from its forward use to its backward one, i.e. the
    whole model on every worker during an edit, which is what ZeRO-3 is chosen to avoid. So:

    * `stage3_max_reuse_distance: 0`: a module's parameters are released as soon as it has run; the backward
      pass gathers them again (one more all-gather per layer per iteration: ZeRO-3's trade, memory for
      communication);
    * `stage3_param_persistence_threshold: 10 h` (transformers' "auto" value): vectors such as norms and biases
      stay whole, saving an all-gather each for a few MB in all; every matrix (>= h^2 / 4 elements in these
      families) is partitioned. Relative to h so that a test model (h = 32) is partitioned like a 7B one;
    * `stage3_prefetch_bucket_size`: 0.9 h^2 on GPU (transformers' "auto": the next projection is gathered while
      this one computes), 0 on CPU (gloo has no separate stream to overlap with; a prefetch only raises the peak);
    * `stage3_max_live_parameters: 12 h^2` (about one LLaMA decoder layer): caps what prefetching may hold.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (resolved), got {precision!r}")
    if precision == "fp16" and not use_gpu:
        raise ValueError("precision fp16 needs a GPU (DeepSpeed's fp16 mode runs on CUDA only); use bf16 or fp32")
    zero: dict[str, Any] = {"stage": stage}
    if not use_gpu:
        zero.update(overlap_comm=False, contiguous_gradients=False)
    if stage == 3:
        h = hidden_size or DEFAULT_HIDDEN
        zero.update(
            stage3_max_reuse_distance=0,
            stage3_param_persistence_threshold=PERSISTENCE_PER_HIDDEN * h,
            stage3_prefetch_bucket_size=int(PREFETCH_PER_HIDDEN_SQ * h * h) if use_gpu else 0,
            stage3_max_live_parameters=LIVE_PER_HIDDEN_SQ * h * h,
        )
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, **FP16_LOSS_SCALING}
    return cfg


def hidden_size_of(model_config: Mapping[str, Any]) -> int:
    """The largest `hidden_size` in a model's (nested) config dict: the language model's in the MLLM families
    (LLaVA-1.5-7B: 4096 over its vision tower's 1024); 0 when there is none."""
    found = [int(v) for k, v in model_config.items() if k == "hidden_size" and isinstance(v, int)]
    found += [hidden_size_of(v) for v in model_config.values() if isinstance(v, Mapping)]
    return max(found, default=0)


def stream_deepspeed_config(cfg: Any, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """`deepspeed_config` of a stream's config for the model whose config dict is `model_config`: the same dict
    for partitioned loading (`pipeline.train.zero_loading`) and for `deepspeed.initialize` (`wire_editor`)."""
    return deepspeed_config(
        cfg.resources.zero_stage, cfg.resources.use_gpu, cfg.training_precision(), hidden_size_of(model_config)
    )


def uses_deepspeed(cfg: Any) -> bool:
    """Whether `wire_editor` hands the model to DeepSpeed (see there)."""
    return cfg.stream.mode != "single" and cfg.resources.zero_stage in (2, 3)


def runs_lockstep(cfg: Any, editor: Any) -> bool:
    """Whether every worker runs every step of a sequential stream in full (`odedit.stream.StreamRunner`'s
    `lockstep`) rather than a slice of its edits with the gradients averaged: under ZeRO-3 (every forward pass is
    collective), for editors whose update is not a pure average of per-edit gradients (patches, codebooks,
    memories, MEND's writes: `EditMethod.sliceable`) and for objectives that read the step's edits together
    (ODEdit: `Objective.sliceable`). Otherwise a sliced step under zero_stage 0/2 would not be the step a single
    worker or ZeRO-3 takes (FT + ODEdit: 0.040 apart on the tiny LLaVA after 2 Adam iterations, issue 16 item 5)."""
    if cfg.stream.mode != "sequential":
        return False
    sliceable = editor.method.sliceable and getattr(editor.objective, "sliceable", True)
    return cfg.resources.zero_stage == 3 or not sliceable


def loads_partitioned(cfg: Any) -> bool:
    """Whether a worker loads its model already partitioned (issue 16 item 2): exactly when `wire_editor` will run
    ZeRO-3, the only case in which something (DeepSpeed's hooks) gathers the parameters for a forward pass."""
    return uses_deepspeed(cfg) and cfg.resources.zero_stage == 3


# What `wire_editor` adds to the stream's DeepSpeed config so that DeepSpeed's step is the torch optimiser's step
# (issue 16 observation 6). DeepSpeed (0.19.8 here) clips the averaged gradient to global norm 1.0 unless
# `gradient_clipping` says otherwise; the in-process `TorchStepper` and zero_stage 0's `AllReduceStepper` never
# clip. Host FT's gradients on the test models stay under norm 1, so base streams agreed at every stage, but
# ODEdit's R_gen (MMD) term lifts the norm above 1 (1.04 on the tiny LLaVA's first iteration), and ZeRO-2/3
# then moved phi_e by 0.96x the averaged gradient: 4e-4 max |dw| after one SGD iteration, 0.16 after two
# 4-iteration Adam steps. Set here rather than in `deepspeed_config` because it is part of the editor's
# update rule, not of where the parameters live.
EDIT_STEP_RULE: dict[str, Any] = {"gradient_clipping": 0.0}


class ZeroAccess(ParamAccess):
    """Direct reads/writes of phi_e under ZeRO: gather (stage 3), then refresh the fp32 master copy. With no
    `engine` (a model loaded partitioned, before `deepspeed.initialize`) it only gathers: there is no master copy
    yet."""

    def __init__(self, engine: Any, stage: int) -> None:
        self.engine = engine
        self.stage = stage

    @contextlib.contextmanager
    def modify(self, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0, enabled=self.stage == 3):
            yield
        refresh = getattr(getattr(self.engine, "optimizer", None), "refresh_fp32_params", None)
        if refresh is not None:
            refresh()


class GatheredSummary:
    """s(phi_e) for ODEdit's lambda under ZeRO-3, with its gradient in phi_e (`wire_editor`).

    Outside a module's forward pass a ZeRO-3 parameter is partitioned, so `odedit.dual.parameter_summary` cannot
    be taken on it with autograd. `__call__` gathers phi_e, takes s(phi_e) without a graph and returns it as a leaf
    that requires grad, keeping each tensor's statistics; the backward of the edit step then leaves dG/ds in that
    leaf, and `add_gradient` (after `engine.backward`, before `engine.step`) adds dG/ds . ds/dphi_e to each
    worker's partition of the averaged gradient, from the closed form of ds/dx for x = phi_e.float().flatten():
    d mean = 1/n, d std = (x - mean)/(n std), d rms = x/(n rms), d max|x| = sign(x)/c at the c elements where
    |x| is the maximum (torch's full max spreads its gradient evenly over ties). Every worker of a lockstep step
    has the same dG/ds, so adding it once to the average is the term's share in it.

    Dropping this term (the gradient-free summary used before) moved FT + ODEdit's ZeRO-3 step 6.3e-6 from the
    1-worker step on the tiny LLaVA after 2 Adam iterations (issue 16 item 5).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.leaf: torch.Tensor | None = None
        self.stats: list[tuple[float, float, float, float, float, int]] = []

    def __call__(self, ps: Sequence[torch.Tensor]) -> torch.Tensor:
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters(self.params, enabled=True):
            summary = parameter_summary(self.params).clone()
            stats = []
            for p, (mean, std, rms, top) in zip(self.params, summary.view(-1, SUMMARY_STATS).tolist()):
                ties = int((p.float().abs() == top).sum())
                stats.append((mean, std, rms, top, ties, p.numel()))
        self.stats = stats
        self.leaf = summary.requires_grad_(True)
        return self.leaf

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add dG/ds . ds/dphi_e to this worker's gradient partitions; nothing when the leaf got no gradient."""
        leaf, self.leaf = self.leaf, None
        if leaf is None or leaf.grad is None:
            return
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        for p, g, (mean, std, rms, top, ties, n) in zip(
            self.params, leaf.grad.view(-1, SUMMARY_STATS).tolist(), self.stats
        ):
            x = p.ds_tensor.float().reshape(-1)  # this worker's slice of phi_e, padded past n
            start = dist.get_rank(group=p.ds_process_group) * x.numel()
            valid = torch.arange(start, start + x.numel(), device=x.device) < n
            term = g[0] / n + (x - mean) * (g[1] / (n * std)) + x * (g[2] / (n * rms))
            term += torch.where(x.abs() == top, x.sign() * (g[3] / ties), 0.0)
            grad = safe_get_local_grad(p)
            safe_set_local_grad(p, grad + torch.where(valid, term, 0.0).to(grad.dtype))


class DeepSpeedStepper:
    """One update through the DeepSpeed engine: backward (gradients averaged over workers) and step;
    `after_backward` (ZeRO-3 + ODEdit: `GatheredSummary.add_gradient`) runs between the two."""

    def __init__(self, engine: Any, extra: Sequence[torch.nn.Parameter] = (), after_backward: Any = None) -> None:
        self.engine = engine
        self.extra = list(extra)
        self.after_backward = after_backward

    def step(self, loss: torch.Tensor, k: int) -> None:
        self.engine.backward(loss)
        if self.after_backward is not None:
            self.after_backward()
        self.engine.step()
        for p in self.extra:  # the lambda-network moves by its own ascent step, not by this backward
            p.grad = None


class AllReduceStepper(TorchStepper):
    """A torch optimiser over replicated phi_e whose gradients are averaged over workers (zero_stage 0)."""

    def __init__(self, comm: TorchComm, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comm = comm

    def step(self, loss: torch.Tensor, k: int) -> None:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        self.comm.mean_(grads)
        self._apply(grads, k)


def _reset_optimizer_state(engine: Any) -> None:
    """Each edit step is a fresh optimisation (as in EasyEdit): clear Adam moments between steps."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.state.clear()


def check_engine_device(engine: Any, comm: TorchComm) -> None:
    """ZeRO's collectives run on the DeepSpeed engine's device: it must be the one the communicator declares."""
    device = getattr(engine, "device", None)
    if device is not None and torch.device(device) != comm.device:
        raise CollectiveDeviceError(
            f"DeepSpeed's collectives (ZeRO gradient reduction, parameter gathering) would run on {device}, but "
            f"the process group runs its collectives on {comm.device}; DeepSpeed places the model by $LOCAL_RANK "
            "(set by Ray Train): load it on cuda:<local rank> with NCCL, on cpu with gloo"
        )


def wire_editor(editor: Any, cfg: Any, comm: TorchComm) -> Any:
    """Make `editor` update phi_e in step with the other workers. Returns the DeepSpeed engine or None.

    * single mode: independent replicas, each with its own optimiser (no gradient exchange);
    * sequential, zero_stage 2/3: DeepSpeed ZeRO over the whole model, optimiser over phi_e;
    * sequential, zero_stage 0: replicated model, phi_e gradients all-reduced.
    """
    if cfg.stream.mode == "single" or comm.world == 1 and cfg.resources.zero_stage == 0:
        return None
    objective = editor.objective
    if hasattr(objective, "reduce"):
        objective.reduce = comm.mean
    params = list(editor.method.editable().values())
    if cfg.resources.zero_stage == 0:
        base = torch_stepper_factory(cfg.method, cfg.odedit)
        probe = base(params)
        editor.stepper_factory = lambda ps: AllReduceStepper(
            comm, ps, cfg.method.optimizer, cfg.method.lr, probe.rule, probe.p, probe.scale
        )
        return None
    import deepspeed

    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[cfg.method.optimizer]
    optimizer = opt_cls(params, lr=cfg.method.lr)
    # The edit step's update rule is the torch optimiser's, as in process and under zero_stage 0: no clipping.
    ds_cfg = {**stream_deepspeed_config(cfg, editor.adapter.model.config.to_dict()), **EDIT_STEP_RULE}
    engine, _, _, _ = deepspeed.initialize(
        model=editor.adapter.model,
        optimizer=optimizer,
        model_parameters=params,
        config=ds_cfg,
        dist_init_required=False,
    )
    check_engine_device(engine, comm)
    access = ZeroAccess(engine, cfg.resources.zero_stage)
    editor.access = access
    extra = objective.extra_parameters()

    summary = None
    if cfg.resources.zero_stage == 3 and hasattr(objective, "dual"):
        # phi_e is partitioned outside forward: lambda reads a gathered summary whose gradient is added by hand
        summary = GatheredSummary(params)
        objective.dual.summary_fn = summary

    def factory(ps: Sequence[torch.nn.Parameter]) -> DeepSpeedStepper:
        _reset_optimizer_state(engine)
        return DeepSpeedStepper(engine, extra, summary.add_gradient if summary is not None else None)

    editor.stepper_factory = factory
    return engine
