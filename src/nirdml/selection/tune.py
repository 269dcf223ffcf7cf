"""Hyperparameter search with Optuna over any config keys, on the cross-validated validation
metric (Musgrave et al.'s protocol, :mod:`nirdml.selection.crossval`).

The search space (:mod:`nirdml.selection.search_space`) is a YAML mapping from config keys to
distributions::

    optim.lr:             {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    loss.options.margin:  {type: float, low: 0.05, high: 0.5, step: 0.05}
    train.epochs:         {type: int, low: 2, high: 8}
    loss.name:            {type: categorical, choices: [triplet, margin]}

Every key, and the values at the ends of its range (or every choice), is checked against the
config before the first trial (unknown keys, wrong types and values, options a loss or dataset
does not take: one-line ``ConfigError`` s). ``data.folds`` / ``data.fold`` belong to
``--folds``.

Each trial trains ``folds`` fold models (``nirdml.selection.crossval.run_folds``) in
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

import json
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError, TrainingError
from nirdml.owned import claim_folder
from nirdml.selection.search_space import Param, apply_params, params_hash, validate_space
from nirdml.training.config import Config

#: the heartbeat: a running trial beats every HEARTBEAT_S; silent for STALE_AFTER_S -> failed
HEARTBEAT_S = 30
STALE_AFTER_S = 120
STUDY_NAME = "nirdml"


class _InvalidTrialConfig(ConfigError):
    """The sampled values combine into an invalid config: this trial fails, the search goes on."""


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
    from nirdml.selection.crossval import run_folds, selected_validation, train_run
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


def _check_arguments(cfg: Config, space: dict[str, Param], trials: int, folds: int) -> int:
    """ConfigError for a bad trial count, fold count or search space; the fold count."""
    if int(trials) < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if int(folds) < 1:
        raise ConfigError(f"--folds must be >= 1 (1: the config's own validation split), "
                          f"got {folds}")
    folds = int(folds)
    if folds >= 2:
        from nirdml.selection.crossval import fold_config

        fold_config(cfg, folds, 0)
    elif cfg.data.val_fraction == 0 and not cfg.data.folds:
        raise ConfigError("--folds 1 scores the config's own validation split, but "
                          "data.val_fraction=0 holds out none; use --folds >= 2")
    validate_space(space, cfg)
    return folds


def _trial_objective(cfg: Config, space: dict[str, Param], folds: int, out: Path,
                     log: Callable[[str], None] | None) -> Callable:
    """Optuna's objective: train (or resume) a trial's folds, return their mean validation
    metric; a failure is recorded on the trial (``failure``) before it propagates."""
    from nirdml.training.trainer import Interrupted

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


    return objective


def tune(cfg: Config, space: dict[str, Param], trials: int, out: str | Path, folds: int = 4,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the search until the study has ``trials`` complete trials; returns the
    summary written to ``out/tune.json`` (module docstring)."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    folds = _check_arguments(cfg, space, trials, folds)
    out = Path(out)
    claim_folder(out, "tune", "--out", legacy=(out / "study.db").is_file())
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happens
    setup = {"config": _what_counts(cfg), "space": {k: p.to_dict() for k, p in space.items()},
             "folds": folds}
    study = _open_study(optuna, out, setup, cfg.seed)
    retried = retry_stopped_trials(study)
    if retried and log:
        log(f"retrying stopped trial(s) {', '.join(map(str, retried))} with the same parameters")

    objective = _trial_objective(cfg, space, folds, out, log)

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
