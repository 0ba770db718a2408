"""What every record reader returns: raw records plus the image roots their relative paths resolve against."""

from __future__ import annotations

from dataclasses import dataclass, field

from odedit.configlib import ConfigIssue
from pipeline.data.sources import SOURCES


@dataclass
class RecordSource:
    """Raw records (our schema or EasyEdit's field names) and where their images live.

    Image paths inside records are relative to the matching root: `image` and `hard_images` to
    `image_root`, `image_rephrase` to `rephrase_image_root`, `m_loc` to `locality_image_root`.
    """

    records: list[dict] = field(default_factory=list)
    image_root: str = ""
    rephrase_image_root: str = ""
    locality_image_root: str = ""
    name: str = ""
    blob_dir: str = ""  # where embedded images are kept by content (pipeline.data.blobs); "" = none
    # What a reader skipped inside records it kept, by a short name (e.g. VLKEB portability entries without a
    # `port_type`: "portability_skipped"); counted in the shards manifest as `reader_notes`.
    notes: dict[str, int] = field(default_factory=dict)


def check_source(raw: dict) -> list:
    """Config check owned by `pipeline` (on the raw config dict): `data.source` names a registered reader, and
    the reader's own `check_config(raw)` (a function attribute of the reader, when it has one) finds nothing."""

    data = raw.get("data") if isinstance(raw, dict) else None
    name = data.get("source", "demo") if isinstance(data, dict) else "demo"
    if isinstance(name, str) and name in SOURCES:
        check = getattr(SOURCES.get(name), "check_config", None)
        return list(check(raw)) if check is not None else []
    return [ConfigIssue("data.source", name, SOURCES.unknown_message(name), "pick a registered reader")]
