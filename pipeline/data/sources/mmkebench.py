"""Reader of MMKE-Bench (ICLR 2025; github.com/mmke-bench-bigai/mmke-bench) records.

    data.source=mmkebench data.path=MMKE-Bench/entity/eval.json data.image_root=MMKE-Bench/images

MMKE-Bench's files are JSON lists read by a fork of EasyEdit's caption loader
(`easyeditor/dataset/coco_caption.py` in that repository), so the core keys are MMEdit's and map the same way:

    src -> prompt, alt -> target, pred, rephrase, image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a

(`image` and `m_loc` resolve against the edit-image root, `image_rephrase` against the rephrase root.)
Its own fields go to `extra` unchanged, by name, so evaluation code can use them later:

    knowledge_type            entity_level | visual_knowledge | user_specific
    one_hop_img               a second image of the entity (a path relative to the edit-image root; not loaded)
    image_rephrase_question   visual_knowledge: the question asked of `image_rephrase`
    rel_1, rel_ans_1 / rel_1_ans, rel_2, rel_ans_2 / rel_2_ans        text reliability (entity, user)
    m_rel_1, m_rel_ans_1 / m_rel_1_ans, m_rel_2, m_rel_ans_2 / ...    multimodal reliability (entity, user)
    rel, rel_ans, m_rel, m_rel_ans                                    visual_knowledge reliability
    port_new                  portability, converted as for VLKEB into extra["portability"]

Answers are free-form sentences, so long ones can exceed `data.max_text_chars` and be quarantined with that
reason; raise the limit to keep them. Ids: `mmkebench-vqa-<position>` when absent.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import RecordSource
from pipeline.data.sources.mmedit import read_easyedit_file
from pipeline.data.sources.vlkeb import count_skipped, portability_from_port_new

KNOWLEDGE_TYPES = ("entity_level", "visual_knowledge", "user_specific")


def _convert(raw: dict, extra: dict, problems: list[str]) -> None:
    kind = raw.get("knowledge_type")
    if kind is not None and kind not in KNOWLEDGE_TYPES:
        problems.append(f"knowledge_type: {kind!r} is not one of {', '.join(KNOWLEDGE_TYPES)}")
    portability_from_port_new(raw, extra, problems)


def read(cfg: Any) -> RecordSource:
    """MMKE-Bench records of `cfg.data.path` (see the module docstring)."""
    task = cfg.data.task if cfg.data.task != "auto" else "vqa"
    return count_skipped(read_easyedit_file(cfg, "mmkebench", task, convert_extra=_convert))


read.reads_before_ray = True  # a JSON file read on the driver: pipeline.prepare.preflight reads it first
SOURCES.register("mmkebench", read)
