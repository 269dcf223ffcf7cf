"""Triplet loss with semi-hard mining (Schroff, Kalenichenko and Philbin, "FaceNet: A Unified
Embedding for Face Recognition and Clustering", CVPR 2015; the form of Musgrave et al., "A
Metric Learning Reality Check", ECCV 2020).

With ``D`` the Euclidean distance of the L2-normalised embeddings, every triplet ``(a, p, n)`` of
the batch (``y_p = y_a``, ``p != a``, ``y_n != y_a``) is a candidate. Semi-hard mining keeps
those whose negative lies beyond the positive but inside the margin,

    0 < D_an - D_ap <= margin,

("all" keeps every triplet with ``D_an - D_ap <= margin``, i.e. every one with a non-zero loss,
hard ones included) and the loss is the mean over the kept triplets with a non-zero term of

    l_apn = [D_ap - D_an + margin]_+.

FaceNet's own recipe keeps one semi-hard negative per positive pair at random; here, as in
Musgrave et al.'s benchmark, every semi-hard triplet of the batch counts. The mining selects
triplets only (no gradient flows through it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.pairs import PairLoss, pair_masks, pairwise_distance

MINING = ("semihard", "all")


#: anchors per block of the (anchors, B, B) candidate tensor: about 2^24 entries at a time
_BLOCK_ENTRIES = 1 << 24


def mine_triplets(dist: Tensor, labels: Tensor, margin: float, mining: str = "semihard"
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(a, p, n)`` of the triplets that ``mining`` keeps (module docstring), in
    lexicographic order; the ``B^3`` candidates are scanned in blocks of anchors."""
    pos, neg = pair_masks(labels)
    batch = len(labels)
    step = max(1, _BLOCK_ENTRIES // max(batch * batch, 1))
    found = []
    with torch.no_grad():
        for start in range(0, batch, step):
            d = dist[start:start + step]
            gap = d[:, None, :] - d[:, :, None]  # gap[a, p, n] = D_an - D_ap
            keep = pos[start:start + step, :, None] & neg[start:start + step, None, :]
            keep &= gap <= margin
            if mining == "semihard":
                keep &= gap > 0
            a, p, n = keep.nonzero(as_tuple=True)
            found.append((a + start, p, n))
    return tuple(torch.cat(parts) for parts in zip(*found))


class TripletLoss(PairLoss):
    """Triplet margin loss over the mined triplets of the batch.

    Args:
        margin: 0.2.
        mining: ``"semihard"`` (default) or ``"all"`` (module docstring).

    ``last_terms``: ``proxy`` (the loss), ``triplets`` (mined triplets per anchor).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.2,
                 mining: str = "semihard"):
        super().__init__(num_classes, embedding_dim)
        if not margin > 0:
            raise ConfigError(f"margin must be > 0, got {margin}")
        if mining not in MINING:
            raise ConfigError(f"unknown triplet mining {mining!r}; choose one of: "
                              f"{', '.join(MINING)}")
        self.margin = float(margin)
        self.mining = mining

    def _compute(self, embeddings: Tensor, labels: Tensor):
        dist = pairwise_distance(embeddings)
        a, p, n = mine_triplets(dist.detach(), labels, self.margin, self.mining)
        losses = torch.relu(dist[a, p] - dist[a, n] + self.margin)
        active = losses > 0
        if not bool(active.any()):
            loss = dist.sum() * 0.0
        else:
            loss = losses[active].mean()
        count = torch.tensor(len(a) / len(labels), dtype=dist.dtype, device=dist.device)
        return loss, {"triplets": count}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin:g}, mining={self.mining!r}"
