"""``disc``: ``L = L_proxy + weight * (mean_i CE_i + nll_weight * mean_i u_i)``.

``CE_i = -log softmax_c(-u_i(c))`` over the own class and ``negatives`` other classes of the
batch (drawn per sample), ``u_i(c)`` the (per-dim) NLL of ``x_i`` given ``rho_c``: each embedding
must be more likely under its own proxy than under others (a generative flow classifier).
Shrinking the embeddings earns nothing under the CE. Costs ``1 + negatives`` flow evaluations
per sample. Records ``ce`` and ``nll_gap`` (mean NLL given a negative's proxy minus given the
own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.nir.terms.base import FlowBatch, NIRTerm, TermValue, check_weight


def negative_labels(labels: Tensor, negatives: int) -> Tensor:
    """(B, K): for each sample, ``K = min(negatives, classes in batch - 1)`` distinct other
    classes of the batch, drawn uniformly (global RNG)."""
    classes = torch.unique(labels)
    k = min(negatives, classes.numel() - 1)
    own = torch.searchsorted(classes, labels)
    scores = torch.rand(labels.shape[0], classes.numel(), device=labels.device)
    scores[torch.arange(labels.shape[0], device=labels.device), own] = -1.0
    return classes[scores.topk(k, dim=1).indices]


class DiscTerm(NIRTerm):
    """The flow as a classifier over the batch's classes.

    Args:
        weight, per_dim: as every term.
        negatives: other batch classes per sample (>= 1).
        nll_weight: weight of a plain (per-dim) NLL term beside the CE (>= 0).
    """


    def __init__(self, weight: float, *, per_dim: bool = False, negatives: int = 1,
                 nll_weight: float = 0.0):
        super().__init__(weight, per_dim=per_dim)
        if isinstance(negatives, bool) or int(negatives) != negatives or negatives < 1:
            raise ConfigError(f"invalid value for loss.nir.negatives: {negatives!r}; must be an "
                              f"integer >= 1")
        self.negatives = int(negatives)
        self.nll_weight = check_weight("nll_weight", nll_weight)

    def value(self, batch: FlowBatch) -> TermValue:
        x, cond = batch.x, batch.cond
        units = self.units(batch.dim)
        neg = negative_labels(torch.as_tensor(batch.labels, device=x.device).long(),
                              self.negatives)
        k = neg.shape[1]
        if k == 0:  # a batch of one class has no negatives: its CE is 0
            nll = batch.nll(x, cond)
            ce = gap = torch.zeros_like(nll)
        else:
            cond_neg = batch.proxies(batch.embeddings.repeat_interleave(k, 0), neg.reshape(-1))
            nll_all = batch.nll(torch.cat([x, x.repeat_interleave(k, 0)]),
                                torch.cat([cond, cond_neg]))
            nll, nll_neg = nll_all[:x.shape[0]], nll_all[x.shape[0]:].view(-1, k)
            logits = -torch.cat([nll[:, None], nll_neg], 1) / units
            ce = torch.logsumexp(logits, 1) - logits[:, 0]
            gap = nll_neg.mean(1) - nll
        term = ce.mean() + self.nll_weight * (nll / units).mean()
        grad_weight = (1.0 - torch.exp(-ce.detach())) + self.nll_weight
        return TermValue(term, nll, grad_weight, {"ce": ce.mean(), "nll_gap": gap.mean()})

    def options(self) -> dict[str, object]:
        return {**super().options(), "negatives": self.negatives,
                "nll_weight": self.nll_weight}
