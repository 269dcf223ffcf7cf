"""``nirdml tune``: hyperparameter search with Optuna on the cross-validated validation metric."""

from __future__ import annotations

import argparse

HELP = ("search hyperparameters with Optuna (pip install 'nirdml[tune]'): any config keys, "
        "scored by the cross-validated validation metric; resumable, parallel-safe")

SPACE_EXAMPLE = """\
search space (--space, YAML; key -> distribution):
  optim.lr:            {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  loss.options.margin: {type: float, low: 0.05, high: 0.5, step: 0.05}
  train.epochs:        {type: int, low: 2, high: 8}
  loss.name:           {type: categorical, choices: [triplet, margin]}

The study is OUT/study.db (SQLite): the same command again continues it; several processes
may run it at once. Each trial trains --folds models (OUT/trials/<hash>/fold<k>) and scores the
mean validation train.selection_metric. OUT/best.yaml is the best config so far:
  nirdml train --config OUT/best.yaml"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SPACE_EXAMPLE
    parser.add_argument("--config", default="digits_cv",
                        help="the base config: a YAML file or the name of a shipped config")
    parser.add_argument("--space", required=True, help="the search space (YAML)")
    parser.add_argument("--trials", type=int, required=True,
                        help="complete trials the study should have (a continued search runs "
                             "only the missing ones)")
    parser.add_argument("--out", required=True, help="output folder (study.db, trials/, "
                                                     "best.yaml, tune.json)")
    parser.add_argument("--folds", type=int, default=4,
                        help="class-disjoint folds of the training classes per trial (1: the "
                             "config's own validation split, no cross-validation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key of the base config "
                                                  "(repeatable)")


def run(args: argparse.Namespace) -> int:
    from nirdml.selection.crossval import print_log
    from nirdml.selection.search_space import load_space
    from nirdml.selection.tune import require_optuna, tune
    from nirdml.training.config import load_config
    from nirdml.training.trainer import Interrupted

    require_optuna()  # the missing extra first, before any other work
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    try:
        summary = tune(cfg, space, args.trials, args.out, args.folds, log=print_log)
    except Interrupted:
        raise Interrupted(f"search stopped; run the same nirdml tune command again to continue "
                          f"it (its study is {args.out}/study.db)") from None
    best = summary["best"]
    print(f"best trial {best['number']}: val {cfg.train.selection_metric} "
          f"{best['value']:.4f} with " + ", ".join(f"{k}={v!r}" for k, v in
                                                     best["params"].items()))
    print(f"best config: {args.out}/best.yaml (nirdml train --config {args.out}/best.yaml)")
    return 0
