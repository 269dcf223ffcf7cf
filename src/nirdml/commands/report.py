"""``nirdml report``: one self-contained HTML page about a training run."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import (
    add_data_root_option,
    add_device_option,
    add_overwrite_option,
    positive_int,
)

HELP = "write a self-contained HTML report of a run (metrics, curves, diagnostics, retrieval)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder (the --out of nirdml train)")
    parser.add_argument("--out", default=None, help="output HTML (default RUN/report.html)")
    add_overwrite_option(parser, "a report")
    parser.add_argument("-k", "--k", type=positive_int, default=5, help="results per grid query")
    parser.add_argument("--queries", type=positive_int, default=6,
                        help="queries in the retrieval grid")
    parser.add_argument("--checkpoint", default=None, help="default RUN/checkpoints/best.pt")
    add_device_option(parser, "for the retrieval grid's embeddings")
    add_data_root_option(parser)
    parser.add_argument("--no-grid", action="store_true", help="skip the retrieval grid")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nirdml.devices import resolve_device
    from nirdml.errors import ConfigError
    from nirdml.files import check_output_file
    from nirdml.reports.html import build_report, is_report_file

    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise ConfigError(f"--run {args.run!r} is not a training run (no metrics.jsonl in it); "
                          f"give the --out folder of nirdml train")
    check_output_file(args.out or Path(args.run) / "report.html", "--out", is_report_file,
                      args.overwrite)
    if not args.no_grid:
        resolve_device(args.device, "--device")
    out = build_report(args.run, args.out, k=args.k, num_queries=args.queries,
                       checkpoint=args.checkpoint, device=args.device, data_root=args.data_root,
                       grid=not args.no_grid)
    print(f"wrote {out}")
    return 0
