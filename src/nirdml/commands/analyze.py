"""``nirdml analyze``: structure diagnostics (rho, pi_density, sigma2_kappa, G2) and figures."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import (
    add_batch_size_option,
    add_data_root_option,
    add_device_option,
    non_negative_int,
)

HELP = "structure diagnostics and figures of a checkpoint's or an npz file's embeddings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint file (e.g. best.pt); its split is embedded")
    src.add_argument("--embeddings", help="an .npz with 'embeddings' (N, D) and 'labels' (N,)")
    parser.add_argument("--out", required=True,
                        help="output folder (analysis.json, *.png): new, empty, or one nirdml "
                             "analyze wrote, such as RUN/analysis")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="split to embed (with --checkpoint)")
    parser.add_argument("--no-plots", action="store_true", help="write analysis.json only")
    parser.add_argument("--flow-classes", type=non_negative_int, default=4,
                        help="training classes whose flow samples are drawn (NIR checkpoints; "
                             "0 = none)")
    add_device_option(parser, "for embedding a checkpoint's split")
    add_batch_size_option(parser)
    add_data_root_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of every subsample")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nirdml.analysis import analyze, format_table
    from nirdml.devices import resolve_device

    resolve_device(args.device, "--device")
    result = analyze(embeddings=args.embeddings, checkpoint=args.checkpoint, out_dir=args.out,
                     split=args.split, flow_classes=args.flow_classes, plots=not args.no_plots,
                     device=args.device, batch_size=args.batch_size, data_root=args.data_root,
                     seed=args.seed)
    print(format_table(result))
    written = ["analysis.json"] + [Path(p).name for p in result["plots"].values()]
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0
