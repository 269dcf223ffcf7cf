"""Non-isotropy Regularization: the conditional flow and the regulariser wrapping a proxy loss.

``ConditionalGlowFlow`` (``flow``) is the conditional normalizing flow ``x -> z``, fed its
condition by a ``conditioning`` module; ``NIRLoss`` (``regularizer``) wires it with a base
distribution (``base``), a term (``terms``: one class per mode) and an input perturbation
(``perturbation``) around any ``ProxyLoss``. Mechanism metrics: ``monitor``. The classes are
imported on first access (``nirdml.nir`` itself imports no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nirdml.nir.conditioning import COND_MODES
    from nirdml.nir.flow import ConditionalGlowFlow
    from nirdml.nir.regularizer import NIRLoss

__all__ = ["COND_MODES", "ConditionalGlowFlow", "NIRLoss"]

_LAZY = {"ConditionalGlowFlow": "nirdml.nir.flow", "NIRLoss": "nirdml.nir.regularizer",
         "COND_MODES": "nirdml.nir.conditioning"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nirdml.nir' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
