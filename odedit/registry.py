"""A small checked registry: name -> object, with the checks PEFT's `register_peft_method` makes.

Every pluggable family in the project (model adapters, host editors, data sources, step rules) is looked up
through one of these, so no module outside a registry branches on a name string.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistryError(KeyError):
    """A registration or a lookup that names something malformed, duplicated or unknown."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps lower-case snake_case names to objects.

    Args:
        kind: what the registry holds, used in error messages ("model family", "edit method").

    Raises:
        RegistryError: on a malformed name, a duplicate, or an unknown name on lookup (with close matches).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistryError(
                f"{self.kind} name {name!r} is malformed: use lower-case letters, digits and '_', "
                "starting with a letter"
            )
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
        self._items[name] = obj
        return obj

    def decorator(self, name: str):
        """`@REGISTRY.decorator("name")` registers the decorated class or function under `name`."""

        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}.{hint}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
