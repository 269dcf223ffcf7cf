"""Every name and option of a :class:`~nirdml.training.config.Config`, checked before any work.

``Config.validate`` calls :func:`check_components` after its range rules. Each component is
checked by the registry that builds it (``Registry.check``: the name, then the option keys
against the factory's signature), so the allowed values in a message are always the registered
ones, a newly registered component included. Option *values* are checked by the components
themselves: the objective (proxy loss, NIR term, base, perturbation, flow) is built once, on
two classes and with torch's random state restored afterwards, so a bad value fails here with
the component's own message instead of after the dataset scan. Dataset and backbone values are
checked when they are built (a backbone may download weights; a dataset reads files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.errors import ConfigError

if TYPE_CHECKING:
    from nirdml.training.config import Config

#: arguments ``load_splits`` passes to every dataset loader itself
DATASET_ARGUMENTS = ("root", "seed", "on_error")
#: arguments ``build_model`` passes to every backbone factory itself
BACKBONE_ARGUMENTS = ("pretrained", "weights_path", "in_chans")
#: arguments ``build_criterion`` passes to every loss itself
LOSS_ARGUMENTS = ("num_classes", "embedding_dim", "shard", "sample_rate", "seed")


def check_components(cfg: Config) -> None:
    """ConfigError (one line, naming the key and what is allowed) for the first bad name,
    option key or option value of ``cfg``'s data, model, loss, NIR and metrics."""
    _check_data(cfg)
    _check_model(cfg)
    _check_loss(cfg)
    _check_nir(cfg)
    _check_metrics(cfg)
    _dry_build_objective(cfg)


def _check_data(cfg: Config) -> None:
    from nirdml.data.datasets import DATASETS

    DATASETS.check(cfg.data.name, cfg.data.options, key="data.name",
                   options_key="data.options", fixed=DATASET_ARGUMENTS)


def _check_model(cfg: Config) -> None:
    from nirdml.models.backbones import BACKBONES
    from nirdml.models.factory import TIMM_PREFIX, list_backbones

    name = cfg.model.name
    if name.lower().startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return  # any timm model; timm checks its name and options when it builds it
    if name.lower() == TIMM_PREFIX.rstrip(":") or name not in BACKBONES:
        raise ConfigError(f"invalid value for model.name: {name!r}; allowed values: "
                          f"{', '.join(map(repr, list_backbones()))}")
    BACKBONES.check(name, cfg.model.options, key="model.name", options_key="model.options",
                    fixed=BACKBONE_ARGUMENTS)


def _check_loss(cfg: Config) -> None:
    from nirdml.losses import LOSSES, PROXY_LOSSES

    LOSSES.check(cfg.loss.name, cfg.loss.options, key="loss.name",
                 options_key="loss.options", fixed=LOSS_ARGUMENTS)
    if cfg.loss.name in PROXY_LOSSES:
        return
    if cfg.optim.proxy_update != "dense":
        raise ConfigError(
            f"optim.proxy_update={cfg.optim.proxy_update!r} updates class proxies, but "
            f"loss.name={cfg.loss.name!r} is a pair-based loss without proxies; use a proxy "
            f"loss ({', '.join(PROXY_LOSSES)}) or set optim.proxy_update=dense")
    if cfg.loss.shard or cfg.loss.sample_rate != 1.0:
        key = "loss.shard=true" if cfg.loss.shard else f"loss.sample_rate={cfg.loss.sample_rate:g}"
        raise ConfigError(
            f"{key} splits or samples class proxies, but loss.name={cfg.loss.name!r} is a "
            f"pair-based loss without proxies; use a proxy loss ({', '.join(PROXY_LOSSES)}) "
            f"or set loss.shard=false and loss.sample_rate=1")
    if cfg.loss.nir.enabled:
        raise ConfigError(
            f"loss.nir.enabled=true needs class proxies to condition NIR's flow on, but "
            f"loss.name={cfg.loss.name!r} is a pair-based loss without proxies; use a "
            f"proxy loss ({', '.join(PROXY_LOSSES)}) or set loss.nir.enabled=false")
    if cfg.loss.proxy_lr_multiplier is not None:
        raise ConfigError(
            f"loss.proxy_lr_multiplier={cfg.loss.proxy_lr_multiplier:g} applies to "
            f"proxy losses, but loss.name={cfg.loss.name!r} has no proxies; set "
            f"loss.proxy_lr_multiplier=null")


def _check_nir(cfg: Config) -> None:
    from nirdml.nir.base import BASE_DISTRIBUTIONS
    from nirdml.nir.conditioning import CONDITIONINGS
    from nirdml.nir.perturbation import PERTURBATIONS
    from nirdml.nir.regularizer import other_term_options, term_options
    from nirdml.nir.terms import NIR_TERMS

    nir = cfg.loss.nir
    NIR_TERMS.check(nir.mode, key="loss.nir.mode")
    BASE_DISTRIBUTIONS.check(nir.base_scale, key="loss.nir.base_scale")
    PERTURBATIONS.check(nir.noise_kind, key="loss.nir.noise_kind")
    if nir.cond_mode not in CONDITIONINGS:
        raise ConfigError(f"invalid value for loss.nir.cond_mode: {nir.cond_mode!r}; allowed "
                          f"values: {', '.join(map(repr, CONDITIONINGS))}")
    defaults = type(nir)()
    for key in sorted(other_term_options(nir.mode)):
        value = getattr(nir, key, None)
        if value != getattr(defaults, key, value):
            modes = [m for m in NIR_TERMS.names() if key in term_options(NIR_TERMS.get(m))]
            raise ConfigError(
                f"invalid key loss.nir.{key}={value!r} with loss.nir.mode={nir.mode!r}: it "
                f"applies to loss.nir.mode={' or '.join(modes)}; remove it or change the mode")


def _check_metrics(cfg: Config) -> None:
    from nirdml.evaluation import parse_metrics

    try:
        keys = parse_metrics(cfg.eval.metrics, cfg.eval.recall_ks).keys()
    except ConfigError as exc:
        raise ConfigError(f"invalid value for eval.metrics: {exc}") from None
    metric = cfg.train.selection_metric
    if cfg.train.select_on != "last" and metric not in keys:
        raise ConfigError(f"invalid value for train.selection_metric: {metric!r}; allowed "
                          f"values (what eval.metrics and eval.recall_ks compute): "
                          f"{', '.join(map(repr, keys))}")


def _dry_build_objective(cfg: Config) -> None:
    """Build the loss (and NIR around it) on two classes: its constructors check every option
    value. Torch's random state is restored, so the real run draws what it would have."""
    import torch

    from nirdml.training.builders import build_criterion

    with torch.random.fork_rng(devices=[]):
        build_criterion(cfg, 2)
