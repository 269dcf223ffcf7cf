"""Embedding networks: a backbone, global pooling, a Linear (or MLP) head and L2 normalisation.

``build_model("resnet50", embedding_dim=128, pretrained=True)`` gives the NIR release's network
(ImageNet ResNet50, frozen BatchNorm statistics, average pooling, 2048 -> 128); its DoublePool
variant is ``pooling="double"`` (average + max).
"""

from nirdml.models import lite0  # noqa: F401 - registers efficientnet_lite0
from nirdml.models.backbones import BACKBONES, BackboneSpec, ResNetTrunk, SmallCNN, TimmTrunk
from nirdml.models.embedding import POOLINGS, EmbeddingModel, GlobalPool
from nirdml.models.factory import build_model, list_backbones

__all__ = [
    "BACKBONES",
    "POOLINGS",
    "BackboneSpec",
    "EmbeddingModel",
    "GlobalPool",
    "ResNetTrunk",
    "SmallCNN",
    "TimmTrunk",
    "build_model",
    "list_backbones",
]
