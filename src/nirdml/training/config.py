"""Typed, validated run configuration: dataclasses <-> YAML, with dotted CLI overrides.

A run is fully described by one :class:`Config`. It is read from YAML (``Config.from_yaml``),
changed with ``key.sub=value`` overrides (``Config.with_overrides``) and written back resolved
(``Config.to_yaml``). Unknown keys and invalid values raise :class:`ConfigError` naming the key and
what is allowed. Written by hand (rather than with hydra/omegaconf) to keep the core dependency
free and the error messages ours.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from nirdml.errors import ConfigError


@dataclass
class DataConfig:
    """Which dataset, how it is split, batched and loaded.

    ``augment``: random augmentation of the training images (``false``: the evaluation
    transform for training too). ``feature_cache``: folder of cached backbone features
    (``model.frozen_backbone``); default ``$NIRDML_CACHE/features`` or
    ``~/.cache/nirdml/features``. ``folds``/``fold``: cross-validation (``nirdml crossval``):
    with ``folds >= 2`` the training classes are split into ``folds`` seeded, class-disjoint
    folds and fold number ``fold`` is the validation split (``val_fraction`` is then unused).
    ``train_classes``: train on a seeded draw of that many of the training classes (null: all),
    the validation classes then held out of them; ``class_seed`` seeds the draw (not ``seed``,
    so every seed of a study sees the same classes; ``nirdml.data.base.draw_classes``).
    """

    name: str = "cub200"
    root: str | None = None
    val_fraction: float = 0.1
    folds: int = 0
    fold: int = 0
    train_classes: int | None = None
    class_seed: int = 0
    image_size: int | None = None
    augment: bool = True
    on_error: Literal["skip", "fail"] = "skip"
    batch_size: int = 90
    samples_per_class: int = 2
    num_workers: int = 0
    eval_batch_size: int = 256
    feature_cache: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The embedding network (see ``nirdml.models.build_model``).

    ``head_hidden``: widths of an MLP head (empty: one Linear layer). ``frozen_backbone``: the
    backbone never trains; its pooled features of every split are computed once, without
    augmentation, and cached on disk (``data.feature_cache``), and only the head, proxies and
    flow train on them (``nirdml.data.features``). ``trainable_blocks`` (with
    ``frozen_backbone``): the backbone's last that many blocks train too, on their cached input
    (``nirdml.models.backbones.split_trunk``): fine-tuning the end of a pretrained trunk at the
    cost of that end only.
    """

    name: str = "resnet50"
    embedding_dim: int = 128
    pretrained: bool = True
    pooling: Literal["avg", "max", "double"] = "avg"
    freeze_bn: bool | None = None
    weights_path: str | None = None
    head_hidden: list[int] = field(default_factory=list)
    frozen_backbone: bool = False
    trainable_blocks: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class NIRConfig:
    """The Non-isotropy regulariser and its conditional flow (``nirdml.nir.NIRLoss``).

    Every key but ``enabled`` is an option of ``NIRLoss.from_options`` of the same name: of
    the term (``mode``, a registered name of ``nirdml.nir.terms.NIR_TERMS``, with ``weight``,
    ``per_dim`` and the disc term's ``negatives``, ``nll_weight``), the base distribution
    (``base_scale``), the input perturbation (``noise``, ``noise_kind``), the flow (its sizes
    and ``cond_mode``) or NIRLoss itself. ``docs/nir_variants.md`` explains the variants.
    """

    enabled: bool = True
    weight: float = 0.0075
    mode: str = "release"
    per_dim: bool = False
    noise: float = 0.0
    noise_kind: str = "gaussian"
    base_scale: str = "standard"
    warmup_epochs: int = 0
    negatives: int = 1
    nll_weight: float = 0.0
    flow_lr_multiplier: float = 50.0
    cuda_graphs: bool = False
    num_blocks: int = 5
    subnet_depth: int = 8
    subnet_width: int = 128
    clamp: float = 2.0
    cond_mode: str = "dense"


@dataclass
class LossConfig:
    """The proxy loss (``nirdml.losses``) and, optionally, NIR around it.

    ``shard``: under ``torchrun``, split the proxies (and their optimiser state) across the
    ranks by contiguous class ranges, each rank computing its shard's part of the loss with
    exact distributed reductions (``nirdml.losses.shard``); the loss on one process. Proxies
    of a sharded run are initialised block by block from ``seed``, the same on any world size.
    ``sample_rate`` (in (0, 1]): each rank keeps the classes of the global batch that it owns
    plus a seeded uniform sample of its other classes, up to ``sample_rate`` x its shard
    (Partial FC's rule; each loss's docstring says how its value changes). Proxy losses only.
    ``docs/scaling.md`` has the memory and communication model.
    """

    name: str = "proxy_anchor"
    proxy_lr_multiplier: float | None = None
    shard: bool = False
    sample_rate: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    nir: NIRConfig = field(default_factory=NIRConfig)


@dataclass
class OptimConfig:
    """Optimiser, schedule, warm-up and clipping."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-5
    backbone_lr_multiplier: float = 1.0
    weight_decay: float = 4e-4
    scheduler: Literal["none", "multistep", "cosine"] = "none"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.2
    warmup_epochs: int = 1
    grad_clip: float | None = None
    #: how the proxies are updated: ``dense`` (torch's Adam/AdamW over every row) or ``rows``
    #: (only the rows that got a gradient this step: with ``loss.sample_rate`` < 1 the dense
    #: update over 10^6 rows costs more than the sampled loss; ``nirdml.training.row_adam``,
    #: a different optimiser: a skipped row keeps its value and moments)
    proxy_update: Literal["dense", "rows"] = "dense"
    #: torch's fused Adam/AdamW kernel (one pass over each parameter instead of several
    #: multi-tensor passes: the same update up to float rounding, 3.6x faster on the flow's
    #: 1.4M parameters on a CPU core); false: the multi-tensor implementation
    fused: bool = True


@dataclass
class TrainConfig:
    """The loop: epochs, device, precision, model selection, fault tolerance, logging."""

    epochs: int = 100
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    eval_every: int = 1
    select_on: Literal["val", "test", "last"] = "val"
    selection_metric: str = "recall@1"
    max_bad_steps: int = 20
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nirdml"
    progress: bool = True
    deterministic: bool = False
    probe_classes: int = 64
    probe_per_class: int = 4
    keep_host_memory: bool = True


@dataclass
class EvalConfig:
    """Which metrics the validation and final test evaluations compute."""

    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    metrics: list[str] = field(
        default_factory=lambda: ["recall", "map@r", "r_precision", "map@1000", "nmi"]
    )


@dataclass
class Config:
    """Everything one training run needs; YAML on disk, overridable from the CLI.

    The defaults are the released NIR recipe (ResNet50, 128-d, ProxyAnchor + NIR, Adam 1e-5,
    batch 90 of 2 samples per class); the shipped configs in ``nirdml/configs`` override them.
    """

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, validate: bool = True) -> Config:
        """The config of ``data`` (keys and types checked); with ``validate`` (the default)
        every other check too (:meth:`validate`). ``validate=False`` is for a config that is
        changed before use and validated then (``load_config``: once per entry point)."""
        cfg = _from_dict(cls, data or {}, prefix="")
        if validate:
            cfg.validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, validate: bool = True) -> Config:
        data = read_yaml(path, "config file")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        return cls.from_dict(data, validate=validate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_overrides(self, overrides: list[str] | None) -> Config:
        """Return a copy with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
        values: dict[str, Any] = {}
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key.sub=value")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except (yaml.YAMLError, RecursionError, ValueError):
                value = raw
            values[key.strip()] = value
        return self.with_values(values)

    def with_values(self, values: dict[str, Any]) -> Config:
        """Return a copy with ``{"a.b.c": value}`` set (values as they are, then validated);
        ConfigError naming the allowed keys for an unknown one."""
        data = self.to_dict()
        for key, value in values.items():
            node = data
            parts = key.split(".")
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(_unknown_key(".".join(parts[: i + 1]), node))
                node = node[part]
            last = parts[-1]
            is_free_mapping = isinstance(node, dict) and len(parts) >= 2 and parts[-2] == "options"
            if not isinstance(node, dict) or (last not in node and not is_free_mapping):
                raise ConfigError(_unknown_key(key, node))
            node[last] = value
        return Config.from_dict(data)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Every check of the settings, before any work (run by every construction): value
        ranges that types alone cannot express, then each registered name and its options
        against the registries and the factories' signatures, the metrics, and a dry build of
        the objective (``nirdml.training.checks``). A one-line ConfigError naming the key."""
        for ok, key, allowed in self._range_checks():
            if not ok:
                raise ConfigError(f"invalid value for {key}: must be {allowed}")
        if self.optim.scheduler == "multistep" and not self.optim.milestones:
            raise ConfigError("optim.milestones must list epochs when optim.scheduler=multistep")
        if self.data.folds == 1 or self.data.folds < 0:
            raise ConfigError("invalid value for data.folds: must be 0 (no cross-validation: "
                              "data.val_fraction holds out the validation classes) or >= 2")
        if self.data.folds and not 0 <= self.data.fold < self.data.folds:
            raise ConfigError(f"invalid value for data.fold: must be in [0, data.folds="
                              f"{self.data.folds}), got {self.data.fold}")
        from nirdml.training import checks  # late: the registries import torch

        checks.check_components(self)

    def _range_checks(self) -> list[tuple[bool, str, str]]:
        """``(holds, key, what the key must be)`` for every single-value range rule."""
        return [
            (self.data.batch_size > 0, "data.batch_size", "a positive integer"),
            (self.data.samples_per_class > 0, "data.samples_per_class", "a positive integer"),
            (
                self.data.samples_per_class > 0
                and self.data.batch_size % self.data.samples_per_class == 0,
                "data.batch_size",
                f"a multiple of data.samples_per_class ({self.data.samples_per_class})",
            ),
            (0.0 <= self.data.val_fraction < 1.0, "data.val_fraction", "in [0, 1)"),
            (self.data.train_classes is None or self.data.train_classes >= 2,
             "data.train_classes", ">= 2 (two classes to train on) or null (every class)"),
            (self.data.num_workers >= 0, "data.num_workers", ">= 0"),
            (self.model.embedding_dim >= 2, "model.embedding_dim", ">= 2"),
            (self.model.trainable_blocks >= 0, "model.trainable_blocks",
             ">= 0 (0: the frozen backbone's pooled features are cached)"),
            (self.model.trainable_blocks == 0 or self.model.frozen_backbone,
             "model.trainable_blocks",
             "0 unless model.frozen_backbone=true (the blocks before the cut are the frozen "
             "part; without it the whole backbone trains anyway)"),
            (self.optim.lr > 0, "optim.lr", "> 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay", ">= 0"),
            (self.optim.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0"),
            (
                self.optim.grad_clip is None or self.optim.grad_clip > 0,
                "optim.grad_clip",
                "> 0 or null",
            ),
            (0.0 < self.loss.sample_rate <= 1.0, "loss.sample_rate",
             "in (0, 1] (1: every class, no sampling)"),
            (self.train.epochs >= 1, "train.epochs", ">= 1"),
            (self.train.eval_every >= 1, "train.eval_every", ">= 1"),
            (self.train.max_bad_steps >= 1, "train.max_bad_steps", ">= 1"),
            (self.train.probe_classes >= 0, "train.probe_classes",
             ">= 0 (0 turns the per-epoch mechanism metrics off)"),
            (self.train.probe_per_class >= 1, "train.probe_per_class", ">= 1"),
            (all(k >= 1 for k in self.eval.recall_ks), "eval.recall_ks", "integers >= 1"),
            (
                not self.loss.nir.enabled or self.loss.nir.warmup_epochs < self.train.epochs,
                "loss.nir.warmup_epochs",
                f"shorter than the run (train.epochs={self.train.epochs}): during the flow "
                "warm-up NIR does not regularise, so a warm-up of the whole run is NIR switched "
                "off (use loss.nir.enabled=false for that)",
            ),
        ]


#: a config or search-space file is a few KiB: a bigger file is not one
MAX_YAML_BYTES = 2**20
#: deeper nesting, or more values once YAML aliases are expanded, is not a config either
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document in ``path``, read with PyYAML's safe loader (plain data only: tags
    that would build Python objects are refused); one-line ConfigError naming ``what`` if it is
    missing, unreadable, over ``MAX_YAML_BYTES``, not UTF-8, not valid YAML, or nested deeper
    than ``MAX_YAML_DEPTH`` / holding over ``MAX_YAML_VALUES`` values with aliases expanded."""
    path = Path(path)
    shown = f"{what} {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{shown} does not exist")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{shown} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{shown} is over {MAX_YAML_BYTES // 2**20} MiB: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown} is not UTF-8 text (bad byte at offset {exc.start}); save "
                          f"it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{shown} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{shown} is nested too deeply to be a config file") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"{shown} holds a value that cannot be read ({first})") from None
    _check_yaml_shape(data, shown)
    return data


def _check_yaml_shape(data: Any, shown: str) -> None:
    """ConfigError when ``data`` nests deeper than ``MAX_YAML_DEPTH`` or holds more than
    ``MAX_YAML_VALUES`` values, counting a value each time an alias repeats it (so a "billion
    laughs" document stops here instead of expanding later)."""
    stack, seen = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{shown} holds over {MAX_YAML_VALUES} values (with YAML aliases "
                              f"expanded): not a config file")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{shown} is nested over {MAX_YAML_DEPTH} levels deep: not a "
                              f"config file")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for pair in node.items() for v in pair)
        elif isinstance(node, list | tuple | set):
            stack.extend((v, depth + 1) for v in node)


# ---- dict <-> dataclass helpers -------------------------------------------------------------
def _unknown_key(key: str, node: Any) -> str:
    allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
    return f"unknown config key {key!r}; allowed keys here: {allowed}"


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str) or key not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed keys here: "
                              f"{allowed}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"invalid value for {key}: {value!r} (expected {_type_name(tp)})"
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"invalid value for {key}: {value!r}; allowed values: "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid value for {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"invalid value for {key}: {value!r} (expected true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"invalid value for {key}: {value!r} (expected an integer)")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"invalid value for {key}: an integer too large for a "
                                  f"number (expected a number below 1.8e308)") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"invalid value for {key}: {value!r} (expected a number)")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"invalid value for {key}: {value!r} (expected a string)")
    raise ConfigError(f"invalid value for {key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return " or ".join(
        "null" if a is type(None) else getattr(a, "__name__", str(a)) for a in get_args(tp)
    )


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def available_configs() -> list[str]:
    """Names of the configs shipped with the package (``nirdml/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, or a shipped config by name (``"digits"``), then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        shipped = CONFIG_DIR / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise ConfigError(
                f"no config file {str(name_or_path)!r} and no shipped config of that name; "
                f"shipped: {', '.join(available_configs())}"
            )
        path = shipped
    # validated once, after the overrides (with_values validates the result)
    return Config.from_yaml(path, validate=False).with_overrides(overrides)
