"""Reading the published MiniGPT-4 weights: LAVIS/MiniGPT-4 key names <-> `MiniGPT4ForConditionalGeneration` names.

MiniGPT-4 ships `pretrained_minigpt4.pth` = {"model": {"llama_proj.weight", "llama_proj.bias"}} and runs it on top
of BLIP-2's LAVIS weights (EVA ViT-g `visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens`) and a
Vicuna LM (`llama_model.*`, or a transformers directory). The renames follow the ones transformers used to convert
BLIP-2 from LAVIS (`convert_blip_2_original_to_pytorch.py`): e.g. `visual_encoder.blocks.{i}.norm1` ->
`vision_model.encoder.layers.{i}.layer_norm1`, `attn.proj` -> `self_attn.projection`, `ln_vision` ->
`vision_model.post_layernorm`, `Qformer.bert.*.attention.self` -> `qformer.*.attention.attention`. EVA keeps
separate `q_bias` / `v_bias` (no key bias); the fused `self_attn.qkv.bias` is cat(q_bias, 0, v_bias).

Keys BLIP-2 checkpoints carry but MiniGPT-4 drops (the Q-Former's text half, the BLIP-2 LM projections and heads)
are skipped by name; any other key is an error, so a checkpoint of another model never loads silently.
Files are read with `torch.load(weights_only=True)` or safetensors: no arbitrary object is unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence

import torch

from odedit.models.base import ModelLoadError

_SLOTS = {
    "n": r"\d+",
    "p": r"weight|bias",
    "norm": r"1|2",
    "fc": r"fc1|fc2",
    "att": r"attention|crossattention",
    "qkv": r"query|key|value",
    "sub": r"dense|LayerNorm",
    "ffn": r"intermediate_query|output_query",
    "rest": r".+",
}

# (LAVIS / MiniGPT-4 name, our name); `{slot}` matches `_SLOTS[slot]` and carries over.
RENAMES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("visual_encoder.blocks.{n}.norm{norm}.{p}", "vision_model.encoder.layers.{n}.layer_norm{norm}.{p}"),
    ("visual_encoder.blocks.{n}.attn.qkv.weight", "vision_model.encoder.layers.{n}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{n}.attn.proj.{p}", "vision_model.encoder.layers.{n}.self_attn.projection.{p}"),
    ("visual_encoder.blocks.{n}.mlp.{fc}.{p}", "vision_model.encoder.layers.{n}.mlp.{fc}.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    ("Qformer.bert.encoder.layer.{n}.{att}.self.{qkv}.{p}", "qformer.encoder.layer.{n}.{att}.attention.{qkv}.{p}"),
    ("Qformer.bert.encoder.layer.{n}.{att}.output.{sub}.{p}", "qformer.encoder.layer.{n}.{att}.output.{sub}.{p}"),
    ("Qformer.bert.encoder.layer.{n}.{ffn}.{sub}.{p}", "qformer.encoder.layer.{n}.{ffn}.{sub}.{p}"),
    ("llama_proj.{p}", "llama_proj.{p}"),
    ("llama_model.{rest}", "language_model.{rest}"),
)

# EVA attention biases: two LAVIS tensors <-> one fused bias of ours.
_Q_BIAS, _V_BIAS = "visual_encoder.blocks.{n}.attn.q_bias", "visual_encoder.blocks.{n}.attn.v_bias"
_QKV_BIAS = "vision_model.encoder.layers.{n}.self_attn.qkv.bias"

# In LAVIS BLIP-2 checkpoints but removed by MiniGPT-4 (`Qformer.cls = None`, word/position embeddings and the
# text FFN set to None) or belonging to BLIP-2's own LM, projections and pre-training heads.
IGNORED: tuple[str, ...] = (
    r"Qformer\.cls\..+",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..+",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
    r"(t5_proj|opt_proj|vision_proj|text_proj|itm_head)\..+",
    r"(t5_model|opt_model)\..+",
    r"temp",
)


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})" for i, p in enumerate(parts))
    return re.compile(regex)


_FORWARD = tuple((_compile(src), dst) for src, dst in RENAMES)
_INVERSE = tuple((_compile(dst), src) for src, dst in RENAMES)
_IGNORED = tuple(re.compile(p) for p in IGNORED)


def _rename(key: str, table: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


def lavis_to_hf(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename a LAVIS/MiniGPT-4 state dict to our names.

    Returns:
        (renamed state, keys skipped as known-unused, keys with no known name).
    """
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    unknown: list[str] = []
    biases: dict[str, dict[str, torch.Tensor]] = {}
    q_pat, v_pat = _compile(_Q_BIAS), _compile(_V_BIAS)
    for key, value in state.items():
        new = _rename(key, _FORWARD)
        if new is not None:
            out[new] = value
            continue
        bias = q_pat.fullmatch(key) or v_pat.fullmatch(key)
        if bias:
            biases.setdefault(bias["n"], {})["q" if key.endswith("q_bias") else "v"] = value
        elif any(p.fullmatch(key) for p in _IGNORED):
            skipped.append(key)
        else:
            unknown.append(key)
    for n, qv in biases.items():
        if set(qv) != {"q", "v"}:
            unknown.append(_Q_BIAS.format(n=n) if "q" in qv else _V_BIAS.format(n=n))
            continue
        out[_QKV_BIAS.format(n=n)] = torch.cat([qv["q"], torch.zeros_like(qv["v"]), qv["v"]])
    return out, skipped, unknown


def hf_to_lavis(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in LAVIS/MiniGPT-4 names (the inverse of `lavis_to_hf`; the LM goes to `llama_model.*`).

    The key third of a fused qkv bias is dropped, as EVA has none (softmax ignores a key bias anyway).

    Raises:
        ValueError: on a key with no LAVIS name.
    """
    out: dict[str, torch.Tensor] = {}
    qkv_pat = _compile(_QKV_BIAS)
    for key, value in state.items():
        new = _rename(key, _INVERSE)
        if new is not None:
            out[new] = value
            continue
        fused = qkv_pat.fullmatch(key)
        if fused is None:
            raise ValueError(f"state dict key {key!r} has no LAVIS/MiniGPT-4 name; extend RENAMES for it")
        q, _, v = value.chunk(3)
        out[_Q_BIAS.format(n=fused["n"])] = q.clone()
        out[_V_BIAS.format(n=fused["n"])] = v.clone()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or `.pth` file; a training checkpoint's {"model": {...}} is unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"minigpt4 checkpoint: {path!r} is not a file; give the .pth/.safetensors weights")
    if path.endswith(".safetensors"):
        # deferred: safetensors only for .safetensors checkpoints
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except SafetensorError as exc:
            raise ModelLoadError(f"minigpt4 checkpoint: {path!r} is not a readable safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # refused or corrupt
            raise ModelLoadError(
                f"minigpt4 checkpoint: {path!r} cannot be read as a weights-only torch file "
                f"({type(exc).__name__}: {exc})"
            ) from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(
            f"minigpt4 checkpoint: {path!r} holds no state dict of tensors "
            "(expected {name: tensor} or {'model': {name: tensor}})"
        )
    return dict(state)


def _some(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _by_module(keys: Sequence[str], examples: int = 2) -> str:
    """Missing keys grouped by top-level module: `llama_proj (2: llama_proj.bias, llama_proj.weight)`."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    return "; ".join(f"{name} ({len(ks)}: {_some(ks, examples)})" for name, ks in groups.items())


def load_minigpt4_weights(
    model: torch.nn.Module, checkpoints: Sequence[str | os.PathLike], lm_loaded: bool = False
) -> None:
    """Load LAVIS/MiniGPT-4 checkpoints into a `MiniGPT4ForConditionalGeneration`, all weights or an error.

    Args:
        model: the model to fill in place.
        checkpoints: files merged in order (later files win on a shared key).
        lm_loaded: the language model is already loaded (from a transformers directory), so `language_model.*`
            weights need not come from the checkpoints.

    Raises:
        ModelLoadError: listing unknown keys, missing weights and shape mismatches together.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    merged: dict[str, torch.Tensor] = {}
    for path in checkpoints:
        merged.update(read_state_dict(path))
    state, _, unknown = lavis_to_hf(merged)
    own = model.state_dict()
    needed = {k for k in own if not (lm_loaded and k.startswith("language_model."))}
    missing = sorted(needed - set(state))
    extra = [k for k in state if k not in own]
    wrong = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys are not MiniGPT-4/LAVIS weights: {_some(unknown)}")
    if extra:
        problems.append(
            f"{len(extra)} weights have no place in a model of this MiniGPT4Config "
            f"(more layers in the checkpoint?): {_some(extra)}"
        )
    if missing:
        problems.append(f"{len(missing)} model weights are missing, by module: {_by_module(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} shapes differ from the MiniGPT4Config: {_some(wrong, 4)}")
    if problems:
        names = ", ".join(os.fspath(p) for p in checkpoints)
        raise ModelLoadError(
            f"minigpt4 checkpoint [{names}]: " + " | ".join(problems) + ". Give BLIP-2's LAVIS weights "
            "(visual_encoder.*, ln_vision.*, Qformer.bert.*, query_tokens), pretrained_minigpt4.pth (llama_proj.*) "
            "and the Vicuna LM (language_model=<dir> or llama_model.* keys), with a config of matching sizes"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
