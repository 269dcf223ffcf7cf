"""Margin loss with distance-weighted sampling (Wu, Manmatha, Smola and Krähenbühl, "Sampling
Matters in Deep Embedding Learning", ICCV 2017).

Sampling (section 4). For points spread uniformly on the unit sphere of R^n the pairwise
distance d has the density

    q(d) ∝ d^(n-2) (1 - d^2 / 4)^((n-3)/2),

so drawing a negative j for anchor i with probability ∝ 1 / q(D_ij) spreads the sampled
distances evenly instead of concentrating them near sqrt(2). As in the paper's code, distances
are clipped from below at ``cutoff`` (0.5: bounds the weights, "to avoid high variance") and
negatives at ``D_ij >= nonzero_loss_cutoff`` (1.4: they give no loss) get weight 0; an anchor
left without any weight draws uniformly among its negatives. Every ordered positive pair
``(a, p)``, ``a != p``, gets one negative drawn for its anchor: triplets ``(a, p, n)``.

Loss (eq. 3-4), with a learnable boundary beta (one, or one per class with
``class_specific_beta``; initialised at 1.2 and trained at ``lr * beta_lr_multiplier``):

    l_pos = [D_ap - beta_a + margin]_+,    l_neg = [beta_a - D_an + margin]_+
    L = sum_triplets (l_pos + l_neg) / #{non-zero l_pos and l_neg}     (0 when all are zero)

The beta regulariser nu * beta of the paper is not implemented (nu = 0, the paper's default).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.losses.pairs import PairLoss, pair_masks, pairwise_distance

#: the paper's code: base lr 1e-4, beta lr 0.1
DEFAULT_BETA_LR_MULTIPLIER = 1000.0


def distance_weighted_probabilities(dist: Tensor, labels: Tensor, dim: int,
                                    cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
                                    ) -> Tensor:
    """(B, B) probability of drawing negative j for anchor i (rows sum to 1; rows of anchors
    without negatives are 0): ∝ 1 / q(max(D_ij, cutoff)) for the negatives closer than
    ``nonzero_loss_cutoff``, uniform over all negatives when none is (module docstring)."""
    _, neg = pair_masks(labels)
    d = dist.clamp(min=cutoff)
    log_q = (dim - 2.0) * torch.log(d) + (dim - 3.0) / 2.0 * torch.log1p(-0.25 * d * d)
    allowed = neg & (dist < nonzero_loss_cutoff)
    log_w = (-log_q).masked_fill(~allowed, float("-inf"))
    none_allowed = ~allowed.any(dim=1, keepdim=True)
    log_w = torch.where(none_allowed & neg, torch.zeros_like(log_w), log_w)  # uniform fallback
    has_negatives = neg.any(dim=1, keepdim=True)
    log_w = log_w.masked_fill(~has_negatives, 0.0)
    probs = torch.softmax(log_w, dim=1)
    return probs * has_negatives


def distance_weighted_sampling(embeddings: Tensor, labels: Tensor, cutoff: float = 0.5,
                               nonzero_loss_cutoff: float = 1.4,
                               generator: torch.Generator | None = None
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Triplet indices ``(a, p, n)``: every ordered positive pair, one negative drawn for its
    anchor from :func:`distance_weighted_probabilities` (``torch.multinomial`` with
    ``generator``, on the embeddings' device). Anchors without negatives are left out."""
    with torch.no_grad():
        dist = pairwise_distance(embeddings.detach())
        probs = distance_weighted_probabilities(dist, labels, embeddings.shape[1], cutoff,
                                                nonzero_loss_cutoff)
        pos, _ = pair_masks(labels)
        pos &= probs.sum(dim=1, keepdim=True) > 0
        a, p = pos.nonzero(as_tuple=True)
        if len(a) == 0:
            return a, p, p.clone()
        n = torch.multinomial(probs[a], 1, replacement=True, generator=generator).squeeze(1)
    return a, p, n


class MarginLoss(PairLoss):
    """Margin loss on distance-weighted triplets (module docstring).

    Args:
        margin: alpha of the paper (0.2).
        beta: initial boundary (1.2); a parameter, trained.
        class_specific_beta: one beta per class (``beta_{y_a}``) instead of one.
        beta_lr_multiplier: beta's learning rate is ``lr * beta_lr_multiplier`` in
            :meth:`param_groups` (1000: the paper's code trains beta at 0.1 with base lr 1e-4).
        cutoff, nonzero_loss_cutoff: the sampling's distance clip and cut (0.5, 1.4).
        generator: the ``torch.Generator`` the sampling draws from (default: torch's global
            one, which the trainer seeds and checkpoints).

    ``last_terms``: ``proxy`` (the loss), ``pos``/``neg`` (their parts of it), ``beta`` (mean),
    ``active`` (fraction of non-zero pair terms). ``last_triplets`` holds the sampled ``(a, p,
    n)`` of the last call.
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.2,
                 beta: float = 1.2, class_specific_beta: bool = False,
                 beta_lr_multiplier: float = DEFAULT_BETA_LR_MULTIPLIER, cutoff: float = 0.5,
                 nonzero_loss_cutoff: float = 1.4, generator: torch.Generator | None = None):
        super().__init__(num_classes, embedding_dim)
        if not margin >= 0:
            raise ConfigError(f"margin must be >= 0, got {margin}")
        if not beta_lr_multiplier >= 0:
            raise ConfigError(f"beta_lr_multiplier must be >= 0, got {beta_lr_multiplier}")
        if not 0 <= cutoff < nonzero_loss_cutoff:
            raise ConfigError(f"need 0 <= cutoff < nonzero_loss_cutoff, got {cutoff} and "
                              f"{nonzero_loss_cutoff}")
        self.margin = float(margin)
        self.class_specific_beta = bool(class_specific_beta)
        self.beta_lr_multiplier = float(beta_lr_multiplier)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.generator = generator
        size = self.num_classes if self.class_specific_beta else 1
        self.beta = nn.Parameter(torch.full((size,), float(beta)))
        self.last_triplets: tuple[Tensor, Tensor, Tensor] | None = None

    def _compute(self, embeddings: Tensor, labels: Tensor):
        a, p, n = distance_weighted_sampling(embeddings, labels, self.cutoff,
                                             self.nonzero_loss_cutoff, self.generator)
        self.last_triplets = (a, p, n)
        return self.triplet_loss(embeddings, labels, a, p, n)

    def triplet_loss(self, embeddings: Tensor, labels: Tensor, a: Tensor, p: Tensor,
                     n: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The margin loss of the given triplets: ``(loss, terms)``."""
        beta = self.beta.to(embeddings.dtype)
        beta_a = beta[labels[a]] if self.class_specific_beta else beta.expand(len(a))
        dist = pairwise_distance(embeddings)
        l_pos = torch.relu(dist[a, p] - beta_a + self.margin)
        l_neg = torch.relu(beta_a - dist[a, n] + self.margin)
        active = (l_pos > 0).sum() + (l_neg > 0).sum()
        if int(active) == 0:
            zero = dist.sum() * 0.0 + beta.sum() * 0.0
            return zero, {"pos": zero, "neg": zero, "beta": beta.mean(), "active": zero}
        pos, neg = l_pos.sum() / active, l_neg.sum() / active
        frac = active.to(dist.dtype) / max(2 * len(a), 1)
        return pos + neg, {"pos": pos, "neg": neg, "beta": beta.mean(), "active": frac}

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """beta at ``lr * beta_lr_multiplier``, without weight decay."""
        return [{"name": "beta", "params": [self.beta], "lr": lr * self.beta_lr_multiplier,
                 "weight_decay": 0.0}]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, margin={self.margin:g}, "
                f"class_specific_beta={self.class_specific_beta}, "
                f"beta_lr_multiplier={self.beta_lr_multiplier:g}, cutoff={self.cutoff:g}, "
                f"nonzero_loss_cutoff={self.nonzero_loss_cutoff:g}")
