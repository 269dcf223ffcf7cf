"""``paper``: ``L = L_proxy + weight * mean_i u_i`` (the paper's equation)."""

from __future__ import annotations

import torch

from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue


class PaperTerm(NIRTerm):
    """The mean (per-dim) NLL of the batch."""


    def value(self, batch: FlowBatch) -> TermValue:
        nll = batch.nll(batch.x, batch.cond)
        u = nll / self.units(batch.dim)
        return TermValue(u.mean(), nll, torch.ones_like(u), {})
