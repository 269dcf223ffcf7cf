"""``release``: ``L = mean_i exp(u_i) + proxy_weight * L_proxy`` (the authors' released code,
the only form with published weights: 0.0075 CUB200, 0.01 Cars196, 0.3 SOP, which multiply
the *proxy* loss)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue, check_weight

#: Default ``nll_cap``: exp(50) ~ 5e21 keeps a float32 batch mean finite.
DEFAULT_NLL_CAP = 50.0


def capped_exp(nll: Tensor, cap: float | None) -> Tensor:
    """``exp(nll)``, continued linearly above ``cap``: ``exp(cap) * (1 + nll - cap)``.

    Equal to ``exp(nll)`` (value and gradient) wherever ``nll <= cap``; above the cap the value
    and gradient stay finite (gradient ``exp(cap)``, the largest of the exact branch) instead of
    overflowing to inf. ``cap=None`` is the plain ``exp``.
    """
    if cap is None:
        return torch.exp(nll)
    return torch.exp(nll.clamp(max=cap)) + math.exp(cap) * (nll - cap).clamp(min=0)


class ReleaseTerm(NIRTerm):
    """The release's exp-weighted NLL.

    Args:
        proxy_weight: ``w``, the multiplier of the proxy loss (config: ``loss.nir.weight``).
        per_dim: ``u_i = nll_i / D`` instead of ``nll_i``.
        nll_cap: ``exp(u)`` overflows float32 for u > 88, which an outlier embedding of an
            untrained flow can reach; above ``nll_cap`` the term is continued linearly
            (:func:`capped_exp`), so the loss and its gradient stay finite. Below the cap the
            maths is exactly ``exp(u)``. ``None`` disables the cap.
    """

    weight_option = "proxy_weight"

    def __init__(self, proxy_weight: float, *, per_dim: bool = False,
                 nll_cap: float | None = DEFAULT_NLL_CAP):
        self.per_dim = bool(per_dim)  # no omega: the term enters the loss unweighted
        self.proxy_weight = check_weight("weight", proxy_weight)
        if nll_cap is not None and not math.isfinite(float(nll_cap)):
            raise ConfigError(f"nll_cap must be a finite number or None, got {nll_cap}")
        self.nll_cap = None if nll_cap is None else float(nll_cap)

    def value(self, batch: FlowBatch) -> TermValue:
        nll = batch.nll(batch.x, batch.cond)
        u = nll / self.units(batch.dim)
        # the cap only costs extra ops when a batch actually reaches it
        capped = self.nll_cap is not None and not bool(u.detach().max() <= self.nll_cap)
        per_sample = capped_exp(u, self.nll_cap) if capped else torch.exp(u)
        return TermValue(per_sample.mean(), nll, per_sample.detach(), {})

    def combine(self, proxy_loss: Tensor, term: Tensor) -> tuple[Tensor, Tensor]:
        return self.proxy_weight * proxy_loss, term

    def options(self) -> dict[str, object]:
        return {**super().options(), "nll_cap": self.nll_cap}
