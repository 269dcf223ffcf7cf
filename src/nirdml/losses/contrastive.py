"""Contrastive loss (Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006), in the margin form of Musgrave et al., "A Metric Learning
Reality Check" (ECCV 2020): on unsquared Euclidean distances ``D`` of the L2-normalised
embeddings, over every pair of the batch,

    l_ij = [D_ij - m_pos]_+   for positive pairs (y_i = y_j, i != j),
    l_ij = [m_neg - D_ij]_+   for negative pairs,

    L = mean of the non-zero positive terms + mean of the non-zero negative terms

(each mean 0 when it has no non-zero term). Defaults: ``pos_margin`` 0, ``neg_margin`` 1. The
original paper uses squared distances and a sum; averaging the non-zero terms keeps the scale
independent of how many pairs are already satisfied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.pairs import PairLoss, masked_mean, pair_masks, pairwise_distance


class ContrastiveLoss(PairLoss):
    """Contrastive loss over all pairs of the batch (module docstring).

    Args:
        pos_margin: positives closer than this cost nothing (0).
        neg_margin: negatives farther than this cost nothing (1).

    ``last_terms``: ``proxy`` (the loss) = ``pos`` + ``neg``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, pos_margin: float = 0.0,
                 neg_margin: float = 1.0):
        super().__init__(num_classes, embedding_dim)
        if not 0 <= pos_margin < neg_margin:
            raise ConfigError(f"need 0 <= pos_margin < neg_margin, got {pos_margin} and "
                              f"{neg_margin}")
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def _compute(self, embeddings: Tensor, labels: Tensor):
        dist = pairwise_distance(embeddings)
        pos_mask, neg_mask = pair_masks(labels)
        l_pos = torch.relu(dist - self.pos_margin)
        l_neg = torch.relu(self.neg_margin - dist)
        pos = masked_mean(l_pos, pos_mask & (l_pos > 0))
        neg = masked_mean(l_neg, neg_mask & (l_neg > 0))
        return pos + neg, {"pos": pos, "neg": neg}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pos_margin={self.pos_margin:g}, "
                f"neg_margin={self.neg_margin:g}")
