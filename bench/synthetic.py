"""A synthetic split in EasyEdit's exact E-VQA layout, with real PNG files: for benchmarks and tests.

    paths = write_evqa_split(".cache/bench/evqa-400", n=400, min_side=64, max_side=320, seed=0)
    # paths["path"]: editing-data/vqa/vqa_eval.json, paths["image_root"]: images/

The layout copies MMEdit's release (EasyEdit's `coco_image` root holding `val2014/` and
`val2014_image_rephrase/`): every record has all of EasyEdit's fields (src, pred, alt, rephrase, image,
image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a) and three images of its own (edit, rephrase,
multimodal locality), each a noisy background with a coloured square, of a seeded random size. Noise keeps
the PNGs photo-like (poorly compressible), so decoding and re-encoding them is real work.
"""

from __future__ import annotations

import json
import os
from typing import Any

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    # every colour name is a word the tiny test models' tokenizer knows (odedit.models.tokenizer.DEFAULT_CORPUS):
    # a target it does not know is quarantined as target_unknown_tokens (issue 19 item 18)
    "teal": (20, 150, 150),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 80, 30),
}


def write_png(path: str, side_w: int, side_h: int, colour: tuple[int, int, int], seed: int) -> None:
    """A noisy w x h RGB PNG with a coloured square in the middle."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (side_h, side_w, 3), dtype=np.uint8)
    a[side_h // 4 : 3 * side_h // 4, side_w // 4 : 3 * side_w // 4] = colour
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")


def evqa_record(i: int, colours: list[str], edit_rel: str, rephrase_rel: str, loc_rel: str) -> dict[str, Any]:
    """Record `i` with EasyEdit's field names (the pred is the true colour, alt the counterfactual one)."""
    true, new, other = colours[i % len(colours)], colours[(i + 3) % len(colours)], colours[(i + 5) % len(colours)]
    return {
        "src": f"What color is the square in picture {i}?",
        "pred": true,
        "rephrase": f"Which colour does the square in picture {i} have?",
        "alt": new,
        "image": edit_rel,
        "image_rephrase": rephrase_rel,
        "loc": f"nq question: what is fact number {i}",
        "loc_ans": f"fact {i}",
        "m_loc": loc_rel,
        "m_loc_q": "What color is the square?",
        "m_loc_a": other,
    }


def write_evqa_split(
    out_dir: str, n: int, min_side: int = 64, max_side: int = 320, seed: int = 0, file_name: str = "vqa_eval.json"
) -> dict[str, str]:
    """Write `n` records and their 3n images under `out_dir`; return the paths a config needs.

    Returns:
        {"path": records JSON, "image_root": root of `image` and `m_loc`, "rephrase_image_root": root of
        `image_rephrase`} (the two roots are the same directory, as in MMEdit's release).
    """
    import random

    rng = random.Random(seed)
    names = sorted(COLOURS)
    root = os.path.join(out_dir, "images")
    records = []
    for i in range(n):
        rels = (
            f"val2014/COCO_val2014_{i:012d}.png",
            f"val2014_image_rephrase/COCO_val2014_{i:012d}.png",
            f"val2014/COCO_val2014_{100000 + i:012d}.png",
        )
        record = evqa_record(i, names, *rels)
        colours = (record["pred"], record["pred"], record["m_loc_a"])
        for j, (rel, colour) in enumerate(zip(rels, colours)):
            w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
            write_png(os.path.join(root, rel), w, h, COLOURS[colour], seed * 1_000_003 + 3 * i + j)
        records.append(record)
    path = os.path.join(out_dir, "editing-data", "vqa", file_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1)
    return {"path": path, "image_root": root, "rephrase_image_root": root}


def prepared_evqa_stream(
    world_dir: str,
    model: str,
    output_dir: str,
    n: int,
    overrides: list[str],
    min_side: int = 32,
    max_side: int = 64,
) -> tuple[Any, str]:
    """(config, model path) of a benchmark stream of the LLaVA at `model` over an `n`-record synthetic E-VQA split
    written under `world_dir`, with `overrides`; its data prepared (shards, quarantine, references)."""
    # deferred: torch, Ray and the engine load only when a benchmark runs, not for its --help
    from odedit.loading import load_config
    from pipeline.experiment import prepared

    paths = write_evqa_split(world_dir, n=n, min_side=min_side, max_side=max_side, seed=1)
    cfg = load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={paths['path']}",
            f"data.image_root={paths['image_root']}",
            "model.family=llava",
            f"model.name_or_path={model}",
            f"output_dir={output_dir}",
            f"stream.num_edits={n}",
            *overrides,
        ],
    )
    cfg, model_path, _ = prepared(cfg)
    return cfg, model_path
