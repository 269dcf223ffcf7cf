"""``nirdml upgrade-checkpoint``: convert a checkpoint of the old pickle format to the safe one.

Format-1 checkpoints were pickles, which run code when opened; nirdml refuses to open them.
This command is the one explicit way to convert one you trust (``--trust`` is required).
"""

from __future__ import annotations

import argparse

HELP = "convert a format-1 (pickle) checkpoint you trust to the safe format 2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the format-1 checkpoint file")
    parser.add_argument("--out", default=None,
                        help="where to write the format-2 file (default: in place; the old file "
                             "is kept as CHECKPOINT.format1)")
    parser.add_argument("--trust", action="store_true",
                        help="required: unpickling the old file runs any code it holds, so only "
                             "convert files you made or whose maker you trust")


def run(args: argparse.Namespace) -> int:
    from nirdml.training.checkpoint import upgrade_checkpoint

    out = upgrade_checkpoint(args.checkpoint, args.out, trust=args.trust)
    print(f"wrote format-2 checkpoint {out}")
    return 0
