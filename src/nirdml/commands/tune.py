"""``nirdml tune``: hyperparameter search with Optuna on the cross-validated validation metric,
or (``--rerank``) the exhaustive search of the re-ranking parameters of a trained run on its
validation classes (no training; ``nirdml.selection.rerank``)."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import add_data_root_option, add_device_option

HELP = ("search hyperparameters with Optuna (pip install 'nirdml[tune]'): any config keys, "
        "scored by the cross-validated validation metric; resumable, parallel-safe; or, with "
        "--rerank, a trained run's re-ranking parameters on its validation classes")

SPACE_EXAMPLE = """\
search space (--space, YAML; key -> distribution):
  optim.lr:            {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  loss.options.margin: {type: float, low: 0.05, high: 0.5, step: 0.05}
  train.epochs:        {type: int, low: 2, high: 8}
  loss.name:           {type: categorical, choices: [triplet, margin]}

The study is OUT/study.db (SQLite): the same command again continues it; several processes
may run it at once. Each trial trains --folds models (OUT/trials/<hash>/fold<k>) and scores the
mean validation train.selection_metric. OUT/best.yaml is the best config so far:
  nirdml train --config OUT/best.yaml

re-ranking (no training, no Optuna): every grid point of each method on the validation split
  nirdml tune --rerank --checkpoint RUN/checkpoints/best.pt [--protocol split] [--json F]
  then: nirdml evaluate / search / serve --rerank SPEC (SPEC as printed)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = SPACE_EXAMPLE
    parser.add_argument("--config", default="digits_cv",
                        help="the base config: a YAML file or the name of a shipped config")
    parser.add_argument("--space", help="the search space (YAML; required to search training "
                                        "hyperparameters)")
    parser.add_argument("--trials", type=int,
                        help="complete trials the study should have (a continued search runs "
                             "only the missing ones)")
    parser.add_argument("--out", help="output folder (study.db, trials/, best.yaml, tune.json)")
    parser.add_argument("--folds", type=int, default=4,
                        help="class-disjoint folds of the training classes per trial (1: the "
                             "config's own validation split, no cross-validation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key of the base config "
                                                  "(repeatable)")
    rr = parser.add_argument_group("re-ranking search (--rerank)")
    rr.add_argument("--rerank", nargs="*", default=None, metavar="METHOD",
                    help="search the re-ranking parameters of --checkpoint instead of training: "
                         "alpha_qe, dba, k_reciprocal (none named: all)")
    rr.add_argument("--checkpoint", metavar="CK.pt", help="the trained run to re-rank")
    rr.add_argument("--split", choices=("val", "test", "train"), default="val",
                    help="the split the parameters are chosen on (default: val; choosing on "
                         "test is reporting the test set's best, not a choice)")
    rr.add_argument("--metric", default="map@r",
                    help="the ranking metric to maximise (default: map@r)")
    rr.add_argument("--protocol", choices=("all", "split"), default="all",
                    help="all: every item queries all others (as evaluate); split: half of "
                         "each class queries the other half, queries from outside the gallery "
                         "(as search and serve)")
    rr.add_argument("--json", metavar="OUT.json", help="write every grid point's score")
    add_data_root_option(rr, "with --rerank: ")
    add_device_option(rr, "for embedding the split")
    rr.add_argument("--overwrite", action="store_true",
                    help="replace --json even when it is not a selection nirdml wrote")


def run(args: argparse.Namespace) -> int:
    if args.rerank is not None:
        return run_rerank(args)
    from nirdml.errors import ConfigError

    missing = [f"--{name}" for name in ("space", "trials", "out") if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"a hyperparameter search needs {', '.join(missing)} (or search "
                          f"re-ranking parameters: --rerank --checkpoint CK.pt)")
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


def is_selection_file(path) -> bool:
    """Whether ``path`` is a re-ranking selection ``tune --rerank --json`` wrote."""
    import json
    from pathlib import Path

    return json.loads(Path(path).read_text())["kind"] == SELECTION_KIND


SELECTION_KIND = "nirdml.rerank_selection"


def run_rerank(args: argparse.Namespace) -> int:
    """Every grid point of the chosen methods on the run's split; prints the best of each."""
    import json

    from nirdml.devices import resolve_device
    from nirdml.errors import ConfigError
    from nirdml.files import atomic_write_text, check_output_file
    from nirdml.selection.rerank import check_methods, check_metric, select_rerank

    methods, metric = check_methods(args.rerank), check_metric(args.metric)
    if not args.checkpoint:
        raise ConfigError("--rerank searches a trained run's re-ranking: pass --checkpoint "
                          "RUN/checkpoints/best.pt")
    resolve_device(args.device, "--device")
    if args.json:
        check_output_file(args.json, "--json", is_selection_file, args.overwrite)
    from nirdml.inference import TrainedRun

    run = TrainedRun.open(args.checkpoint, args.device, args.data_root)
    emb = run.embed(args.split, progress=args.split)
    print(f"re-ranking on {args.checkpoint} ({run.config.data.name}, {args.split} split, "
          f"{len(emb.labels)} items, protocol {args.protocol}), by {metric}:")
    found = select_rerank(emb.embeddings, emb.labels, methods, metric, args.protocol,
                          emb.is_query, emb.is_gallery, log=lambda line: print("  " + line))
    if found["best"] == "none":
        print(f"no method beats the plain ranking on the {args.split} split: keep --rerank none")
    else:
        print(f"best: {found['best']} ({metric} {found['best_score']:.4f}, plain "
              f"{found['none']:.4f}); use it as: nirdml evaluate / search / serve "
              f"--rerank {found['best']}")
    if args.json:
        doc = {"kind": SELECTION_KIND, "checkpoint": str(args.checkpoint),
               "split": args.split, **found}
        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
