"""``build_model`` and ``list_backbones``: named backbones wrapped into an ``EmbeddingModel``."""

from __future__ import annotations

import fnmatch
from typing import Any

from nirdml.errors import ConfigError
from nirdml.models.backbones import BACKBONES, BackboneSpec
from nirdml.models.embedding import POOLINGS, EmbeddingModel

TIMM_PREFIX = "timm:"


def list_backbones(pattern: str = "*") -> list[str]:
    """Names accepted by ``build_model`` that match the glob ``pattern``.

    Registered names are listed with ``timm:<model name>`` standing for every timm model;
    a pattern starting with ``timm:`` (e.g. ``"timm:resnet*"``) lists concrete timm models.
    """
    if pattern.lower().startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError as exc:
            raise ConfigError("listing timm models needs the optional package timm") from exc
        return [TIMM_PREFIX + n for n in timm.list_models(pattern[len(TIMM_PREFIX) :] or "*")]
    names = [TIMM_PREFIX + "<model name>" if n == "timm" else n for n in BACKBONES.names()]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern.lower()))


def _backbone_spec(name: str, options: dict[str, Any]) -> BackboneSpec:
    """The registered backbone ``name`` (or ``timm:<model>``) built with ``options``."""
    key = name.strip()
    if key.lower().startswith(TIMM_PREFIX):
        options["model_name"] = key[len(TIMM_PREFIX) :]
        key = "timm"
    elif key.lower() == "timm" or key not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}"
        )
    try:
        return BACKBONES.build(key, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(f"invalid option for backbone {name!r}: {exc}") from exc


def build_model(
    name: str,
    embedding_dim: int = 128,
    pretrained: bool = False,
    pooling: str = "avg",
    freeze_bn: bool | None = None,
    weights_path: str | None = None,
    in_chans: int | None = None,
    head_hidden: list[int] | tuple[int, ...] = (),
    **kw: Any,
) -> EmbeddingModel:
    """Build ``backbone -> pooling -> Linear(feature_dim, embedding_dim) -> L2-normalise``.

    ``name``: ``resnet50``, ``resnet18``, ``small_cnn``, ``efficientnet_lite0`` or
    ``timm:<model name>``. ``head_hidden`` makes the head an MLP through those widths.
    ``freeze_bn=None`` takes the backbone's default (True for ResNets, else False).
    ``weights_path`` loads a local state dict instead of downloading (``pretrained`` is then
    irrelevant). ``in_chans=None`` takes the backbone's default (3; 1 for ``small_cnn``).
    Extra keyword arguments go to the backbone factory (timm: to ``timm.create_model``).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name must be a backbone name, got {name!r}")
    if pooling not in POOLINGS:
        raise ConfigError(
            f"unknown model.pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}"
        )
    if in_chans is not None and (
        isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans <= 0
    ):
        raise ConfigError(f"model.in_chans must be a positive integer, got {in_chans!r}")
    spec = _backbone_spec(name, dict(kw, pretrained=bool(pretrained),
                                     weights_path=weights_path, in_chans=in_chans))
    model = EmbeddingModel(
        spec.module,
        feature_dim=spec.feature_dim,
        embedding_dim=embedding_dim,
        pooling=pooling,
        freeze_bn=spec.freeze_bn if freeze_bn is None else bool(freeze_bn),
        in_chans=spec.in_chans,
        head_hidden=head_hidden,
    )
    model.build_config = dict(
        kw,
        name=name,
        embedding_dim=embedding_dim,
        pooling=pooling,
        freeze_bn=model.freeze_bn,
        in_chans=spec.in_chans,
        head_hidden=list(model.head_hidden),
    )
    return model
