"""The flow's base distribution: what the NLL of ``z = flow(x | c)`` is measured under.

A :class:`BaseDistribution` turns the flow's output ``(z, log_det)`` into the per-sample NLL
(nats, the constant ``D/2 log 2 pi`` dropped), the way zuko keeps a transform apart from its
base. The flow itself only transforms. Registered by name in :data:`BASE_DISTRIBUTIONS` (the
config key ``loss.nir.base_scale``):

* ``standard``: ``N(0, I)``, the paper's: ``nll = 0.5 ||z||^2 - log_det``.
* ``sphere``: ``N(0, sigma^2 I)`` with ``sigma = 1 / sqrt(D)``, the per-coordinate spread of a
  unit vector, so the flow need not learn a global ``sqrt(D)`` expansion.
* ``learned``: one learnt ``log sigma`` (the parameter ``log_scale``), initialised at the
  sphere's; it trains with the flow's parameter group.

With ``sigma != 1``: ``nll = 0.5 ||z||^2 / sigma^2 + D log sigma - log_det``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nirdml.registry import Registry

#: Base distributions by name (``loss.nir.base_scale``).
BASE_DISTRIBUTIONS = Registry("NIR base_scale")


def standard_normal_nll(z: Tensor, log_det: Tensor) -> Tensor:
    """``0.5 ||z||^2 - log_det`` per row: the NLL under ``N(0, I)`` without its constant."""
    return 0.5 * z.square().sum(1) - log_det


class BaseDistribution(nn.Module):
    """``nll(z, log_det) -> (B,)`` under this base; ``log_scale`` is a tensor for the record
    (``last_terms["base_log_scale"]``) when the scale is learnt, else None."""

    learnt_scale: Tensor | None = None

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)

    def nll(self, z: Tensor, log_det: Tensor) -> Tensor:
        raise NotImplementedError


@BASE_DISTRIBUTIONS.register("standard")
class StandardNormal(BaseDistribution):
    """``N(0, I)`` (the paper's)."""

    def nll(self, z: Tensor, log_det: Tensor) -> Tensor:
        return standard_normal_nll(z, log_det)


class _ScaledNormal(BaseDistribution):
    """``N(0, sigma^2 I)`` with ``log sigma`` given by :meth:`log_sigma`."""

    def log_sigma(self, like: Tensor) -> Tensor:
        raise NotImplementedError

    def nll(self, z: Tensor, log_det: Tensor) -> Tensor:
        log_sigma = self.log_sigma(z)
        return (0.5 * z.square().sum(1) * torch.exp(-2.0 * log_sigma)
                + self.dim * log_sigma - log_det)


@BASE_DISTRIBUTIONS.register("sphere")
class SphereNormal(_ScaledNormal):
    """``sigma = 1 / sqrt(D)``: the per-coordinate spread of a unit vector."""

    def log_sigma(self, like: Tensor) -> Tensor:
        return torch.tensor(-0.5 * math.log(self.dim), dtype=like.dtype, device=like.device)


@BASE_DISTRIBUTIONS.register("learned")
class LearnedScaleNormal(_ScaledNormal):
    """One learnt ``log sigma`` (``log_scale``), initialised at the sphere's ``-log(D) / 2``."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.log_scale = nn.Parameter(torch.tensor(-0.5 * math.log(self.dim)))

    @property
    def learnt_scale(self) -> Tensor:
        return self.log_scale

    def log_sigma(self, like: Tensor) -> Tensor:
        return self.log_scale
