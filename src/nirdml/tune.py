"""Hyperparameter search with Optuna over any config keys, on the cross-validated validation
metric (Musgrave et al.'s protocol, :mod:`nirdml.crossval`).

The search space is a YAML mapping from config keys to distributions::

    optim.lr:             {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    loss.options.margin:  {type: float, low: 0.05, high: 0.5, step: 0.05}
    train.epochs:         {type: int, low: 2, high: 8}
    loss.name:            {type: categorical, choices: [triplet, margin]}

Every key, and the values at the ends of its range (or every choice), is checked against the
config before the first trial (unknown keys, wrong types and values, options a loss or dataset
does not take: one-line ``ConfigError`` s). ``data.folds`` / ``data.fold`` belong to
``--folds``.

Each trial trains ``folds`` fold models (``nirdml.crossval.run_folds``) in
``OUT/trials/<hash of its parameters>/`` and scores the mean over the folds of the validation
``train.selection_metric`` (maximised); ``folds=1`` scores the config's own validation split
(``data.val_fraction``) instead. The study lives in ``OUT/study.db`` (SQLite): running the same
command again continues it up to ``trials`` complete trials. A trial stopped by Ctrl-C, SIGTERM
or a crash is tried again with the same parameters, its finished folds reused and its
unfinished fold resumed from its checkpoint (trial folders are named by their parameters);
a trial of a process killed outright is found by Optuna's heartbeat once it is
``STALE_AFTER_S`` seconds silent. Several processes may share the study (run the command
several times in parallel); a trial that diverges (``TrainingError``) or whose values combine
into an invalid config is recorded as failed and the search goes on.

After every trial ``OUT/best.yaml`` (the config with the best trial's values, a plain config
``nirdml train --config OUT/best.yaml`` takes) and ``OUT/tune.json`` (every trial) are
rewritten.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError, TrainingError
from nirdml.training.config import Config

SPACE_TYPES = ("float", "int", "categorical")
_SPEC_FIELDS = {"type", "low", "high", "log", "step", "choices"}
#: the heartbeat: a running trial beats every HEARTBEAT_S; silent for STALE_AFTER_S -> failed
HEARTBEAT_S = 30
STALE_AFTER_S = 120
STUDY_NAME = "nirdml"


class _InvalidTrialConfig(ConfigError):
    """The sampled values combine into an invalid config: this trial fails, the search goes on."""


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
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"search space {key!r}: {name} must be a number, got {value!r}")
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


# ---- the study ----------------------------------------------------------------------------------
def _what_counts(cfg: Config) -> dict[str, Any]:
    """The config without the keys that do not change what a run computes (where the data
    lives, logging, the device): a search may continue with those changed."""
    from nirdml.training.resume import RESUMABLE_CHANGES

    data = cfg.to_dict()
    for key in RESUMABLE_CHANGES - {"train.epochs"}:
        section, name = key.split(".")
        data[section].pop(name, None)
    return data


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("nirdml tune needs Optuna: pip install 'nirdml[tune]' (or "
                          "pip install 'optuna>=4')") from None
    return optuna


def _open_study(optuna, out: Path, setup: dict[str, Any], seed: int):
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{out / 'study.db'}", heartbeat_interval=HEARTBEAT_S,
            grace_period=STALE_AFTER_S,
            # parallel processes: wait for SQLite's write lock instead of failing at once
            engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                load_if_exists=True)
    saved = study.user_attrs.get("setup")
    if saved is None:
        study.set_user_attr("setup", setup)
    elif saved != json.loads(json.dumps(setup)):
        changed = sorted(k for k in setup if saved.get(k) != json.loads(json.dumps(setup[k])))
        raise ConfigError(f"{str(out)!r} holds a search with another {', '.join(changed)}; "
                          f"continue it with the same --config/--set/--space/--folds, or use "
                          f"another --out")
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def retry_stopped_trials(study) -> list[int]:
    """Enqueue once, with the same parameters, every failed trial that was stopped (Ctrl-C,
    SIGTERM, a crash or a lost heartbeat) rather than failed by its own values; returns the
    numbers of the trials retried now."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    # an enqueued (WAITING) trial holds its parameters as fixed_params until it runs
    done = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)]
    now = []
    for t in trials:
        failure = t.user_attrs.get("failure")
        stopped = failure is None or failure == "interrupted"
        if t.state == TrialState.FAIL and stopped and t.number not in retried \
                and t.params and t.params not in done:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            done.append(t.params)
            now.append(t.number)
    return now


def _score(cfg: Config, folds: int, folder: Path, log) -> tuple[list[float], list[str]]:
    """Per-fold validation ``selection_metric`` values and fold statuses of one trial."""
    from nirdml.crossval import run_folds, selected_validation, train_run
    from nirdml.training.run_dir import RunDir

    metric = cfg.train.selection_metric
    if folds >= 2:
        results = run_folds(cfg, folds, folder, log)
        rows = [(r["val"], r["status"]) for r in results]
    else:
        status = train_run(cfg, folder / "run", log)
        rows = [(selected_validation(RunDir(folder / "run")), status)]
    for val, _ in rows:
        if metric not in val:
            raise ConfigError(f"train.selection_metric={metric!r} is not among the validation "
                              f"metrics ({', '.join(sorted(val))})")
    return [float(val[metric]) for val, _ in rows], [s for _, s in rows]


def write_outputs(study, cfg: Config, out: Path, folds: int) -> dict[str, Any]:
    """``out/tune.json`` (every trial) and, once a trial completed, ``out/best.yaml``."""
    from optuna.trial import TrialState

    from nirdml.files import atomic_write_text

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "objective": f"val {cfg.train.selection_metric}, mean over "
                     f"{folds if folds >= 2 else 1} fold(s) (maximised)",
        "trials": [{"number": t.number, "state": t.state.name, "value": t.value,
                    "params": t.params, **t.user_attrs} for t in trials],
    }
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params}
        best_cfg = apply_params(cfg, best.params)
        how = (f"nirdml crossval --config {out / 'best.yaml'} --folds {folds} --out DIR"
               if folds >= 2 else f"nirdml train --config {out / 'best.yaml'}")
        header = (f"# nirdml tune: the best of {len(complete)} complete trial(s) in {out}: trial "
                  f"{best.number}, val {cfg.train.selection_metric} = {best.value:.6f}\n"
                  f"# (mean over {max(folds, 1)} fold(s) of the training classes, seed "
                  f"{cfg.seed}); the same value again: {how}\n"
                  f"# searched: " + ", ".join(f"{k}={v!r}" for k, v in best.params.items()) + "\n")
        atomic_write_text(out / "best.yaml", header + best_cfg.to_yaml())
    atomic_write_text(out / "tune.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def tune(cfg: Config, space: dict[str, Param], trials: int, out: str | Path, folds: int = 4,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the search until the study has ``trials`` complete trials; returns the
    summary written to ``out/tune.json`` (module docstring)."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    from nirdml.training.trainer import Interrupted

    if int(trials) < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if int(folds) < 1:
        raise ConfigError(f"--folds must be >= 1 (1: the config's own validation split), "
                          f"got {folds}")
    folds = int(folds)
    if folds >= 2:
        from nirdml.crossval import fold_config

        fold_config(cfg, folds, 0)
    elif cfg.data.val_fraction == 0 and not cfg.data.folds:
        raise ConfigError("--folds 1 scores the config's own validation split, but "
                          "data.val_fraction=0 holds out none; use --folds >= 2")
    validate_space(space, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happens
    setup = {"config": _what_counts(cfg), "space": {k: p.to_dict() for k, p in space.items()},
             "folds": folds}
    study = _open_study(optuna, out, setup, cfg.seed)
    retried = retry_stopped_trials(study)
    if retried and log:
        log(f"retrying stopped trial(s) {', '.join(map(str, retried))} with the same parameters")

    def objective(trial) -> float:
        params = {key: param.suggest(trial) for key, param in space.items()}
        folder = out / "trials" / params_hash(params)
        trial.set_user_attr("run_dir", str(folder))
        try:
            try:
                trial_cfg = apply_params(cfg, params)
            except ConfigError as exc:
                raise _InvalidTrialConfig(f"trial {trial.number}: {exc}") from None
            values, statuses = _score(trial_cfg, folds, folder, log)
        except (KeyboardInterrupt, Interrupted):
            trial.set_user_attr("failure", "interrupted")
            raise
        except BaseException as exc:
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
            if log and isinstance(exc, TrainingError | _InvalidTrialConfig):
                log(f"trial {trial.number} failed ({exc}); the search goes on")
            raise
        trial.set_user_attr("fold_values", values)
        trial.set_user_attr("fold_status", statuses)
        value = statistics.fmean(values)
        if log:
            log(f"trial {trial.number}: val {cfg.train.selection_metric} {value:.4f} "
                f"({', '.join(f'{k}={v!r}' for k, v in params.items())})")
        return value

    def after_trial(study, _trial) -> None:
        write_outputs(study, cfg, out, folds)
        # a parallel process killed outright: its trial, failed by the heartbeat, runs again
        again = retry_stopped_trials(study)
        if again and log:
            log(f"retrying stopped trial(s) {', '.join(map(str, again))}")

    def complete() -> int:
        return sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    remaining = int(trials) - complete()
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(TrainingError, _InvalidTrialConfig),
                       callbacks=[optuna.study.MaxTrialsCallback(
                           int(trials), states=(TrialState.COMPLETE,)), after_trial])
    summary = write_outputs(study, cfg, out, folds)
    if "best" not in summary:
        raise TrainingError(f"no trial completed; see {out / 'tune.json'} for why each failed")
    return summary
