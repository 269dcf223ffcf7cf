"""Non-isotropy Regularization: the conditional flow and the regulariser wrapping a proxy loss.

``ConditionalGlowFlow`` (``flow``) is the conditional normalizing flow ``x -> z``, fed its
condition by a ``conditioning`` module; ``NIRLoss`` (``regularizer``) wires it with a base
distribution (``base``), a term (``terms``: one class per mode) and an input perturbation
(``perturbation``) around any ``ProxyLoss``. Mechanism metrics: ``monitor``. The classes are
imported on first access (``nirdml.nir`` itself imports no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.lazy import lazy_attributes

if TYPE_CHECKING:
    from nirdml.nir.conditioning import COND_MODES
    from nirdml.nir.flow import ConditionalGlowFlow
    from nirdml.nir.regularizer import NIRLoss

__all__ = ["COND_MODES", "ConditionalGlowFlow", "NIRLoss"]

_LAZY = {"ConditionalGlowFlow": "nirdml.nir.flow", "NIRLoss": "nirdml.nir.regularizer",
         "COND_MODES": "nirdml.nir.conditioning"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
