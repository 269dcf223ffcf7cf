"""The NIR terms, one class per mode (``loss.nir.mode``), registered in :data:`NIR_TERMS`.

See ``nirdml.nir.terms.base`` for the contract. A new variant: one file here with a
:class:`NIRTerm` subclass, plus one registration line below (or
``NIR_TERMS.register("name")(MyTerm)`` in your own code).
"""

from __future__ import annotations

from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue
from nirdml.nir.terms.disc import DiscTerm
from nirdml.nir.terms.kl import KLTerm
from nirdml.nir.terms.paper import PaperTerm
from nirdml.nir.terms.release import DEFAULT_NLL_CAP, ReleaseTerm, capped_exp
from nirdml.nir.terms.selfnorm import SelfNormTerm
from nirdml.registry import Registry

#: NIR terms by mode name (``loss.nir.mode``).
NIR_TERMS = Registry("NIR mode")
NIR_TERMS.register("release")(ReleaseTerm)
NIR_TERMS.register("paper")(PaperTerm)
NIR_TERMS.register("selfnorm")(SelfNormTerm)
NIR_TERMS.register("disc")(DiscTerm)
NIR_TERMS.register("kl")(KLTerm)

__all__ = ["DEFAULT_NLL_CAP", "NIR_TERMS", "DiscTerm", "FlowBatch", "KLTerm", "NIRTerm",
           "PaperTerm", "ReleaseTerm", "SelfNormTerm", "TermValue", "capped_exp"]
