"""``nirdml crossval``: the Reality-Check protocol (class-disjoint folds of training classes)."""

from __future__ import annotations

import argparse

HELP = ("cross-validate a config on class-disjoint folds of the training classes: one model per "
        "fold, validation mean +- std, test of each model and of the fold ensemble")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Musgrave et al., 'A Metric Learning Reality Check' (ECCV 2020). Fold k trains on the "
        "other folds and selects its epoch on fold k (data.folds / data.fold). Writes "
        "OUT/fold<k>/ (ordinary runs), OUT/crossval.json and OUT/crossval.md. Run the same "
        "command again to continue: finished folds are reused, an unfinished one resumes from "
        "its last checkpoint.")
    parser.add_argument("--config", default="digits_cv",
                        help="a YAML file or the name of a shipped config")
    parser.add_argument("--folds", type=int, default=4,
                        help="number of class-disjoint folds (>= 2)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--no-ensemble", dest="ensemble", action="store_false",
                        help="skip the test evaluation of the concatenated fold models")


def run(args: argparse.Namespace) -> int:
    from nirdml.selection.crossval import crossval, markdown, print_log
    from nirdml.training.config import load_config
    from nirdml.training.trainer import Interrupted

    cfg = load_config(args.config, args.overrides)
    try:
        summary = crossval(cfg, args.folds, args.out, log=print_log, ensemble=args.ensemble)
    except Interrupted:
        raise Interrupted("cross-validation stopped; run the same nirdml crossval command again "
                          "to continue (finished folds are reused, the stopped one resumes)"
                          ) from None
    print(markdown(summary), end="")
    print(f"written: {args.out}/crossval.json, {args.out}/crossval.md")
    return 0
