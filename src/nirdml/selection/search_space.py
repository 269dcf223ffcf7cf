"""The search space of ``nirdml tune``: a YAML mapping from config keys to distributions
(``Param``), parsed (``parse_param``, ``load_space``), checked against a config before any trial
(``validate_space``) and applied to it (``apply_params``). See :mod:`nirdml.selection.tune`."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError
from nirdml.training.config import Config

SPACE_TYPES = ("float", "int", "categorical")
_SPEC_FIELDS = {"type", "low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def edge_values(self) -> list[Any]:
        """Values the space reaches that validation tries: the range's ends, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                out["step"] = self.step
        return out


# ---- the search space ---------------------------------------------------------------------------
def _number(key: str, name: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite or abs(value) > 1e300:
        shown = (f"an integer of {value.bit_length()} bits" if isinstance(value, int)
                 and not isinstance(value, bool) else repr(value)[:40])
        raise ConfigError(f"search space {key!r}: {name} must be a number (finite, at most "
                          f"1e300), got {shown}")
    if integer:
        if int(value) != value:
            raise ConfigError(f"search space {key!r}: {name} must be an integer for type int, "
                              f"got {value!r}")
        return int(value)
    return float(value)


def parse_param(key: str, spec: Any) -> Param:
    """One space entry (``key: {type: ..., ...}``) as a :class:`Param`; ConfigError if bad."""
    if not isinstance(spec, dict):
        raise ConfigError(f"search space {key!r}: expected a mapping like {{type: float, low: "
                          f"0.1, high: 1.0}}, got {spec!r}")
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise ConfigError(f"search space {key!r}: unknown field(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(_SPEC_FIELDS))}")
    kind = spec.get("type")
    if kind not in SPACE_TYPES:
        raise ConfigError(f"search space {key!r}: type must be one of {', '.join(SPACE_TYPES)}, "
                          f"got {kind!r}")
    if kind == "categorical":
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        if extra:
            raise ConfigError(f"search space {key!r}: a categorical entry takes only choices, "
                              f"not {', '.join(extra)}")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"search space {key!r}: categorical needs a non-empty list "
                              f"'choices', got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise ConfigError(f"search space {key!r}: choices must be numbers, strings, "
                                  f"booleans or null, got {c!r}")
        return Param(key, kind, choices=tuple(choices))
    if "choices" in spec:
        raise ConfigError(f"search space {key!r}: choices belong to type categorical")
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"search space {key!r}: type {kind} needs low and high")
    integer = kind == "int"
    low = _number(key, "low", spec["low"], integer)
    high = _number(key, "high", spec["high"], integer)
    if not low < high:
        raise ConfigError(f"search space {key!r}: low must be < high, got {low} and {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"search space {key!r}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"search space {key!r}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step, integer)
        if step <= 0:
            raise ConfigError(f"search space {key!r}: step must be > 0, got {step}")
        if log and (kind == "float" or step != 1):
            raise ConfigError(f"search space {key!r}: log and step cannot be combined")
    return Param(key, kind, low, high, log, step)


def load_space(path: str | Path) -> dict[str, Param]:
    """Read a YAML search space (module docstring)."""
    from nirdml.training.config import read_yaml

    data = read_yaml(path, "--space")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--space {str(path)!r} must map config keys to distributions, e.g. "
                          f"'optim.lr: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}'")
    return {str(key): parse_param(str(key), spec) for key, spec in data.items()}


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with ``params`` (``{"a.b.c": value}``) set; ConfigError on unknown keys or bad
    values (values are set as they are, not parsed from text)."""
    return cfg.with_values(params)


def _takes(factory, option: str) -> tuple[bool, list[str]]:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True, []
    names = [n for n in params if n not in ("num_classes", "embedding_dim", "root", "seed",
                                            "on_error")]
    return option in params, names


def validate_space(space: dict[str, Param], cfg: Config) -> None:
    """Check every key and its edge values against ``cfg`` before any trial (ConfigError)."""
    from nirdml.data import DATASETS
    from nirdml.losses import LOSSES

    names = list(space["loss.name"].choices) if "loss.name" in space else [cfg.loss.name]
    for key, param in space.items():
        if key in ("data.folds", "data.fold"):
            raise ConfigError(f"search space {key!r}: the folds are set by --folds, not searched")
        for value in param.edge_values():
            try:
                apply_params(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"search space {key!r} = {value!r}: {exc}") from None
        parts = key.split(".")
        if parts[:2] == ["loss", "options"] and len(parts) == 3:
            for name in names:
                ok, allowed = _takes(LOSSES.get(str(name)), parts[2])
                if not ok:
                    raise ConfigError(f"search space {key!r}: loss {name!r} takes no option "
                                      f"{parts[2]!r}; it takes: {', '.join(allowed)}")
        if parts[:2] == ["data", "options"] and len(parts) == 3:
            ok, allowed = _takes(DATASETS.get(cfg.data.name), parts[2])
            if not ok:
                raise ConfigError(f"search space {key!r}: dataset {cfg.data.name!r} takes no "
                                  f"option {parts[2]!r}; it takes: {', '.join(allowed) or 'none'}")


def params_hash(params: dict[str, Any]) -> str:
    """A short stable name for a parameter set (its trial folder)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]
