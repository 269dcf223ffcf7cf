"""``selfnorm``: ``L = L_proxy + weight * log mean_i exp(u_i)``.

The release's exp weighting, normalised over the batch. Its gradient gives sample i the weight
``softmax(u)_i`` (the release gives ``exp(u_i) / B``), so it cannot vanish when every ``u_i``
is very negative.
"""

from __future__ import annotations

import math

import torch

from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue


class SelfNormTerm(NIRTerm):
    """The batch log-mean-exp of the (per-dim) NLLs."""


    def value(self, batch: FlowBatch) -> TermValue:
        nll = batch.nll(batch.x, batch.cond)
        u = nll / self.units(batch.dim)
        return TermValue(torch.logsumexp(u, 0) - math.log(u.shape[0]), nll,
                         torch.softmax(u.detach(), 0), {})
