"""Cross-validation over class-disjoint folds of the training classes: the protocol of Musgrave,
Belongie and Lim, "A Metric Learning Reality Check" (ECCV 2020).

The *training* classes are split into K seeded, class-disjoint folds (``data.folds`` /
``data.fold``, :func:`nirdml.data.base.class_folds`); model k trains on the other K-1 folds and
selects its epoch on fold k (``train.select_on``; never on the test classes). Reported:

* validation: mean and std over the folds of each model's validation metrics at its selected
  epoch (the number a hyperparameter search optimises, ``nirdml tune``);
* test, "separated": mean and std over the folds of each single model's test metrics;
* test, "concatenated": the ensemble of the K models, whose test embedding is the concatenation
  of the K models' (L2-normalised) embeddings, L2-normalised again.

Std is the population std over folds (as the repository's benchmark tables). Every fold is a
normal training run in ``OUT/fold<k>``: a finished fold (``final.json``) is reused, an
unfinished one resumes from its ``checkpoints/last.pt``; a fold folder trained with another
config is refused rather than mixed. Two processes never train the same fold at once (a lock
file beside the fold, on systems with ``fcntl``). ``OUT`` and its fold folders carry nirdml's
marker (``nirdml.owned``): a folder in the way that nirdml did not write is refused, never
cleared.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError
from nirdml.owned import check_folder, claim_folder
from nirdml.training.config import Config
from nirdml.training.resume import RESUMABLE_CHANGES, config_differences
from nirdml.training.run_dir import RunDir

#: metrics shown in the markdown table (in this order, those present)
TABLE_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision",
                 "map@1000", "nmi", "ami", "f1")


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    """``cfg`` with the validation split set to fold ``fold`` of ``folds``."""
    if cfg.train.select_on == "test":
        raise ConfigError("cross-validation selects the epoch on the held-out fold; "
                          "train.select_on=test would select on the test classes: use val")
    if cfg.data.folds not in (0, int(folds)):
        raise ConfigError(f"--folds {folds} and data.folds={cfg.data.folds} disagree: "
                          f"cross-validation sets data.folds and data.fold itself; drop "
                          f"--set data.folds (and data.fold)")
    return cfg.with_overrides([f"data.folds={int(folds)}", f"data.fold={int(fold)}"])


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on ``path`` (waits for another holder); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_same_run(run: RunDir, cfg: Config) -> bool:
    """Whether the run in ``run`` was trained with ``cfg`` (keys that do not change what a run
    computes may differ); True when it must train more epochs. ConfigError when it differs."""
    saved = Config.from_yaml(run.config)
    diffs = {k: v for k, v in config_differences(saved, cfg).items()
             if k not in RESUMABLE_CHANGES or k == "train.epochs"}
    more_epochs = diffs.pop("train.epochs", None)
    if diffs:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in diffs.items())
        raise ConfigError(f"{str(run.root)!r} was trained with another config ({listed}); "
                          f"use another --out or remove that folder")
    if more_epochs is not None and more_epochs[1] < more_epochs[0]:
        raise ConfigError(f"{str(run.root)!r} was trained for {more_epochs[0]} epochs, more "
                          f"than train.epochs={more_epochs[1]}; use another --out")
    return more_epochs is not None


def _finished(run: RunDir, cfg: Config) -> bool:
    """Whether ``run`` is a finished training of ``cfg`` (its checkpoint and ``final.json``
    there, not owing more epochs); ConfigError when a started run there was trained with
    another config."""
    if not run.checkpoint().is_file():
        return False
    more = _check_same_run(run, cfg) if run.config.is_file() else False
    return run.final.is_file() and not more


def train_run(cfg: Config, out: str | Path, log: Callable[[str], None] | None = None) -> str:
    """Train ``cfg`` into ``out`` unless it is done: ``"reused"`` (``final.json`` there, same
    config), ``"resumed"`` (from ``checkpoints/last.pt``) or ``"trained"`` (from scratch; what
    a start of ours that stopped before its first checkpoint wrote is cleared first, see
    ``Trainer``). A folder in the way that is not a nirdml run is refused (ConfigError)."""
    from nirdml.training import Trainer

    run = RunDir(out)
    run.check(resume=run.checkpoint().is_file())  # a file, a folder not ours: refused
    with _lock(run.root.parent / f".{run.root.name}.lock"):
        if run.checkpoint().is_file():
            if _finished(run, cfg):
                return "reused"
            if log:
                log(f"{run.root}: resuming from {run.checkpoint()}")
            Trainer(cfg, run.root, resume=True).fit()
            return "resumed"
        Trainer(cfg, run.root).fit()
        return "trained"


def claim_cv_folder(out: Path, folds: int) -> None:
    """Make ``out`` a cross-validation folder of ours (``nirdml.owned``), checking first that
    no fold folder in the way is a file or a folder nirdml did not write; a cross-validation
    written by an older nirdml (no marker; its ``crossval.json`` or fold runs) is taken over."""
    legacy = (out / "crossval.json").is_file() or any(
        RunDir(out / f"fold{k}").is_run() for k in range(int(folds)))
    check_folder(out, "crossval", "--out", legacy=legacy)
    for k in range(int(folds)):
        run = RunDir(out / f"fold{k}")
        run.check(resume=run.checkpoint().is_file())
    claim_folder(out, "crossval", "--out", legacy=legacy)


def selected_validation(run: RunDir) -> dict[str, float]:
    """The validation metrics (``val/`` stripped) of the run's selected epoch."""
    final = json.loads(run.final.read_text())
    epoch = final.get("selected_epoch")
    chosen: dict[str, Any] | None = None
    for record in run.records():  # the last record of that epoch (a resumed run may repeat)
        if record.get("epoch") == epoch and any(k.startswith("val/") for k in record):
            chosen = record
    if chosen is None:
        raise ConfigError(f"{str(run.root)!r} has no validation metrics for its selected epoch "
                          f"{epoch} (does the config hold out validation classes?)")
    return {k[4:]: v for k, v in chosen.items() if k.startswith("val/")}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
            and k not in ("lone_queries", "num_queries", "selected_epoch")}


def mean_std(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"mean": {metric: ...}, "std": {metric: ...}}`` over ``rows`` (population std)."""
    keys = [k for k in _numbers(rows[0]) if all(k in r for r in rows)]
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for k in keys:
        values = [float(r[k]) for r in rows]
        out["mean"][k] = statistics.fmean(values)
        out["std"][k] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def ensemble_test_metrics(checkpoints: list[Path], cfg: Config) -> dict[str, Any]:
    """Test metrics of the concatenated (L2-normalised) embeddings of ``checkpoints``."""
    import numpy as np

    from nirdml.evaluation import evaluate
    from nirdml.inference import TrainedRun

    parts, test, labels, masks = [], None, None, (None, None)
    for path in checkpoints:
        run = TrainedRun.open(path, cfg.train.device)
        if test is None:
            test = run.split("test")  # the same test split for every fold: built once
        emb = run.embed(test)
        if labels is None:
            labels, masks = emb.labels, (emb.is_query, emb.is_gallery)
        x = np.asarray(emb.embeddings, dtype=np.float64)
        parts.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
        del run
    joined = np.concatenate(parts, axis=1)
    joined /= np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return evaluate(joined.astype(np.float32), labels, metrics=cfg.eval.metrics,
                        query_mask=masks[0], gallery_mask=masks[1],
                        recall_ks=tuple(cfg.eval.recall_ks))


def run_folds(cfg: Config, folds: int, out: str | Path,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse, or resume) the ``folds`` fold models of ``cfg`` in ``out/fold<k>``;
    per fold: ``fold``, ``run`` (folder), ``status``, ``selected_epoch``, ``val`` and ``test``
    metrics."""
    out = Path(out)
    claim_cv_folder(out, folds)
    results = []
    for k in range(int(folds)):
        fold_cfg = fold_config(cfg, folds, k)
        run = RunDir(out / f"fold{k}")
        status = train_run(fold_cfg, run.root, log)
        final = json.loads(run.final.read_text())
        val = selected_validation(run)
        result = {"fold": k, "run": str(run.root), "status": status,
                  "selected_epoch": final.get("selected_epoch"), "val": val,
                  "test": {k2: v for k2, v in final.items()
                           if k2 not in ("selected_on", "dataset", "split",
                                         "unreadable_dropped")}}
        results.append(result)
        if log:
            metric = cfg.train.selection_metric
            log(f"fold {k + 1}/{folds} {status}: val {metric} "
                f"{100 * val.get(metric, math.nan):.2f}, test {metric} "
                f"{100 * float(final.get(metric, math.nan)):.2f}")
    return results


def crossval(cfg: Config, folds: int, out: str | Path, log: Callable[[str], None] | None = None,
             ensemble: bool = True) -> dict[str, Any]:
    """The whole protocol (module docstring); writes ``out/crossval.json`` and
    ``out/crossval.md`` and returns the summary written to the JSON."""
    from nirdml.files import atomic_write_text

    if int(folds) < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    out = Path(out)
    fold_config(cfg, folds, 0)  # checks the config before any training
    claim_cv_folder(out, folds)
    fold_results = run_folds(cfg, folds, out, log)
    summary: dict[str, Any] = {
        "protocol": "Musgrave et al. 2020: class-disjoint folds of the training classes",
        "folds": int(folds), "seed": cfg.seed, "dataset": cfg.data.name,
        "loss": cfg.loss.name + (" + NIR" if cfg.loss.nir.enabled else ""),
        "selection_metric": cfg.train.selection_metric,
        "fold_runs": fold_results,
        "val": mean_std([r["val"] for r in fold_results]),
        "test_separated": mean_std([r["test"] for r in fold_results]),
    }
    if ensemble:
        checkpoints = [_selected_checkpoint(Path(r["run"])) for r in fold_results]
        summary["test_concatenated"] = _numbers(ensemble_test_metrics(checkpoints, cfg))
    atomic_write_text(out / "crossval.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "crossval.md", markdown(summary))
    return summary


def finished_summary(cfg: Config, folds: int, out: str | Path) -> dict[str, Any] | None:
    """The summary a finished ``crossval(cfg, folds, out)`` wrote, read back without training
    or evaluating; None when ``out`` holds no finished cross-validation of ``cfg`` (a fold
    missing or unfinished, or ``crossval.json`` not written yet). ConfigError when a fold
    there was trained with another config."""
    out = Path(out)
    path = out / "crossval.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("folds") != int(folds):
        return None
    if all(_finished(RunDir(out / f"fold{k}"), fold_config(cfg, folds, k))
           for k in range(int(folds))):
        return summary
    return None


def _selected_checkpoint(run_root: Path) -> Path:
    run = RunDir(run_root)
    best = run.checkpoint("best.pt")
    return best if best.is_file() else run.checkpoint()


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (metrics in %, mean +- std over folds)."""
    rows = [("validation (held-out fold)", summary["val"]["mean"], summary["val"]["std"]),
            ("test, separated", summary["test_separated"]["mean"],
             summary["test_separated"]["std"])]
    if "test_concatenated" in summary:
        rows.append((f"test, concatenated ({summary['folds']} models)",
                     summary["test_concatenated"], None))
    keys = [k for k in TABLE_METRICS if all(k in r[1] for r in rows)]
    lines = [f"Cross-validation: {summary['dataset']}, {summary['loss']}, {summary['folds']} "
             f"class-disjoint folds of the training classes, seed {summary['seed']} (%, mean "
             f"+- std over folds)", "",
             "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, mean, std in rows:
        cells = [f"{100 * mean[k]:.2f}" + ("" if std is None else f" +- {100 * std[k]:.2f}")
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
