"""The demo MLLM, trained once and cached: `ensure_demo_model(cfg) -> (model dir, report)`.

    from odedit.loading import load_config
    from pipeline.demo.model import ensure_demo_model, load_demo_adapter
    path, report = ensure_demo_model(load_config(None))   # trains on the first call (~7 min on 2 cores)
    adapter = load_demo_adapter(path)                       # or model.name_or_path=<path> with
                                                            # model.prompt_template=DEMO_PROMPT_TEMPLATE

A real `LlavaForConditionalGeneration` in a tiny configuration (`pipeline.demo.train.MODEL_SIZES`), trained on
the easy-vqa training images with `pipeline.demo.train`'s recipe, saved with `save_pretrained` (model,
tokenizer, image processor) and measured with `pipeline.demo.evaluate`. It lives in
`.cache/demo_model/<key>/`, where the key hashes everything the weights depend on: model sizes, recipe,
training budget and image count, the seed, the prompt template and the code versions. The directory is
published only when complete (`pipeline.storage.cache`): `report.json` plus a marker written last, so a run killed
mid-training leaves nothing that a later call would trust; that call trains again.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from odedit.models.llava import LlavaAdapter
from pipeline.demo.evaluate import evaluate_demo_model
from pipeline.demo.train import MODEL_SIZES, DemoData, Recipe, new_demo_adapter, train_demo
from pipeline.demo.world import DEMO_PROMPT_TEMPLATE, WORLD_VERSION
from pipeline.storage.cache import cache_dir, content_key, ensure_dir
from pipeline.storage.jsonio import write_json

# Bump when training or evaluation code changes in a way that changes the saved model or its report.
DEMO_MODEL_VERSION = "1"
REPORT_FILE = "report.json"


def demo_model_key(cfg: Any, eval_limit: int = 0) -> str:
    """Cache key of the demo model for config `cfg` (only the fields the model and its report depend on)."""
    demo = cfg.data.demo
    return content_key(
        {
            "eval_limit": eval_limit,
            "sizes": MODEL_SIZES,
            "recipe": asdict(Recipe()),
            "train_minutes": demo.train_minutes,
            "pretrain_minutes": demo.pretrain_minutes,
            "train_images": demo.train_images,
            "train_steps": demo.train_steps,
            "pretrain_steps": demo.pretrain_steps,
            "seed": cfg.seed,
            "template": DEMO_PROMPT_TEMPLATE,
            "world_version": WORLD_VERSION,
            "model_version": DEMO_MODEL_VERSION,
        }
    )


def load_demo_adapter(path: str | os.PathLike, **kwargs: Any) -> LlavaAdapter:
    """Load a demo model directory through the adapter, with the template it was trained with."""
    kwargs.setdefault("template", DEMO_PROMPT_TEMPLATE)
    return LlavaAdapter.from_pretrained(str(path), **kwargs)


def train_demo_model(
    cfg: Any,
    out_dir: str | os.PathLike,
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
    eval_limit: int = 0,
) -> dict:
    """Train, save to `out_dir` and measure the demo model; returns the report (also in `report.json`)."""
    demo = cfg.data.demo
    out = Path(out_dir)
    init_dir = out / "init"
    t0 = time.perf_counter()
    adapter = new_demo_adapter(init_dir, cfg.seed)
    data = DemoData.build(adapter, demo.train_images, cfg.seed)
    prepare_seconds = time.perf_counter() - t0
    stats = train_demo(
        adapter,
        data,
        budget_s=demo.train_minutes * 60,
        pretrain_s=demo.pretrain_minutes * 60,
        seed=cfg.seed,
        progress=progress,
        max_steps=demo.train_steps,
        max_pretrain_steps=demo.pretrain_steps,
    )
    adapter.save_pretrained(out)
    shutil.rmtree(init_dir)
    loaded = load_demo_adapter(out)  # measure what was saved, as every user will load it
    t1 = time.perf_counter()
    report = evaluate_demo_model(loaded, cfg.seed, cache_root, limit=eval_limit)
    report.update(
        {
            "train_seconds": stats.train_seconds,
            "pretrain_seconds": stats.pretrain_seconds,
            "prepare_seconds": prepare_seconds,
            "eval_seconds": time.perf_counter() - t1,
            "pretrain_steps": stats.pretrain_steps,
            "joint_steps": stats.joint_steps,
            "final_loss": stats.final_loss,
            "final_aux_loss": stats.final_aux_loss,
            "aux_label_coverage": stats.aux_label_coverage,
            "train_questions": len(data.items),
            "train_images": int(data.pixels.shape[0]),
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "vocab_size": len(loaded.tokenizer),
            "prompt_template": DEMO_PROMPT_TEMPLATE,
            "seed": cfg.seed,
            "cpu_threads": _threads(),
            "load_average": _load(),
        }
    )
    write_json(out / REPORT_FILE, report, indent=1)
    return report


def ensure_demo_model(
    cfg: Any, cache_root: str | os.PathLike | None = None, progress: bool = True, eval_limit: int = 0
) -> tuple[str, dict]:
    """(directory, report) of the demo model for `cfg`: trained on the first call, reused afterwards.

    Args:
        cfg: the whole `odedit.config.Config` (uses `cfg.data.demo` and `cfg.seed`).
        cache_root: cache root (default `<repo>/.cache`, or `$ODEDIT_CACHE_DIR`).
        progress: show a tqdm progress bar while training.
        eval_limit: measure on a seeded sample of this many test questions (0 = the whole test set); part
            of the cache key, since the report differs.
    """
    path = cache_dir("demo_model", demo_model_key(cfg, eval_limit), cache_root)
    path, report, _ = ensure_dir(path, lambda tmp: train_demo_model(cfg, tmp, cache_root, progress, eval_limit))
    return str(path), report


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
