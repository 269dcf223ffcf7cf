"""Lazy package attributes: a package's names imported from their modules on first access.

Used by ``nirdml``, ``nirdml.nir`` and ``nirdml.evaluation`` so that importing a package stays
cheap (no torch until a class is used). A leaf module: it imports nothing of nirdml.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str],
                    submodules: tuple[str, ...] = ()) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``names`` maps an attribute to the
    module that defines it; each of ``submodules`` is imported as ``package.<name>``."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        module = importlib.import_module(package)
        return sorted(set(vars(module)) | set(names) | set(submodules))

    return __getattr__, __dir__


__all__ = ["lazy_attributes"]
