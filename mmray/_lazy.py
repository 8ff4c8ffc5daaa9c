"""Lazy package exports: a package names its public objects without importing their modules up front."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``exports`` (name -> module, absolute or ``.relative``
    to ``package``) on first use. An exported name must not be a submodule's name too: importing the
    submodule would replace the package's attribute with the module. Keeps ``import mmray`` light and free of Ray, and breaks import cycles."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        sys.modules[package].__dict__[name] = value  # resolved once: later accesses skip this function
        return value

    return __getattr__
