"""NormSoftmax loss (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning",
BMVC 2019): softmax cross-entropy over cosine similarities divided by a temperature,

    L = -1/B sum_i log softmax_c(cos(e_i, p_c) / T)[y_i].

Sampled negatives (``sample_rate < 1``, ``nirdml.losses.shard``): the softmax's denominator
runs over the kept classes only (every class of the batch plus the uniform sample), so the
value is the full loss minus, per sample, the log of the kept classes' share of the full
denominator: never above the full loss, equal to it at ``sample_rate = 1`` (no log(C/kept)
correction, as in Partial FC).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.base import ProxyLoss


class NormSoftmaxLoss(ProxyLoss):
    """Normalised softmax with one proxy (class weight) per class.

    Args:
        temperature: T (0.05 in the paper).
        proxy_lr_multiplier: defaults to 2000 (see ``nirdml.losses.base``).

    ``last_terms``: ``proxy``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 0.05,
        proxy_lr_multiplier: float | None = None,
        shard=None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(num_classes, embedding_dim, proxy_lr_multiplier, shard=shard,
                         sample_rate=sample_rate, seed=seed)
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _compute(self, embeddings: Tensor, labels: Tensor):
        shard, proxies, labels = self._classes(labels)
        cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies.to(embeddings.dtype), dim=1).t()
        return shard.cross_entropy(cos / self.temperature, labels), {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature:g}"
