"""Record readers, one module per format, registered in `SOURCES` (name -> reader function).

A reader takes the `DataConfig` and yields raw record dicts (our schema or EasyEdit's names); validation and
quarantine happen downstream in `pipeline.data.shards`, so a reader never drops a record silently.
"""

from __future__ import annotations

from odedit.registry import Registry

SOURCES: Registry = Registry("record source")


def _register_builtin() -> None:
    import importlib

    for module in ("demo", "mmedit", "vlkeb", "mmkebench", "hf"):
        try:
            importlib.import_module(f"pipeline.data.sources.{module}")
        except ModuleNotFoundError as exc:  # a reader module not written yet is simply not registered
            if exc.name != f"pipeline.data.sources.{module}":
                raise


_register_builtin()
