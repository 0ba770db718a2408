"""Edit records: one fact to change, in a superset of EasyEdit's MMEdit schema (design.md §3, reference.md §1.3).

EasyEdit field -> ours: `src` -> `prompt`, `alt` -> `target`; `pred`, `rephrase`, `image`, `image_rephrase`,
`loc`, `loc_ans`, `m_loc`, `m_loc_q`, `m_loc_a` keep their names. Ours adds `id`, `task`, `source`, `split`,
OUT-hard probes (`hard_images`, `hard_answers`: the edit's own question asked of other images) and `extra`
(reader-specific data such as VLKEB portability questions).

`validate_record` returns *every* reason a raw record is bad (an empty list means good); `EditRecord.from_raw`
builds the typed record from a good one. Image paths are checked syntactically here (relative, no `..`);
whether the file exists and decodes is checked where images are read (`pipeline.data.images`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

TASKS = ("vqa", "caption")
SPLITS = ("test", "validation", "train")

# EasyEdit MMEdit names accepted as aliases of ours.
ALIASES = {"src": "prompt", "alt": "target"}

TEXT_FIELDS = ("prompt", "target", "pred", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
# Fields that come in pairs: both or neither.
PAIRS = (("loc", "loc_ans"), ("m_loc_q", "m_loc_a"), ("m_loc", "m_loc_q"))

DEFAULT_MAX_CHARS = 2000

# The fields each environment is built from (`odedit.envs.case_from_record`): an environment whose fields are
# absent is not built, so its metric (`odedit.metrics.METRIC_OF_ENV`) is not scored for that edit (issue 19 item 14).
ENV_FIELDS = {
    "in": ("prompt", "target"),
    "se_text": ("rephrase",),
    "se_image": ("image_rephrase",),
    "out_text": ("loc", "loc_ans"),
    "out_mm": ("m_loc", "m_loc_q", "m_loc_a"),
    "out_hard": ("hard_images", "hard_answers"),
}
# Environments every MMEdit headline metric but the [EXTENSION] M-Loc-hard needs (reference.md §1.4).
CORE_ENVS = ("in", "se_text", "se_image", "out_text", "out_mm")
# [INFERENCE] The fields that define an edit, for finding a record that repeats an earlier one (issue 19 item
# 13): everything an environment is built from, and the task. Not `id` (EasyEdit ids are made from positions),
# `pred` (the unedited model's answer, not part of the edit), `split`, `source` or `extra` (reader data that is
# not scored). Image fields compare by content where the pipeline can read it (`pipeline.data.duplicates`).
EDIT_FIELDS = ("task", "prompt", "target", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a", "hard_answers")


@dataclass(frozen=True)
class EditRecord:
    """One edit: change the answer to `prompt` (about `image`) into `target`."""

    id: str
    prompt: str
    target: str
    image: str | None = None
    pred: str | None = None
    rephrase: str | None = None
    image_rephrase: str | None = None
    loc: str | None = None
    loc_ans: str | None = None
    m_loc: str | None = None
    m_loc_q: str | None = None
    m_loc_a: str | None = None
    hard_images: tuple[str, ...] = ()
    hard_answers: tuple[str, ...] = ()
    task: str = "vqa"
    source: str = ""
    split: str = "test"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any], max_chars: int = DEFAULT_MAX_CHARS) -> EditRecord:
        """Build from a raw dict that `validate_record` accepted (aliases resolved, empty optionals -> None)."""
        reasons = validate_record(raw, max_chars)
        if reasons:
            raise ValueError(f"record {raw.get('id', '?')!r} is invalid: " + "; ".join(reasons))
        d = normalize(raw)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["id"] = str(d["id"])
        kwargs["hard_images"] = tuple(d.get("hard_images") or ())
        kwargs["hard_answers"] = tuple(d.get("hard_answers") or ())
        for k in TEXT_FIELDS + IMAGE_FIELDS:
            if k in kwargs and kwargs[k] == "":
                kwargs[k] = None
        kwargs["extra"] = dict(d.get("extra") or {})
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hard_images"] = list(self.hard_images)
        d["hard_answers"] = list(self.hard_answers)
        return d

    @property
    def has_text_locality(self) -> bool:
        return self.loc is not None

    @property
    def has_mm_locality(self) -> bool:
        return self.m_loc is not None and self.m_loc_q is not None


def normalize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve EasyEdit aliases (`src`, `alt`) to our names; ours win when both are present."""
    d = dict(raw)
    for alias, ours in ALIASES.items():
        if alias in d:
            value = d.pop(alias)
            d.setdefault(ours, value)
    return d


def check_relative_path(value: str) -> str | None:
    """Why an image path may not be used (absolute, escaping its root, empty), or None."""
    if not value.strip():
        return "is empty"
    if "\x00" in value:
        return "contains a NUL byte"
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("~"):
        return "is absolute; image paths must be relative to their image root"
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        return "contains '..' and could escape its image root"
    return None


def _text_problem(value: Any, max_chars: int) -> str | None:
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return "is not valid UTF-8"
        return "is bytes, expected text"
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (lone surrogate)"
    if "\ufffd" in value:
        return "contains U+FFFD replacement characters (undecodable input)"
    if len(value) > max_chars:
        return f"is {len(value)} characters long, over the limit of {max_chars}"
    return None


def validate_record(raw: Any, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Every reason `raw` is not a usable edit record; an empty list means it is good.

    Each reason names the field and what is wrong with it, e.g. "target: is empty".
    """
    if not isinstance(raw, Mapping):
        return [f"record: must be a JSON object, got {type(raw).__name__}"]
    d = normalize(raw)
    reasons: list[str] = []
    rid = d.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        reasons.append("id: missing")
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        reasons.append(f"id: must be a string or integer, got {type(rid).__name__}")
    for name in ("prompt", "target"):
        if name not in d or d[name] is None:
            reasons.append(f"{name}: missing (EasyEdit name: {'src' if name == 'prompt' else 'alt'})")
            continue
        problem = _text_problem(d[name], max_chars)
        if problem:
            reasons.append(f"{name}: {problem}")
        elif not d[name].strip():
            reasons.append(f"{name}: is empty")
    for name in TEXT_FIELDS[2:]:
        value = d.get(name)
        if value is None:
            continue
        problem = _text_problem(value, max_chars)
        if problem:
            reasons.append(f"{name}: {problem}")
    for name in IMAGE_FIELDS:
        value = d.get(name)
        if value is None or value == "" and name != "image":
            continue
        if not isinstance(value, str):
            reasons.append(f"{name}: image path must be a string, got {type(value).__name__}")
            continue
        problem = check_relative_path(value)
        if problem:
            reasons.append(f"{name}: {value!r} {problem}")
    for a, b in PAIRS:
        has_a, has_b = bool(d.get(a)), bool(d.get(b))
        if has_a != has_b:
            missing = b if has_a else a
            reasons.append(f"{missing}: missing while {a if has_a else b} is given (they come as a pair)")
    hard_images = d.get("hard_images") or []
    hard_answers = d.get("hard_answers") or []
    if not isinstance(hard_images, (list, tuple)) or not isinstance(hard_answers, (list, tuple)):
        reasons.append("hard_images/hard_answers: must be lists")
    else:
        if len(hard_images) != len(hard_answers):
            reasons.append(f"hard_answers: {len(hard_answers)} answers for {len(hard_images)} hard_images")
        for i, p in enumerate(hard_images):
            problem = "must be a string" if not isinstance(p, str) else check_relative_path(p)
            if problem:
                reasons.append(f"hard_images[{i}]: {p!r} {problem}")
        for i, a in enumerate(hard_answers):
            problem = _text_problem(a, max_chars)
            if problem:
                reasons.append(f"hard_answers[{i}]: {problem}")
    task = d.get("task", "vqa")
    if task not in TASKS:
        reasons.append(f"task: {task!r} is not one of {', '.join(TASKS)}")
    split = d.get("split", "test")
    if split not in SPLITS:
        reasons.append(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    extra = d.get("extra")
    if extra is not None and not isinstance(extra, Mapping):
        reasons.append(f"extra: must be an object, got {type(extra).__name__}")
    return reasons


def missing_env_fields(raw: Mapping[str, Any], envs: Sequence[str]) -> list[tuple[str, str]]:
    """(environment, field) for every field of `envs` (ENV_FIELDS) that `raw` lacks (absent, None or empty),
    in `envs` order; an empty list means `raw` has every environment asked for (issue 19 item 14)."""
    d = normalize(raw)
    out: list[tuple[str, str]] = []
    for env in envs:
        for name in ENV_FIELDS[env]:
            value = d.get(name)
            if value is None or value == "" or value == [] or value == ():
                out.append((env, name))
    return out
