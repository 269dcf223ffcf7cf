"""Multi-Similarity loss with its pair mining (Wang et al., "Multi-Similarity Loss with General
Pair Weighting for Deep Metric Learning", CVPR 2019).

With ``S_ij`` the cosine similarity, P_i the positives and N_i the negatives of anchor i, the
mining (eq. 5-6) keeps the pairs that are harder than the anchor's hardest pair of the other kind
by a margin epsilon:

    P_i* = {j in P_i : S_ij - eps < max_{k in N_i} S_ik}
    N_i* = {j in N_i : S_ij + eps > min_{k in P_i} S_ik}

and the loss (eq. 9) is

    L = 1/B sum_i [ 1/alpha log(1 + sum_{j in P_i*} exp(-alpha (S_ij - lambda)))
                  + 1/beta  log(1 + sum_{j in N_i*} exp( beta  (S_ij - lambda))) ].

The mining only selects pairs (no gradient flows through the selection). ``P_i*`` is empty
exactly when ``N_i*`` is, so an anchor contributes both terms or none (the release's ``continue``).
Defaults are the release's (alpha 2, beta 40, lambda 0.5, eps 0.1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.pairs import PairLoss, pair_masks, pairwise_cosine


def log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """Per row: ``log(1 + sum_{j in mask} exp(logits_ij))`` (0 for an empty row), stable."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zeros = logits.new_zeros(logits.shape[0], 1)
    return torch.logsumexp(torch.cat([masked, zeros], dim=1), dim=1)


def multi_similarity_mining(sim: Tensor, labels: Tensor, epsilon: float
                            ) -> tuple[Tensor, Tensor]:
    """``(hard positives, hard negatives)`` (B, B) masks of the MS mining (module docstring)."""
    pos, neg = pair_masks(labels)
    with torch.no_grad():
        inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
        hardest_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
        hardest_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
        hard_pos = pos & (sim - epsilon < hardest_neg)
        hard_neg = neg & (sim + epsilon > hardest_pos)
    return hard_pos, hard_neg


class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss on MS-mined pairs of the batch.

    Args:
        alpha: scale of the positive term (2).
        beta: scale of the negative term (40).
        base: lambda, the similarity threshold (0.5).
        epsilon: the mining margin (0.1).

    ``last_terms``: ``proxy`` (the loss) = ``pos`` + ``neg`` (each averaged over the batch),
    ``mined_pairs`` (mined positive + negative pairs per anchor).
    """

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 2.0,
                 beta: float = 40.0, base: float = 0.5, epsilon: float = 0.1):
        super().__init__(num_classes, embedding_dim)
        if not (alpha > 0 and beta > 0):
            raise ConfigError(f"alpha and beta must be > 0, got {alpha} and {beta}")
        if not epsilon >= 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)

    def _compute(self, embeddings: Tensor, labels: Tensor):
        sim = pairwise_cosine(embeddings)
        hard_pos, hard_neg = multi_similarity_mining(sim.detach(), labels, self.epsilon)
        batch = len(labels)
        pos = log1p_sum_exp(-self.alpha * (sim - self.base), hard_pos).sum() / (self.alpha * batch)
        neg = log1p_sum_exp(self.beta * (sim - self.base), hard_neg).sum() / (self.beta * batch)
        mined = (hard_pos.sum() + hard_neg.sum()).to(sim.dtype) / batch
        return pos + neg, {"pos": pos, "neg": neg, "mined_pairs": mined}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, alpha={self.alpha:g}, beta={self.beta:g}, "
                f"base={self.base:g}, epsilon={self.epsilon:g}")
