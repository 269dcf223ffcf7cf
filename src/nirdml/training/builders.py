"""Turn a :class:`Config` into the objects a run needs: data, model, objective, optimiser."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from nirdml.devices import autocast, resolve_device  # noqa: F401 - used as builders.*
from nirdml.training.config import Config


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_splits(cfg: Config):
    """Load the dataset splits named by ``cfg.data``, check every image file (see
    ``nirdml.data.scan``) and attach the matching transforms."""
    from nirdml.data import build_transforms, load_splits
    from nirdml.data.scan import scan_splits

    splits = load_splits(
        cfg.data.name,
        root=cfg.data.root,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        on_error=cfg.data.on_error,
        folds=cfg.data.folds,
        fold=cfg.data.fold,
        train_classes=cfg.data.train_classes,
        class_seed=cfg.data.class_seed,
        **cfg.data.options,
    )
    # unreadable files: found now (not mid-training), dropped or fatal, never substituted
    splits, dropped = scan_splits(splits, cfg.data.on_error)
    splits.unreadable_dropped = dropped
    for ds in (splits.val, splits.test):
        if ds is not None:
            ds.substitute = False  # evaluation never replaces an image by another
    splits.train.transform = build_transforms(splits.image_kind, train=cfg.data.augment,
                                              image_size=cfg.data.image_size)
    for ds in (splits.val, splits.test):
        if ds is not None:
            ds.transform = build_transforms(splits.image_kind, train=False,
                                            image_size=cfg.data.image_size)
    return splits


def measure_preprocessing(cfg: Config, splits, in_chans: int):
    """The :class:`~nirdml.data.preprocessing.Preprocessing` record of a run (what its
    checkpoints carry), measured on training images through the evaluation transform."""
    import copy

    from nirdml.data import build_transforms
    from nirdml.data.preprocessing import Preprocessing

    train = copy.copy(splits.train)  # the same images, the evaluation transform
    train.transform = build_transforms(splits.image_kind, train=False,
                                       image_size=cfg.data.image_size)
    return Preprocessing.measure(train, splits.image_kind, in_chans, cfg.data.image_size,
                                 splits.invert_files, seed=cfg.seed)


def build_feature_splits(cfg: Config, model: nn.Module, splits, device: torch.device,
                         dist=None):
    """Every split as cached features of the frozen backbone of ``model``
    (``model.frozen_backbone``; ``nirdml.data.features``). Under torchrun rank 0 computes
    and caches them first, then the others read the cache."""
    from nirdml.data import build_transforms
    from nirdml.data.features import feature_splits

    transform = build_transforms(splits.image_kind, train=False, image_size=cfg.data.image_size)
    if cfg.model.trainable_blocks:  # the input of the trainable end, flattened
        from nirdml.models.backbones import split_trunk

        frozen, trainable = split_trunk(model.backbone, cfg.model.trainable_blocks)
        splits.train.transform = transform  # as feature_splits encodes it
        sample = splits.train[0][0]
        with torch.no_grad():
            was = frozen.training
            shape = tuple(frozen.eval()(sample[None].to(device)).shape[1:])
            frozen.train(was)
        model.set_cut(trainable, shape)
        encoder = torch.nn.Sequential(frozen, torch.nn.Flatten())
    else:
        encoder = torch.nn.Sequential(model.backbone, model.pool)
    model_cfg = dataclasses.asdict(cfg.model)
    for key in ("embedding_dim", "head_hidden", "frozen_backbone", "freeze_bn"):
        model_cfg.pop(key)  # the head does not change the features
    if not model_cfg["trainable_blocks"]:
        model_cfg.pop("trainable_blocks")  # keeps the keys of the pooled-feature caches
    data_keys = ["name", "root", "options", "image_size", "val_fraction"]
    if cfg.data.folds:  # only then: keeps the cache keys of runs without folds
        data_keys += ["folds", "fold"]
    if cfg.data.train_classes is not None:  # likewise (the split content differs anyway)
        data_keys += ["train_classes", "class_seed"]
    description = {"data": {k: getattr(cfg.data, k) for k in data_keys},
                   "seed": cfg.seed, "model": model_cfg}
    is_main = dist is None or dist.is_main

    def build():
        return feature_splits(encoder, splits, transform, device, cfg.data.feature_cache,
                              description, cfg.data.eval_batch_size, cfg.data.num_workers,
                              progress=cfg.train.progress and is_main)

    if dist is None:
        return build()
    if is_main:
        out = build()
        dist.barrier()
        return out
    dist.barrier()  # rank 0 has written the cache
    return build()


def build_probe(cfg: Config, splits):
    """The fixed training-class subset the NIR mechanism metrics are computed on
    (``nirdml.nir.monitor``), or None with ``train.probe_classes=0``."""
    if cfg.train.probe_classes == 0:
        return None
    from nirdml.data import build_transforms
    from nirdml.nir.monitor import MechanismProbe

    transform = None if splits.image_kind == "features" else build_transforms(
        splits.image_kind, train=False, image_size=cfg.data.image_size)
    return MechanismProbe(splits.train, transform, cfg.train.probe_classes,
                          cfg.train.probe_per_class, seed=cfg.seed,
                          batch_size=cfg.data.eval_batch_size)


def build_model(cfg: Config, in_chans: int | None = None) -> nn.Module:
    """The embedding network named by ``cfg.model``."""
    from nirdml.models import build_model as _build

    return _build(
        cfg.model.name,
        embedding_dim=cfg.model.embedding_dim,
        pretrained=cfg.model.pretrained,
        pooling=cfg.model.pooling,
        freeze_bn=cfg.model.freeze_bn,
        weights_path=cfg.model.weights_path,
        in_chans=in_chans,
        head_hidden=cfg.model.head_hidden,
        **cfg.model.options,
    )


def build_criterion(cfg: Config, num_classes: int, dist=None) -> nn.Module:
    """The proxy loss, wrapped in :class:`NIRLoss` when ``loss.nir.enabled``. With
    ``loss.shard`` its proxies are this rank's shard of ``dist`` (``training.sharding``; the
    whole table on one process or without ``dist``)."""
    from nirdml.losses import build_loss
    from nirdml.training.sharding import proxy_loss_options

    kwargs: dict[str, Any] = dict(cfg.loss.options)
    if cfg.loss.proxy_lr_multiplier is not None:
        kwargs["proxy_lr_multiplier"] = cfg.loss.proxy_lr_multiplier
    kwargs.update(proxy_loss_options(cfg, num_classes, dist))
    base = build_loss(cfg.loss.name, num_classes=num_classes,
                      embedding_dim=cfg.model.embedding_dim, **kwargs)
    if not cfg.loss.nir.enabled:
        return base
    from nirdml.nir.regularizer import NIRLoss, other_term_options

    options = dataclasses.asdict(cfg.loss.nir)
    del options["enabled"]
    for key in other_term_options(options["mode"]):  # left at their defaults (Config.validate)
        options.pop(key, None)
    return NIRLoss.from_options(base, **options)


def build_optimizer(cfg: Config, model: nn.Module, criterion: nn.Module) -> torch.optim.Optimizer:
    """Adam/AdamW over backbone, head, proxies and flow, each group with its own lr (with
    ``optim.proxy_update=rows``, the proxies' group updates only rows with a gradient)."""
    o = cfg.optim
    groups = [
        {"name": "backbone", "params": list(model.backbone_parameters()),
         "lr": o.lr * o.backbone_lr_multiplier, "weight_decay": o.weight_decay},
        {"name": "head", "params": list(model.head_parameters()),
         "lr": o.lr, "weight_decay": o.weight_decay},
        *criterion.param_groups(o.lr),
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    if o.proxy_update == "rows":   # only the proxy rows that got a gradient move
        from nirdml.training.row_adam import RowAdam, RowAdamW

        for g in groups:
            g["rows"] = g["name"] == "proxies"
        return (RowAdamW if o.name == "adamw" else RowAdam)(groups, lr=o.lr)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, fused=o.fused or None)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    """Per-epoch learning-rate schedule (or ``None``)."""
    o = cfg.optim
    if o.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=o.milestones,
                                                    gamma=o.gamma)
    if o.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return None
