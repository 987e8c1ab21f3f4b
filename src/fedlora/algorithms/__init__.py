"""Federated algorithms: one module per method, registered by name.

Every module in this package is imported here, so adding a method is one new file (plus
its test and a row in the docs table).
"""

from __future__ import annotations

import importlib
import pkgutil

from fedlora.algorithms.base import (
    Algorithm,
    ClientHooks,
    FederationContext,
    Options,
    Payload,
    Update,
    get_algorithm,
    parse_options,
    register,
    registry,
    unregister,
    weighted_mean,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Algorithm",
    "ClientHooks",
    "FederationContext",
    "Options",
    "Payload",
    "Update",
    "get_algorithm",
    "parse_options",
    "register",
    "registry",
    "unregister",
    "weighted_mean",
]
