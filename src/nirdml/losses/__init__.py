"""Proxy-based DML losses: ProxyAnchor, ProxyNCA(++), SoftTriple and NormSoftmax.

Every loss is a ``ProxyLoss``: ``forward(embeddings, labels) -> scalar``, ``proxies``,
``last_terms``, ``class_proxies`` (what NIR conditions on) and ``param_groups``. Build one by
name with ``build_loss(name, num_classes, embedding_dim, **kwargs)``.
"""

from __future__ import annotations

from nirdml.losses.base import DEFAULT_PROXY_LR_MULTIPLIER, ProxyLoss
from nirdml.losses.norm_softmax import NormSoftmaxLoss
from nirdml.losses.proxy_anchor import ProxyAnchorLoss
from nirdml.losses.proxy_nca import ProxyNCALoss
from nirdml.losses.soft_triple import SoftTripleLoss
from nirdml.registry import Registry

LOSSES = Registry("loss")
LOSSES.register("proxy_anchor")(ProxyAnchorLoss)
LOSSES.register("proxy_nca")(ProxyNCALoss)
LOSSES.register("soft_triple")(SoftTripleLoss)
LOSSES.register("norm_softmax")(NormSoftmaxLoss)


def build_loss(name: str, num_classes: int, embedding_dim: int, **kwargs) -> ProxyLoss:
    """Build a registered loss; keyword arguments that are ``None`` keep the loss's defaults."""
    return LOSSES.build(name, num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)


__all__ = [
    "DEFAULT_PROXY_LR_MULTIPLIER",
    "LOSSES",
    "NormSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "build_loss",
]
