"""Non-isotropy Regularization: the conditional flow and the regulariser wrapping a proxy loss.

``ConditionalGlowFlow`` is the conditional normalizing flow ``x -> z``; ``NIRLoss`` adds its NLL
(of each L2-normalised embedding, conditioned on its class proxy) to any ``ProxyLoss``.
The option names (``COND_MODES``, ``NIR_MODES``) come from the torch-free ``nirdml.nir.names``;
the torch classes are imported on first access, so ``nirdml.nir.names`` can be imported (by the
config module) without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from nirdml.nir.names import COND_MODES, NIR_MODES

if TYPE_CHECKING:
    from nirdml.nir.flow import ConditionalGlowFlow
    from nirdml.nir.regularizer import NIRLoss

__all__ = ["COND_MODES", "NIR_MODES", "ConditionalGlowFlow", "NIRLoss"]

_LAZY = {"ConditionalGlowFlow": "nirdml.nir.flow", "NIRLoss": "nirdml.nir.regularizer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nirdml.nir' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
