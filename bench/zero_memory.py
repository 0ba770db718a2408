"""What ZeRO-3 saves per worker: peak memory of 2 gloo workers editing a >= 1B-parameter LLaVA, ZeRO-3 vs ZeRO-0.

    python -m bench.zero_memory [--quick]      # writes bench/results/zero_memory.json

Model: a random-weight LLaVA whose language model has LLaVA-1.5-7B's widths (hidden 4096, 32 heads, FFN 11008,
vocabulary 32000) and `--layers` decoder layers (full run: 4, 1.07 B parameters, 4.3 GB in fp32; `--quick`: 1,
0.46 B), with a tiny CLIP tower; built once by code, saved with `save_pretrained` under `.cache/bench/zero_memory/`.
The weights are random: only memory and agreement are measured, not edit quality.

The same stream (FT on the last layer's `down_proj` + ODEdit, sequential steps of 2 edits on a synthetic
E-VQA split, fp32) runs twice through the real engine path (`pipeline.train.engine.run_stream`: Ray Train, 2
gloo workers): `resources.zero_stage=0` (a replicated model, phi_e's gradients all-reduced) and
`resources.zero_stage=3` (weights loaded already partitioned, `pipeline.train.zero_loading`). Both run every
step in full on every worker (`pipeline.train.distributed.runs_lockstep`: ODEdit's objective reads the step's
edits together), so both take the step one worker would. The preparation (shards, references) and both streams
share one local Ray instance; the seconds of each part are in the details (`seconds`). Each worker
samples its own memory from its start to the end of its stream (`pipeline.train.memory`,
`$ODEDIT_MEMORY_SAMPLE_S`: every 50 ms, or less often where a read takes longer, so the probe never takes more
than 10% of a core; the gaps are in the details, `mean_gap_s`), as PSS from `/proc/<pid>/smaps_rollup`: a
page shared by k processes counts 1/k in each, so the pages of the memory-mapped weights file both workers read
while loading are not counted twice. The peak RSS is the kernel's high-water mark (`VmHWM`, exact).

Figures (targets from issue 16 item 5):
* `param_memory_ratio_z3_z0` (<= 0.6): peak PSS of the worker with the highest one, ZeRO-3 / ZeRO-0, each
  minus that worker's PSS when the probe started (before the model is loaded: the Python, torch and Ray
  Train process every worker is anyway), so the ratio is that of what parameters, loading and the editor's
  state cost. The raw peaks and their ratio are in the details (`peak_ratio_z3_z0_raw`);
* `edit_max_abs_diff_z3_z0` (<= 1e-4): the largest absolute difference between the edited weights the two
  streams leave (their last checkpoints);
* `s_per_edit_z3` / `s_per_edit_z0` (reported): editing seconds per edit (the steps' `edit_seconds`).

Also reported, because on ONE machine PSS does not see what ZeRO-3 saves on GPUs or across nodes:
transformers 5 keeps the weights of an ordinary load memory-mapped (copy-on-write), so the ZeRO-0 workers of
one host share one copy of the frozen weights through the page cache, and each is charged 1/N of it by PSS,
which is already what a ZeRO-3 partition costs. `param_memory_ratio_z3_z0_rss` is the same figure by RSS
(each worker charged for every page it maps: what it would need alone on its own node, or on its own GPU,
whose memory no process shares), and `held_share_ratio_z3_z0` the share of the model's parameter elements a
worker holds after loading (`workers/rank-<r>.load.json`). docs/benchmarks.md itemises both stages' memory by
phase and says why `param_memory_ratio_z3_z0 <= 0.6` is out of reach by PSS on one host (ZeRO-0's shared half of
the file already costs what a partition does; a ZeRO-3 worker adds DeepSpeed's partitions of phi_e and the
largest gathered matrix, twice over with gloo's staging buffer).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from typing import Any

from bench.common import write_result

TARGETS = {"param_memory_ratio_z3_z0": "<= 0.6", "edit_max_abs_diff_z3_z0": "<= 1e-4"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, ".cache", "bench", "zero_memory")
# LLaVA-1.5-7B's language model (Vicuna-7B): widths as in llava-hf/llava-1.5-7b-hf's config.json
WIDTHS = {"hidden": 4096, "heads": 32, "ffn": 11008, "vocab": 32000}
SAMPLE_S = 0.05
STREAM = [
    "method.name=ft",
    "method.lr=0.01",
    "odedit.enabled=true",
    "stream.mode=sequential",
    "stream.batch_size=2",
    "stream.eval_every=0",
    "stream.generation_eval=false",
    "stream.pre_eval=false",  # the figures need no pre-edit scores; skipping them saves a pass over the model
    "resources.num_workers=2",
    "resources.cpus_per_worker=0.5",  # a whole CPU stays free: Ray Data's ListFiles task takes 1 (0.75 hung)
    "resources.precision=fp32",
    "tracking.enabled=false",
]


def lm_parameters(layers: int, hidden: int = 4096, ffn: int = 11008, vocab: int = 32000) -> int:
    """Parameters of a LLaMA language model (untied embeddings and head, no biases): per layer 4 h^2 attention +
    3 h f FFN + 2 h norms, plus 2 v h embeddings/head and the final norm."""
    return layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + 2 * vocab * hidden + hidden


def layers_for(min_params: int, **widths: int) -> int:
    """The fewest decoder layers for which `lm_parameters` reaches `min_params`."""
    layers = 1
    while lm_parameters(layers, **widths) < min_params:
        layers += 1
    return layers


def build_model(out_dir: str, layers: int, seed: int = 0) -> str:
    """A random-weight LLaVA with LLaVA-1.5-7B's language-model widths and `layers` decoder layers, saved with
    save_pretrained (safetensors) with the project's offline word tokenizer; reused when already there."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer  # deferred: transformers, for --help

    tok = build_word_tokenizer(DEFAULT_CORPUS, extra_specials=("<image>",), named_specials={"image_token": "<image>"})
    torch.manual_seed(seed)
    image_size, patch = 32, 8
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    tc = LlamaConfig(
        hidden_size=WIDTHS["hidden"],
        intermediate_size=WIDTHS["ffn"],
        num_hidden_layers=layers,
        num_attention_heads=WIDTHS["heads"],
        num_key_value_heads=WIDTHS["heads"],
        vocab_size=max(WIDTHS["vocab"], len(tok)),
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
        pad_token_id=tok.pad_token_id,
    )
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(tmp)
    del model
    gc.collect()
    tok.save_pretrained(tmp)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    ).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def _setup(layers: int, edits: int, n_iter: int) -> tuple[Any, str]:
    """(config, model path) of the stream, data prepared (shards, quarantine, references)."""
    # deferred: torch, Ray and the engine load only when the benchmark runs, not for --help
    from bench.synthetic import prepared_evqa_stream

    model = build_model(os.path.join(BASE, f"llava_l{layers}"), layers)
    steps = -(-edits // 2)
    cfg, model_path = prepared_evqa_stream(
        os.path.join(BASE, f"world{edits}"),
        model,
        os.path.join(BASE, f"out_l{layers}_e{edits}"),
        edits,
        [f"method.n_iter={n_iter}", f"stream.checkpoint_every={steps}", *STREAM],
    )
    return cfg, model_path


def _stream(cfg: Any, model_path: str, stage: int) -> dict[str, Any]:
    """One stream at ZeRO `stage`: the workers' memory reports, edit seconds per edit, the final edited weights."""
    import pyarrow.parquet as pq

    # deferred: torch, Ray and the engine load only when the benchmark runs, not for --help
    from odedit.loading import with_overrides
    from pipeline.reporting.tracking import NullTracker
    from pipeline.storage.jsonio import read_json
    from pipeline.train.checkpoints import RunStore, load_state
    from pipeline.train.engine import run_stream, storage_dir
    from pipeline.train.memory import worker_file

    name = f"z{stage}-{os.getpid()}"
    run_cfg = with_overrides(cfg, [f"resources.zero_stage={stage}", f"stream.run_name={name}"])
    summary = run_stream(run_cfg, model_path, NullTracker(), name, progress=False)
    run_dir = os.path.join(storage_dir(run_cfg), name)
    workers = [
        {**read_json(worker_file(run_dir, r, "memory")), "load": read_json(worker_file(run_dir, r, "load"))}
        for r in range(2)
    ]
    rows = pq.read_table(os.path.join(run_dir, "results", "rows.parquet")).to_pylist()
    steps: dict[int, float] = {}
    for row in rows:
        steps.setdefault(row["step"], row["edit_seconds"])
    weights = load_state(RunStore(run_dir).latest(), "editable")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "workers": workers,
        "s_per_edit": sum(steps.values()) / max(1, len(rows)),
        "edits": len(rows),
        "rel": summary.get("rel"),
        "weights": weights,
    }


def param_memory(workers: list[dict[str, Any]], kind: str = "pss") -> float:
    """The largest peak PSS (or RSS) over the workers, less that worker's PSS (RSS) before loading (MiB)."""
    return max(w[f"peak_{kind}_mb"] - w[f"start_{kind}_mb"] for w in workers)


def held_share(workers: list[dict[str, Any]]) -> float:
    """The largest share of the model's parameter elements a worker held after loading."""
    return max(w["load"]["local_numel"] / w["load"]["total_numel"] for w in workers)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over the tensors of two nested states with the same structure."""
    import torch

    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"edited states differ in keys: {sorted(a)} vs {sorted(b)}")
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((max_abs_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 decoder layer (0.46 B parameters), 2 edits")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (default: 1 quick, 4 full: >= 1 B)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["ODEDIT_MEMORY_SAMPLE_S"] = str(SAMPLE_S)  # read by each worker (pipeline.train.memory)
    layers = args.layers or (1 if args.quick else layers_for(10**9, **_widths()))
    edits, n_iter = (2, 2) if args.quick else (4, 3)
    # deferred: Ray is heavy, and --help needs none of it
    from pipeline.cluster.session import ray_session

    t0 = time.perf_counter()
    runs, seconds = {}, {}
    # One Ray instance for the preparation (Ray Data: shards, references) and both streams: the preparation
    # joins it instead of starting and stopping one of its own.
    with ray_session(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False):
        cfg, model_path = _setup(layers, edits, n_iter)
        seconds["setup"] = time.perf_counter() - t0
        for stage in (0, 3):
            t = time.perf_counter()
            runs[stage] = _stream(cfg, model_path, stage)
            seconds[f"stream_z{stage}"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    z0, z3 = runs[0], runs[3]
    figures = {
        "param_memory_ratio_z3_z0": param_memory(z3["workers"]) / param_memory(z0["workers"]),
        "edit_max_abs_diff_z3_z0": max_abs_diff(z3["weights"], z0["weights"]),
        "param_memory_ratio_z3_z0_rss": param_memory(z3["workers"], "rss") / param_memory(z0["workers"], "rss"),
        "held_share_ratio_z3_z0": held_share(z3["workers"]) / held_share(z0["workers"]),
        "s_per_edit_z3": z3["s_per_edit"],
        "s_per_edit_z0": z0["s_per_edit"],
        "peak_pss_mb_z3": max(w["peak_pss_mb"] for w in z3["workers"]),
        "peak_pss_mb_z0": max(w["peak_pss_mb"] for w in z0["workers"]),
    }
    details = {
        "layers": layers,
        "parameters": lm_parameters(layers, **_widths()),
        "edits": edits,
        "n_iter": n_iter,
        "sample_s": SAMPLE_S,
        "peak_ratio_z3_z0_raw": figures["peak_pss_mb_z3"] / figures["peak_pss_mb_z0"],
        "param_memory_mb_z3": param_memory(z3["workers"]),
        "param_memory_mb_z0": param_memory(z0["workers"]),
        "workers_z0": z0["workers"],
        "workers_z3": z3["workers"],
        "rel_z0": z0["rel"],
        "rel_z3": z3["rel"],
        "weights": "random (no edit quality is measured)",
        "seconds": seconds,
    }
    return write_result("zero_memory", args.quick, figures, TARGETS, details)


def _widths() -> dict[str, int]:
    return {"hidden": WIDTHS["hidden"], "ffn": WIDTHS["ffn"], "vocab": WIDTHS["vocab"]}


if __name__ == "__main__":
    main(sys.argv[1:])
