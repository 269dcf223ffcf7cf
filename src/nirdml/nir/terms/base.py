"""The contract of a NIR term: what one mode computes from the flow's NLLs and how it is
combined with the proxy loss.

:class:`NIRTerm.value` gets a :class:`FlowBatch` (the flow inputs, their own-class conditions
and the NLL function of the flow and its base distribution) and returns a :class:`TermValue`;
:meth:`NIRTerm.combine` says how the term and the proxy loss make the loss
(``loss = proxy_part + nir_part``). A new variant is one subclass in one file of this folder,
registered in :data:`nirdml.nir.terms.NIR_TERMS` under its config name (``loss.nir.mode``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from torch import Tensor

from nirdml.errors import ConfigError


@dataclass
class FlowBatch:
    """What a term may use of one training batch.

    ``x``: the flow inputs (L2-normalised, perturbed in training; detached during the flow
    warm-up), ``cond``: each sample's own-class condition (its normalised proxy),
    ``nll(x, cond)``: per-sample NLL in nats under the flow and its base distribution,
    ``proxies(embeddings, labels)``: the condition of any other class (detached during the
    warm-up), ``embeddings`` and ``labels``: the raw batch.
    """

    embeddings: Tensor
    labels: Tensor
    x: Tensor
    cond: Tensor
    nll: Callable[[Tensor, Tensor], Tensor]
    proxies: Callable[[Tensor, Tensor], Tensor]

    @property
    def dim(self) -> int:
        return self.x.shape[1]


class TermValue(NamedTuple):
    """``value``: the term (scalar); ``nll``: each sample's own-class NLL in nats (B,);
    ``grad_weight``: each sample's weight in the term's gradient (B,, detached; what the
    ``material`` record counts); ``extra``: further records (``last_terms``)."""

    value: Tensor
    nll: Tensor
    grad_weight: Tensor
    extra: dict[str, Tensor]


def check_weight(name: str, value: float) -> float:
    """``value`` as a float; ConfigError naming ``loss.nir.<name>`` unless finite and >= 0."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"invalid value for loss.nir.{name}: {value}; must be a finite "
                          f"number >= 0")
    return value


class NIRTerm:
    """One way of turning the flow's NLLs into a loss term.

    Args:
        weight: ``omega``, the term's multiplier in ``L = L_proxy + omega * term`` (the
            release's term renames it: there it multiplies the proxy loss).
        per_dim: use the NLL in nats per dimension (``nll / D``), so that a weight transfers
            across embedding sizes.

    ``weight_option`` names the constructor argument that receives the config's
    ``loss.nir.weight``.
    """

    weight_option: ClassVar[str] = "weight"

    def __init__(self, weight: float, *, per_dim: bool = False):
        self.weight = check_weight("weight", weight)
        self.per_dim = bool(per_dim)

    def units(self, dim: int) -> float:
        """What an NLL is divided by before it enters the term: D (per dimension) or 1."""
        return float(dim) if self.per_dim else 1.0

    def value(self, batch: FlowBatch) -> TermValue:
        raise NotImplementedError

    def combine(self, proxy_loss: Tensor, term: Tensor) -> tuple[Tensor, Tensor]:
        """``(proxy_part, nir_part)``: here ``(L_proxy, weight * term)``."""
        return proxy_loss, self.weight * term

    def options(self) -> dict[str, object]:
        """The options that differ from the defaults (for ``repr``)."""
        return {"per_dim": True} if self.per_dim else {}

    def __repr__(self) -> str:
        parts = [f"{self.weight_option}={getattr(self, self.weight_option):g}"]
        parts += [f"{k}={v!r}" for k, v in self.options().items()]
        return f"{type(self).__name__}({', '.join(parts)})"
