"""Shared pieces of the pair-based losses: pairwise similarities, distances and pair masks.

Every pair-based loss works on L2-normalised embeddings ``x_i = e_i / ||e_i||``:

    S_ij = <x_i, x_j>                         (cosine similarity)
    D_ij = ||x_i - x_j|| = sqrt(2 - 2 S_ij)   (Euclidean distance of unit vectors)

``D`` has a zero gradient where it is 0 (the diagonal, duplicate embeddings) instead of the
``inf``/``NaN`` of a plain square root. Positive pairs are ``(i, j)`` with ``y_i = y_j`` and
``i != j``; negative pairs have ``y_i != y_j``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.losses.base import MetricLoss


def pairwise_cosine(embeddings: Tensor) -> Tensor:
    """(B, B) cosine similarities ``S_ij`` of the rows of ``embeddings``."""
    x = F.normalize(embeddings, dim=1)
    return x @ x.t()


def safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt(max(squared, 0))`` with gradient 0 (not inf) where the argument is <= 0."""
    positive = squared > 0
    return torch.where(positive, squared, torch.ones_like(squared)).sqrt() * positive


def pairwise_distance(embeddings: Tensor) -> Tensor:
    """(B, B) Euclidean distances ``D_ij`` between the L2-normalised rows of ``embeddings``."""
    return safe_sqrt(2.0 - 2.0 * pairwise_cosine(embeddings))


def pair_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(positive, negative)`` (B, B) boolean masks: same label off the diagonal, other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]``; a zero connected to the graph when the mask is empty."""
    count = mask.sum()
    if int(count) == 0:
        return values.sum() * 0.0
    return values.masked_fill(~mask, 0.0).sum() / count


class PairLoss(MetricLoss):
    """Base of the pair-based losses (no proxies, so NIR cannot wrap them).

    ``num_classes`` only bounds the labels (and sizes class-specific parameters, see
    :class:`~nirdml.losses.margin.MarginLoss`); any batch of labels in ``[0, num_classes)`` with
    at least two samples of some class gives pairs to learn from. A batch without any mined
    pair or triplet gives a loss of 0 (connected to the graph, so ``backward`` works).
    """
