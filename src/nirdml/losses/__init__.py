"""Deep metric learning losses.

Proxy losses (``ProxyLoss``: ``proxies``, ``class_proxies`` -- what NIR conditions on -- and
``param_groups``): ProxyAnchor, ProxyNCA(++), SoftTriple, NormSoftmax, and the margin-softmax
losses ArcFace, CosFace and Sub-center ArcFace (their class weights are the proxies).

Pair-based losses (``PairLoss``, no proxies, so NIR cannot wrap them), each with its miner:
contrastive, triplet (semi-hard mining), multi-similarity (MS mining) and margin
(distance-weighted sampling).

Every loss has ``forward(embeddings, labels) -> scalar``, ``last_terms`` (detached; key
``"proxy"`` is the total) and ``param_groups(lr)``. Build one by name with
``build_loss(name, num_classes, embedding_dim, **kwargs)``; ``PROXY_LOSSES`` lists the names
NIR accepts.
"""

from __future__ import annotations

from nirdml.losses.base import DEFAULT_PROXY_LR_MULTIPLIER, MetricLoss, ProxyLoss
from nirdml.losses.contrastive import ContrastiveLoss
from nirdml.losses.margin import MarginLoss
from nirdml.losses.margin_softmax import ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss
from nirdml.losses.multi_similarity import MultiSimilarityLoss
from nirdml.losses.norm_softmax import NormSoftmaxLoss
from nirdml.losses.pairs import PairLoss
from nirdml.losses.proxy_anchor import ProxyAnchorLoss
from nirdml.losses.proxy_nca import ProxyNCALoss
from nirdml.losses.soft_triple import SoftTripleLoss
from nirdml.losses.triplet import TripletLoss
from nirdml.registry import Registry

LOSSES = Registry("loss")
LOSSES.register("proxy_anchor")(ProxyAnchorLoss)
LOSSES.register("proxy_nca")(ProxyNCALoss)
LOSSES.register("soft_triple")(SoftTripleLoss)
LOSSES.register("norm_softmax")(NormSoftmaxLoss)
LOSSES.register("arcface")(ArcFaceLoss)
LOSSES.register("cosface")(CosFaceLoss)
LOSSES.register("subcenter_arcface")(SubCenterArcFaceLoss)
LOSSES.register("contrastive")(ContrastiveLoss)
LOSSES.register("triplet")(TripletLoss)
LOSSES.register("multi_similarity")(MultiSimilarityLoss)
LOSSES.register("margin")(MarginLoss)


def is_proxy_loss(name: str) -> bool:
    """Whether the registered loss ``name`` has class proxies (so NIR can wrap it)."""
    factory = LOSSES.get(name)
    return isinstance(factory, type) and issubclass(factory, ProxyLoss)


#: the registered losses with class proxies, the ones NIR can wrap
PROXY_LOSSES = tuple(n for n in LOSSES.names() if is_proxy_loss(n))


def build_loss(name: str, num_classes: int, embedding_dim: int, **kwargs) -> MetricLoss:
    """Build a registered loss; keyword arguments that are ``None`` keep the loss's defaults."""
    return LOSSES.build(name, num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)


__all__ = [
    "DEFAULT_PROXY_LR_MULTIPLIER",
    "LOSSES",
    "PROXY_LOSSES",
    "ArcFaceLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "MarginLoss",
    "MetricLoss",
    "MultiSimilarityLoss",
    "NormSoftmaxLoss",
    "PairLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "SubCenterArcFaceLoss",
    "TripletLoss",
    "build_loss",
    "is_proxy_loss",
]
