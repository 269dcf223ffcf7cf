"""Non-isotropy Regularization: the conditional flow and the regulariser wrapping a proxy loss.

``ConditionalGlowFlow`` is the conditional normalizing flow ``x -> z``; ``NIRLoss`` adds its NLL
(of each L2-normalised embedding, conditioned on its class proxy) to any ``ProxyLoss``.
"""

from __future__ import annotations

from nirdml.nir.flow import COND_MODES, ConditionalGlowFlow
from nirdml.nir.regularizer import NIR_MODES, NIRLoss

__all__ = ["COND_MODES", "NIR_MODES", "ConditionalGlowFlow", "NIRLoss"]
