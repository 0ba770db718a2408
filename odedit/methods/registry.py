"""The checked registry of host editors: name -> (config class, method class)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from odedit.config import MethodConfig
from odedit.methods.base import EditMethod
from odedit.registry import Registry, RegistryError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    method_cls: type


METHODS: Registry = Registry("edit method")


def register_method(name: str, config_cls: type, method_cls: type) -> MethodSpec:
    """Register an editor. Rejects malformed or duplicate names, configs that are not `MethodConfig`s,
    methods that are not `EditMethod`s, and a config whose default `name` disagrees with `name`."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise RegistryError(f"edit method {name!r}: config class {config_cls!r} must subclass MethodConfig")
    if not (isinstance(method_cls, type) and issubclass(method_cls, EditMethod)):
        raise RegistryError(f"edit method {name!r}: method class {method_cls!r} must subclass EditMethod")
    default_name = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("name")
    if default_name != name:
        raise RegistryError(
            f"edit method {name!r}: {config_cls.__name__}.name defaults to {default_name!r}; make it {name!r}"
        )
    return METHODS.register(name, MethodSpec(name, config_cls, method_cls))
