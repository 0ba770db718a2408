"""Host editors, one module each, registered in `METHODS` (see `odedit.methods.base` for the interface).

spec = METHODS.get("lora"); method = spec.method_cls(adapter, cfg.method)
"""

from __future__ import annotations

from odedit.methods import (  # noqa: F401,E402  (registration)  # noqa: F401,E402  (registration)
    ft,
    grace,
    lora,
    mend,  # noqa: F401,E402  (registration)
    tpatcher,
    unike,  # noqa: F401,E402  (registration)
    wise,
)
from odedit.methods.registry import METHODS, MethodSpec, register_method

__all__ = ["METHODS", "MethodSpec", "register_method"]
