"""The registry of model-adapter families (each adapter module registers itself)."""

from __future__ import annotations

from odedit.registry import Registry

ADAPTERS: Registry = Registry("model family")
