"""SoftTriple loss (Qian et al., "SoftTriple Loss: Deep Metric Learning Without Triplet
Sampling", ICCV 2019), K centres per class, with the paper's centre regulariser.

    S_ic = sum_k softmax_k(cos(e_i, w_c^k) / gamma) * cos(e_i, w_c^k)
    L_ce = -1/B sum_i log softmax_c(la * (S_ic - margin * [c = y_i]))[y_i]
    R    = 1/(C K (K-1)) sum_c sum_{t<s} sqrt(2 + eps - 2 cos(w_c^t, w_c^s)),   eps = 1e-5
    L    = L_ce + tau * R

Centres are stored class-major: rows ``c*K .. c*K+K-1`` of ``proxies`` belong to class c.

Sampled negatives (``sample_rate < 1``, ``nirdml.losses.shard``): ``L_ce``'s softmax over
classes runs over the kept classes only (every class of the batch plus the uniform sample), so
``L_ce`` is never above the full one; the within-class softmax over each class's K centres is
unchanged; ``R`` sums over the kept classes and is normalised by their count instead of C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.base import ProxyLoss

REG_EPS = 1e-5  # inside the square root, as in the authors' code


class SoftTripleLoss(ProxyLoss):
    """SoftTriple with ``centers_per_class`` centres per class.

    Args:
        centers_per_class: K (10).
        la: lambda, the logit scale (20).
        gamma: softmax temperature over a class's centres (0.1).
        margin: delta, subtracted from the own-class similarity (0.01).
        reg_weight: tau, weight of the centre regulariser (0.2); 0 disables it.
        proxy_lr_multiplier: defaults to 2000 (see ``nirdml.losses.base``).

    ``last_terms``: ``proxy`` = ``ce`` + ``reg`` (``reg`` is already multiplied by tau).
    ``class_proxies`` returns, per sample, the centre of its own class with the highest cosine
    similarity to it; the choice (argmax) carries no gradient, the chosen centre does.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        margin: float = 0.01,
        reg_weight: float = 0.2,
        proxy_lr_multiplier: float | None = None,
        shard=None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ):
        if int(centers_per_class) < 1:
            raise ConfigError(f"centers_per_class must be >= 1, got {centers_per_class}")
        if not gamma > 0:
            raise ConfigError(f"gamma must be > 0, got {gamma}")
        super().__init__(
            num_classes,
            embedding_dim,
            proxy_lr_multiplier,
            proxies_per_class=int(centers_per_class),
            shard=shard, sample_rate=sample_rate, seed=seed,
        )
        self.centers_per_class = int(centers_per_class)
        self.la = float(la)
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.reg_weight = float(reg_weight)

    def _centre_cosines(self, embeddings: Tensor, proxies: Tensor) -> Tensor:
        """(B, C, K) cosine similarity of each sample to every centre of ``proxies``."""
        cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies.to(embeddings.dtype),
                                                           dim=1).t()
        return cos.view(embeddings.shape[0], -1, self.centers_per_class)

    def _regulariser(self, proxies: Tensor, dtype: torch.dtype, shard) -> Tensor:
        """The centre spread term: a per-class sum on the owner, normalised by the total
        class count (the kept classes' under sampling)."""
        k = self.centers_per_class
        centres = F.normalize(proxies.to(dtype), dim=1).view(-1, k, proxies.shape[1])
        gram = centres @ centres.transpose(1, 2)  # (C, K, K)
        t, s = torch.triu_indices(k, k, offset=1, device=gram.device)
        dist = torch.sqrt(2.0 + REG_EPS - 2.0 * gram[:, t, s])
        return shard.sum(dist.sum()) / (shard.num_classes * k * (k - 1))

    def _compute(self, embeddings: Tensor, labels: Tensor):
        shard, proxies, labels = self._classes(labels)
        cos = self._centre_cosines(embeddings, proxies)
        weights = torch.softmax(cos / self.gamma, dim=2)  # within a class: local
        sim = (weights * cos).sum(dim=2)  # (B, shard classes)
        classes = torch.arange(shard.lo, shard.hi, device=labels.device)
        margin = (labels[:, None] == classes[None, :]).to(sim.dtype) * self.margin
        ce = shard.cross_entropy(self.la * (sim - margin), labels)  # across classes
        if self.reg_weight > 0 and self.centers_per_class > 1:
            reg = self.reg_weight * self._regulariser(proxies, sim.dtype, shard)
        else:
            reg = sim.new_zeros(())
        return ce + reg, {"ce": ce, "reg": reg}

    def class_proxies(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._nearest_own_centre(embeddings, labels)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, centers_per_class={self.centers_per_class}, "
            f"la={self.la:g}, gamma={self.gamma:g}, margin={self.margin:g}, "
            f"reg_weight={self.reg_weight:g}"
        )
