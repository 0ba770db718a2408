"""Host editors, one module each, registered in `METHODS` (see `odedit.methods.base` for the interface).

    spec = METHODS.get("lora"); method = spec.method_cls(adapter, cfg.method)
"""

from __future__ import annotations

from odedit.methods.registry import METHODS, MethodSpec, register_method
from odedit.methods import ft, lora  # noqa: F401,E402  (registration)
from odedit.methods import mend  # noqa: F401,E402  (registration)
from odedit.methods import unike  # noqa: F401,E402  (registration)
from odedit.methods import grace, tpatcher, wise  # noqa: F401,E402  (registration)

__all__ = ["METHODS", "MethodSpec", "register_method"]
