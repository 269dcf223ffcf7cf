"""Softmax ProxyNCA (ProxyNCA++: Teh et al., ECCV 2020; ProxyNCA: Movshovitz-Attias et al. 2017).

    L = -1/B sum_i log softmax_c(logit_ic)[y_i],   logit_ic = -||e_i - p_c||^2 / T  (default)
                                               or  logit_ic =  <e_i, p_c> / T     ("cosine")

with e_i the L2-normalised embedding and p_c the proxy (L2-normalised when
``normalize_proxies``). The positive proxy stays in the denominator (ProxyNCA++); the original
ProxyNCA excluded it. For unit vectors ||e - p||^2 = 2 - 2 cos, so "squared_euclidean" at T is
the same loss as "cosine" at T / 2.

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

_DISTANCES = ("squared_euclidean", "cosine")


class ProxyNCALoss(ProxyLoss):
    """Softmax cross-entropy over embedding-to-proxy (negative squared) distances.

    Args:
        temperature: T; ProxyNCA++ uses 1/9 on squared Euclidean distances of unit vectors
            (the default).
        distance: ``"squared_euclidean"`` (default) or ``"cosine"`` (a dot product with the
            raw proxy when ``normalize_proxies=False``).
        normalize_proxies: L2-normalise the proxies (default True, as in ProxyNCA++).
        proxy_lr_multiplier: defaults to 2000 (see ``nirdml.losses.base``).

    ``last_terms``: ``proxy``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        temperature: float = 1.0 / 9.0,
        distance: str = "squared_euclidean",
        normalize_proxies: bool = True,
        proxy_lr_multiplier: float | None = None,
        shard=None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(num_classes, embedding_dim, proxy_lr_multiplier, shard=shard,
                         sample_rate=sample_rate, seed=seed)
        if distance not in _DISTANCES:
            raise ConfigError(f"unknown distance {distance!r}; choose one of {_DISTANCES}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.distance = distance
        self.normalize_proxies = bool(normalize_proxies)

    def _compute(self, embeddings: Tensor, labels: Tensor):
        shard, proxies, labels = self._classes(labels)
        e = F.normalize(embeddings, dim=1)
        p = proxies.to(e.dtype)
        if self.normalize_proxies:
            p = F.normalize(p, dim=1)
        dot = e @ p.t()
        if self.distance == "cosine":
            logits = dot / self.temperature
        else:  # ||e||^2 = 1, so ||e - p||^2 = 1 + ||p||^2 - 2 <e, p>
            sq = 1.0 + (p * p).sum(dim=1)[None, :] - 2.0 * dot
            logits = -sq / self.temperature
        return shard.cross_entropy(logits, labels), {}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature:g}, "
            f"distance={self.distance!r}, normalize_proxies={self.normalize_proxies}"
        )
