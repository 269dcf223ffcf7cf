"""Additive-margin softmax losses: ArcFace, CosFace and Sub-center ArcFace.

Each class c has a weight vector ``w_c`` (the proxy, so NIR can wrap these losses); with
``cos theta_ic`` the cosine between embedding i and ``w_c``, scale s and margin m, the loss is
the softmax cross-entropy over the scaled logits with the margin on the own class only:

    L = -1/B sum_i log [ exp(s psi(theta_{i y_i})) /
                         (exp(s psi(theta_{i y_i})) + sum_{c != y_i} exp(s cos theta_ic)) ]

* ArcFace (Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019): ``psi(theta) = cos(theta + m)`` while ``theta <= pi - m``, continued as
  ``cos theta - m sin m`` beyond, so the target logit keeps decreasing in theta (s = 64,
  m = 0.5 rad).
* CosFace (Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR
  2018): ``psi(theta) = cos theta - m`` (s = 64, m = 0.35).
* Sub-center ArcFace (Deng et al., "Sub-center ArcFace: Boosting Face Recognition by
  Large-Scale Noisy Web Faces", ECCV 2020): K sub-centres per class, ``cos theta_ic =
  max_k cos(e_i, w_c^k)``, then ArcFace (K = 3).

``cos(theta + m)`` is computed as ``cos theta cos m - sin theta sin m`` with ``sin theta =
sqrt(1 - cos^2 theta)`` floored at 1e-6 (instead of ``acos``): the same values, and finite
gradients when an embedding coincides with its class weight.

Sampled negatives (``sample_rate < 1``, ``nirdml.losses.shard``): the softmax's denominator
runs over the kept classes only (every class of the batch plus the uniform sample), so the
value is the full loss minus, per sample, the log of the kept classes' share of the full
denominator: never above the full loss, equal to it at ``sample_rate = 1`` (no log(C/kept)
correction, as in Partial FC). The margin on the own class is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.losses.base import ProxyLoss

_SIN_FLOOR_SQUARED = 1e-12


def arcface_logit(cos: Tensor, margin: float) -> Tensor:
    """ArcFace's target logit ``psi(theta)`` (before scaling) of cosines ``cos``."""
    cos = cos.clamp(-1.0, 1.0)
    sin = torch.sqrt((1.0 - cos * cos).clamp(min=_SIN_FLOOR_SQUARED))
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    # theta <= pi - m  <=>  cos theta >= cos(pi - m) = -cos m
    return torch.where(cos >= -math.cos(margin), shifted, cos - margin * math.sin(margin))


class _MarginSoftmaxLoss(ProxyLoss):
    """Cross-entropy over ``s * cos`` with the own class's cosine replaced by ``psi``."""

    def __init__(self, num_classes: int, embedding_dim: int, scale: float, margin: float,
                 proxy_lr_multiplier: float | None = None, proxies_per_class: int = 1,
                 shard=None, sample_rate: float = 1.0, seed: int = 0):
        if not scale > 0:
            raise ConfigError(f"scale must be > 0, got {scale}")
        if not 0 <= margin < math.pi / 2:
            raise ConfigError(f"margin must be in [0, pi/2), got {margin}")
        super().__init__(num_classes, embedding_dim, proxy_lr_multiplier,
                         proxies_per_class=proxies_per_class, shard=shard,
                         sample_rate=sample_rate, seed=seed)
        self.scale = float(scale)
        self.margin = float(margin)

    def _class_cosine(self, embeddings: Tensor, proxies: Tensor) -> Tensor:
        """(B, C) cosine of each embedding to each class of ``proxies``."""
        return F.normalize(embeddings, dim=1) @ F.normalize(proxies.to(embeddings.dtype),
                                                            dim=1).t()

    def _target_logit(self, cos: Tensor) -> Tensor:
        raise NotImplementedError

    def _compute(self, embeddings: Tensor, labels: Tensor):
        shard, proxies, labels = self._classes(labels)
        cos = self._class_cosine(embeddings, proxies)
        mine = shard.owned(labels)  # the margin goes on the target column, on its owner
        rows = torch.arange(len(labels), device=labels.device)[mine]
        local = labels[mine] - shard.lo
        logits = cos.index_put((rows, local), self._target_logit(cos[rows, local]))
        return shard.cross_entropy(self.scale * logits, labels), {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}, margin={self.margin:g}"


class ArcFaceLoss(_MarginSoftmaxLoss):
    """ArcFace (module docstring).

    Args:
        scale: s (64; 16-32 suit small embeddings and few classes better).
        margin: m in radians (0.5).
        proxy_lr_multiplier: the class weights' lr multiplier (default 2000, see
            ``nirdml.losses.base``).

    ``last_terms``: ``proxy``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 0.5, proxy_lr_multiplier: float | None = None,
                 shard=None, sample_rate: float = 1.0, seed: int = 0):
        super().__init__(num_classes, embedding_dim, scale, margin, proxy_lr_multiplier,
                         shard=shard, sample_rate=sample_rate, seed=seed)

    def _target_logit(self, cos: Tensor) -> Tensor:
        return arcface_logit(cos, self.margin)


class CosFaceLoss(_MarginSoftmaxLoss):
    """CosFace / large margin cosine loss (module docstring).

    Args:
        scale: s (64).
        margin: m (0.35), subtracted from the own class's cosine.
        proxy_lr_multiplier: the class weights' lr multiplier (default 2000).

    ``last_terms``: ``proxy``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 0.35, proxy_lr_multiplier: float | None = None,
                 shard=None, sample_rate: float = 1.0, seed: int = 0):
        super().__init__(num_classes, embedding_dim, scale, margin, proxy_lr_multiplier,
                         shard=shard, sample_rate=sample_rate, seed=seed)

    def _target_logit(self, cos: Tensor) -> Tensor:
        return cos - self.margin


class SubCenterArcFaceLoss(_MarginSoftmaxLoss):
    """Sub-center ArcFace: ``sub_centers`` weight vectors per class, a class's cosine is the
    best of them (module docstring).

    Args:
        sub_centers: K (3).
        scale, margin: as ArcFace (64, 0.5).
        proxy_lr_multiplier: the class weights' lr multiplier (default 2000).

    Sub-centres are stored class-major (rows ``c*K .. c*K+K-1`` of ``proxies``).
    ``class_proxies`` returns each sample's nearest sub-centre of its own class, as
    SoftTriple does (the choice carries no gradient, the chosen sub-centre does).
    ``last_terms``: ``proxy``.
    """

    def __init__(self, num_classes: int, embedding_dim: int, sub_centers: int = 3,
                 scale: float = 64.0, margin: float = 0.5,
                 proxy_lr_multiplier: float | None = None, shard=None,
                 sample_rate: float = 1.0, seed: int = 0):
        if int(sub_centers) < 1:
            raise ConfigError(f"sub_centers must be >= 1, got {sub_centers}")
        super().__init__(num_classes, embedding_dim, scale, margin, proxy_lr_multiplier,
                         proxies_per_class=int(sub_centers), shard=shard,
                         sample_rate=sample_rate, seed=seed)
        self.sub_centers = int(sub_centers)

    def _centre_cosines(self, embeddings: Tensor, proxies: Tensor) -> Tensor:
        """(B, C, K) cosine of each sample to every sub-centre of ``proxies``."""
        cos = F.normalize(embeddings, dim=1) @ F.normalize(proxies.to(embeddings.dtype),
                                                           dim=1).t()
        return cos.view(embeddings.shape[0], -1, self.sub_centers)

    def _class_cosine(self, embeddings: Tensor, proxies: Tensor) -> Tensor:
        return self._centre_cosines(embeddings, proxies).amax(dim=2)

    def _target_logit(self, cos: Tensor) -> Tensor:
        return arcface_logit(cos, self.margin)

    def class_proxies(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self._nearest_own_centre(embeddings, labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_centers={self.sub_centers}"
