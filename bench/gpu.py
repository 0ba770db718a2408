"""A GPU check of the real engine path on LLaVA-1.5-7B's full shape (issue 16 item 6). Not a test, never in CI.

    python -m bench.gpu [--quick]     # only where a CUDA GPU is; elsewhere it says so, exits 0 and writes nothing

Model: a random-weight `LlavaForConditionalGeneration` with LLaVA-1.5-7B's shape (CLIP ViT-L/14 at 336 px, the
2-layer GELU projector, Vicuna-7B: hidden 4096, 32 heads, FFN 11008, 32 layers, vocabulary 32000; 7.06 B
parameters), built directly on the GPU in the training dtype (seconds, no CPU copy), saved once with
`save_pretrained` under `.cache/bench/gpu/` (about 14 GB in bf16) with the project's offline word tokenizer.
`--quick` keeps the widths and uses 4 decoder layers. The weights are random: only time and memory are
measured, never edit quality.

Streams, each through `pipeline.train.engine.run_stream` (Ray Train, NCCL, `resources.zero_stage=3`,
world size = the GPUs, `resources.precision` bf16 where the GPU has it, else fp16 with DeepSpeed's loss scaling),
FT on layer 31's `down_proj` (the last layer of `--quick`'s 4), sequential mode:
* `ft_b1`: FT, one edit per step (single edits through the sequential engine; stream.mode=single has no ZeRO-3);
* `odedit_b1`: FT + ODEdit, one edit per step;
* `ft_b16`: FT, one lifelong step of 16 edits.
Figures: seconds per edit of each, `odedit_time_ratio` (ODEdit vs host), `edits_per_s_ratio_b16_b1`, peak GPU
memory per worker (`torch.cuda.max_memory_allocated`, written by each worker, `pipeline.train.memory`) and
`odedit_memory_ratio`; the GPU's name and count go in the details. Copy the printed table into
docs/benchmarks.md marked with the GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from bench.common import write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, ".cache", "bench", "gpu")
TARGETS = {"odedit_time_ratio": "<= 2.0", "odedit_memory_ratio": "<= 1.5", "edits_per_s_ratio_b16_b1": ">= 4.0"}
# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14-336 (vision_feature_layer -2) and Vicuna-7B
VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
TEXT = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
EDITS = {"ft_b1": 8, "odedit_b1": 8, "ft_b16": 16}
STREAMS = {
    "ft_b1": ["odedit.enabled=false", "stream.batch_size=1"],
    "odedit_b1": ["odedit.enabled=true", "stream.batch_size=1"],
    "ft_b16": ["odedit.enabled=false", "stream.batch_size=16"],
}


def llava_7b_config(layers: int, tokenizer: Any | None = None) -> Any:
    """LLaVA-1.5-7B's `LlavaConfig` with `layers` decoder layers (32 = the full model); special-token ids from
    `tokenizer` where given (the vocabulary stays 32,000 rows)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    ids: dict[str, int] = {}
    if tokenizer is not None:
        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    text = LlamaConfig(**{**TEXT, "num_hidden_layers": layers}, tie_word_embeddings=False, **ids)
    image_token = tokenizer.convert_tokens_to_ids("<image>") if tokenizer is not None else 32000 - 1
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text,
        image_token_index=image_token,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2,
        pad_token_id=ids.get("pad_token_id"),
    )


def build_on_gpu(out_dir: str, layers: int, dtype: Any, seed: int = 0) -> str:
    """Build the random-weight model directly on cuda:0 in `dtype`, save it with save_pretrained; reuse it."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer  # deferred: transformers, for --help

    tok = build_word_tokenizer(DEFAULT_CORPUS, extra_specials=("<image>",), named_specials={"image_token": "<image>"})
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(llava_7b_config(layers, tok))
    finally:
        torch.set_default_dtype(previous)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    tok.save_pretrained(tmp)
    size = VISION["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_convert_rgb=True
    ).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def _stream(cfg: Any, model_path: str, name: str, overrides: list[str], gpus: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    # deferred: Ray and the engine load only when a GPU is there
    from odedit.loading import with_overrides
    from pipeline.reporting.tracking import NullTracker
    from pipeline.storage.jsonio import read_json
    from pipeline.train.engine import run_stream, storage_dir
    from pipeline.train.memory import worker_file

    run_name = f"{name}-{os.getpid()}"
    run_cfg = with_overrides(cfg, [*overrides, f"stream.num_edits={EDITS[name]}", f"stream.run_name={run_name}"])
    run_stream(run_cfg, model_path, NullTracker(), run_name, progress=False)
    run_dir = os.path.join(storage_dir(run_cfg), run_name)
    workers = [read_json(worker_file(run_dir, r, "memory")) for r in range(gpus)]
    rows = pq.read_table(os.path.join(run_dir, "results", "rows.parquet")).to_pylist()
    per_step: dict[int, float] = {}
    for row in rows:
        per_step.setdefault(row["step"], row["edit_seconds"])
    steps = sorted(per_step)
    timed = steps[1:] or steps  # the first step pays CUDA/NCCL warm-up
    edits_timed = sum(1 for row in rows if row["step"] in timed)
    return {
        "s_per_edit": sum(per_step[s] for s in timed) / max(1, edits_timed),
        "peak_gpu_mb": max(w.get("peak_gpu_mb", 0.0) for w in workers),
        "gpu_name": workers[0].get("gpu_name", "unknown"),
        "edits": len(rows),
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 decoder layers instead of 32")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "bench.gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing measured, "
            "bench/results/gpu.json not written. Run it on a GPU node: python -m bench.gpu"
        )
        return None
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":  # `make` exports cpu for the CPU suite
        os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ["ODEDIT_MEMORY_SAMPLE_S"] = "0.5"  # each worker writes its peak GPU memory (pipeline.train.memory)
    gpus = torch.cuda.device_count()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    layers = 4 if args.quick else TEXT["num_hidden_layers"]

    # deferred: Ray, the engine and the synthetic data only when a GPU is there
    from bench.synthetic import prepared_evqa_stream
    from pipeline.cluster.session import ray_session

    model = build_on_gpu(os.path.join(BASE, f"llava7b_l{layers}_{str(dtype).split('.')[-1]}"), layers, dtype)
    cfg, model_path = prepared_evqa_stream(
        os.path.join(BASE, "world"),
        model,
        os.path.join(BASE, "out"),
        max(EDITS.values()),
        [
            "method.name=ft",
            f"method.layers=[{layers - 1}]",
            "method.modules=[ffn_out]",
            "method.n_iter=10",
            "stream.mode=sequential",
            "stream.eval_every=0",
            "stream.generation_eval=false",
            "resources.use_gpu=true",
            f"resources.num_workers={gpus}",
            "resources.zero_stage=3",
            f"resources.precision={'bf16' if dtype == torch.bfloat16 else 'fp16'}",
            "tracking.enabled=false",
        ],
        min_side=224,
        max_side=448,
    )
    runs = {}
    with ray_session(address="local", num_gpus=gpus, include_dashboard=False, log_to_driver=False):
        for name, overrides in STREAMS.items():
            runs[name] = _stream(cfg, model_path, name, overrides, gpus)
    ft, od, b16 = runs["ft_b1"], runs["odedit_b1"], runs["ft_b16"]
    figures = {
        "s_per_edit_ft": ft["s_per_edit"],
        "s_per_edit_odedit": od["s_per_edit"],
        "s_per_edit_ft_b16": b16["s_per_edit"],
        "odedit_time_ratio": od["s_per_edit"] / ft["s_per_edit"],
        "edits_per_s_ratio_b16_b1": ft["s_per_edit"] / b16["s_per_edit"],
        "peak_gpu_mb_ft": ft["peak_gpu_mb"],
        "peak_gpu_mb_odedit": od["peak_gpu_mb"],
        "peak_gpu_mb_ft_b16": b16["peak_gpu_mb"],
        "odedit_memory_ratio": od["peak_gpu_mb"] / ft["peak_gpu_mb"],
    }
    details = {
        "gpu": ft["gpu_name"],
        "gpus": gpus,
        "dtype": str(dtype),
        "layers": layers,
        "parameters": _parameters(layers),
        "edits": {k: v["edits"] for k, v in runs.items()},
        "weights": "random (no edit quality is measured)",
    }
    return write_result("gpu", args.quick, figures, TARGETS, details)


def _parameters(layers: int) -> int:
    """Parameters of the model, counted on the meta device (no memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_7b_config(layers))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main(sys.argv[1:])
