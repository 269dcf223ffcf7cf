"""The embedding network: backbone -> global pooling -> head (Linear or MLP) -> L2 normalisation.

``EmbeddingModel`` is backbone-agnostic: any module that maps images to a feature map
``(B, C, H, W)`` or to pooled features ``(B, C)`` can be wrapped. ``nirdml.models.build_model``
builds the named backbones (ResNets, a small CNN, timm models) around it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nirdml.errors import ConfigError, InputError

POOLINGS = ("avg", "max", "double")


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class GlobalPool(nn.Module):
    """Global spatial pooling of a ``(B, C, H, W)`` feature map to ``(B, C)``.

    ``"avg"``: average pooling; ``"max"``: max pooling; ``"double"``: average + max pooling
    summed (the NIR release's default). Already pooled ``(B, C)`` inputs pass through unchanged.
    """

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in POOLINGS:
            raise ConfigError(f"unknown pooling {mode!r}; choose one of: {', '.join(POOLINGS)}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x
        if x.dim() != 4:
            raise InputError(
                f"backbone output must be (B, C, H, W) or (B, C), got shape {tuple(x.shape)}"
            )
        if self.mode == "avg":
            pooled = F.adaptive_avg_pool2d(x, 1)
        elif self.mode == "max":
            pooled = F.adaptive_max_pool2d(x, 1)
        else:
            pooled = F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)
        return pooled.flatten(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _head(feature_dim: int, hidden: list[int], embedding_dim: int) -> nn.Module:
    """``Linear(feature_dim, embedding_dim)``, or an MLP through ``hidden`` widths with ReLU."""
    if not hidden:
        return nn.Linear(feature_dim, embedding_dim)
    layers: list[nn.Module] = []
    width = feature_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, embedding_dim))


class EmbeddingModel(nn.Module):
    """Backbone + global pooling + head + L2 normalisation.

    The head is ``Linear(feature_dim, embedding_dim)``, or with ``head_hidden=(h1, ...)`` an
    MLP ``Linear -> ReLU -> ... -> Linear`` through those widths.

    ``forward(images)`` returns float32 ``(B, embedding_dim)`` unit vectors (``F.normalize``
    with ``eps``, so an all-zero row gives zeros, never NaN). With ``freeze_bn=True`` every
    BatchNorm layer of the backbone stays in eval mode (running statistics fixed) even after
    ``model.train()``; its affine weight and bias still receive gradients.

    ``in_chans`` (optional) is the number of image channels ``forward`` accepts; inputs with
    another channel count raise ``InputError``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_dim: int = 128,
        pooling: str = "avg",
        freeze_bn: bool = False,
        in_chans: int | None = None,
        eps: float = 1e-12,
        head_hidden: tuple[int, ...] | list[int] = (),
    ):
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim <= 0:
            raise ConfigError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        if (
            isinstance(embedding_dim, bool)
            or not isinstance(embedding_dim, int)
            or embedding_dim <= 0
        ):
            raise ConfigError(
                f"model.embedding_dim must be a positive integer, got {embedding_dim!r}"
            )
        hidden = [int(h) for h in head_hidden]
        if any(h <= 0 for h in hidden):
            raise ConfigError(f"model.head_hidden must list positive widths, got {head_hidden!r}")
        self.backbone = backbone
        self.pool = GlobalPool(pooling)
        self.head = _head(feature_dim, hidden, embedding_dim)
        self.head_hidden = tuple(hidden)
        self.feature_dim = feature_dim
        self.embedding_dim = embedding_dim
        self.pooling = pooling
        self.in_chans = in_chans
        self.eps = eps
        self.freeze_bn = bool(freeze_bn)
        # Set by build_model: the keyword arguments that rebuild this architecture.
        self.build_config: dict = {}
        # Set by set_cut: (the trainable end of the backbone, the shape of its input), in a
        # tuple so that the end's modules are not registered a second time (state dict keys)
        self._cut: tuple[nn.Module, tuple[int, ...]] | None = None
        self.train(self.training)  # puts the BN layers into eval mode right away if frozen

    # ----------------------------------------------------------------- forward
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, feature_dim)``, before the head (not normalised).

        A 2-D input ``(B, feature_dim)`` is taken as features already pooled by this backbone
        (a frozen backbone's cached features, see ``nirdml.data.features``) and returned as is.
        """
        if self._cut is not None and images.dim() == 2 \
                and images.shape[1] == math.prod(self.cut_shape):
            return self.pool(self._cut[0](images.view(-1, *self.cut_shape)))
        if images.dim() == 2 and images.shape[1] == self.feature_dim:
            return images
        if images.dim() != 4:
            raise InputError(
                f"images must be a (B, C, H, W) tensor, got shape {tuple(images.shape)}"
            )
        if self.in_chans is not None and images.shape[1] != self.in_chans:
            raise InputError(
                f"model expects {self.in_chans}-channel images, got {images.shape[1]} channels "
                f"(shape {tuple(images.shape)}); set model.in_chans to match the data"
            )
        features = self.pool(self.backbone(images))
        if features.shape[1] != self.feature_dim:
            raise InputError(
                f"backbone produced {features.shape[1]} features, expected {self.feature_dim}"
            )
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.head(self.forward_features(images))
        return F.normalize(embeddings.float(), p=2.0, dim=1, eps=self.eps)

    # -------------------------------------------------------- parameter groups
    def backbone_parameters(self) -> list[nn.Parameter]:
        """All backbone parameters (frozen ones included, so optimiser groups stay stable)."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """All parameters outside the backbone (the Linear embedding head)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone_ids]

    # ------------------------------------------------------------- freezing
    def set_cut(self, trainable: nn.Module, shape: tuple[int, ...]) -> None:
        """Train only ``trainable``, the end of the backbone (``split_trunk``), on its cached
        input: ``forward`` then also takes rows of ``prod(shape)`` numbers (that input,
        flattened) and runs them through ``trainable`` and the pooling. Images still go
        through the whole backbone."""
        own = {id(p) for p in self.backbone.parameters()}
        if not all(id(p) in own for p in trainable.parameters()):
            raise ConfigError("set_cut: the trainable part must be modules of this backbone")
        self._cut = (trainable, tuple(int(d) for d in shape))

    @property
    def cut_shape(self) -> tuple[int, ...] | None:
        """The shape of the cached input of the trainable end (``set_cut``), or None."""
        return None if self._cut is None else self._cut[1]

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Turn ``requires_grad`` off (``frozen=True``) or on for the backbone's parameters:
        all of them, or with a cut (:meth:`set_cut`) the trainable end's only.

        Used for the warm-up epochs where only the head, proxies and flow train. BatchNorm
        running statistics are governed by ``freeze_bn`` / train mode, not by this switch.
        """
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen and self._cut is None)
        if not frozen and self._cut is not None:
            for p in self._cut[0].parameters():
                p.requires_grad_(True)

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter requires a gradient."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if _is_batchnorm(module):
                    module.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, embedding_dim={self.embedding_dim}, "
            f"pooling={self.pooling!r}, freeze_bn={self.freeze_bn}, in_chans={self.in_chans}"
        )
