"""``kl``: ``L = L_proxy + weight * (mean_i u_i - s * mean_i log ||x_i - x_n(i)||)``.

``x_n(i)`` is the nearest other sample of i's class in the batch, ``s = 1`` with ``per_dim``
else ``D`` (samples alone of their class in the batch leave the second term). The second term
is the Kozachenko-Leonenko estimate of the within-class entropy (up to constants), so the sum
estimates ``KL(embeddings | flow)`` instead of the paper's cross-entropy: shrinking a class
lowers the NLL but raises the KL by as much, so collapse earns nothing and the flow's density
must be matched by the embeddings' spread. Records ``log_nn`` (the mean log nearest-neighbour
distance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue


def within_class_log_nn(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_nn, has_nn)``: per sample, the log Euclidean distance to the nearest other sample of
    its class in the batch, and whether it has one (``log_nn`` is 0 where it has none).
    Distances are floored at 1e-6 so coincident samples stay finite."""
    labels = torch.as_tensor(labels, device=x.device).reshape(-1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    norms = x.square().sum(1)
    sq = norms[:, None] + norms[None, :] - 2.0 * x @ x.T
    sq = sq.masked_fill(~same, float("inf"))
    nearest = sq.min(1).values
    has_nn = torch.isfinite(nearest)
    log_nn = 0.5 * torch.log(nearest.where(has_nn, torch.ones_like(nearest)).clamp(min=1e-12))
    return log_nn, has_nn


class KLTerm(NIRTerm):
    """The (per-dim) NLL minus the within-class entropy estimate."""


    def value(self, batch: FlowBatch) -> TermValue:
        nll = batch.nll(batch.x, batch.cond)
        units = self.units(batch.dim)
        u = nll / units
        log_nn, has_nn = within_class_log_nn(batch.x, batch.labels)
        entropy = log_nn[has_nn].mean() if bool(has_nn.any()) else log_nn.sum() * 0.0
        term = u.mean() - (batch.dim / units) * entropy
        return TermValue(term, nll, torch.ones_like(u), {"log_nn": entropy})
