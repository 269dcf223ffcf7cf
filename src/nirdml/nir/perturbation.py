"""Input perturbations of the flow in training: ``x <- normalize(x + e)``.

Noise bounds the density any flow can reach on the data (a flow can otherwise shrink a class
towards a point). Registered by name in :data:`PERTURBATIONS` (``loss.nir.noise_kind``; the
scale is ``loss.nir.noise``, 0 = none):

* ``gaussian``: ``e ~ N(0, scale^2 I)``;
* ``uniform``: ``e ~ U(-scale, scale)^D`` (the release's unused ``loss_nir_noise``).

Both draw from torch's global generator, once per training step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nirdml.errors import ConfigError
from nirdml.registry import Registry

#: Input perturbations by name (``loss.nir.noise_kind``).
PERTURBATIONS = Registry("NIR noise_kind")


class Perturbation:
    """``perturb(x) -> normalize(x + noise(x))`` of unit vectors ``x`` (B, D)."""

    def __init__(self, scale: float):
        scale = float(scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"invalid value for loss.nir.noise: {scale}; must be a finite "
                              f"number >= 0 (the noise scale; 0 turns input noise off)")
        self.scale = scale

    def noise(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return F.normalize(x + self.noise(x), dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale:g})"


@PERTURBATIONS.register("gaussian")
class GaussianNoise(Perturbation):
    """``e ~ N(0, scale^2 I)``."""

    def noise(self, x: Tensor) -> Tensor:
        return torch.randn_like(x) * self.scale


@PERTURBATIONS.register("uniform")
class UniformNoise(Perturbation):
    """``e ~ U(-scale, scale)^D``."""

    def noise(self, x: Tensor) -> Tensor:
        return (torch.rand_like(x) * 2.0 - 1.0) * self.scale
