"""``nirdml embed``: write the embeddings of a dataset split to an npz file."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import (
    add_batch_size_option,
    add_data_root_option,
    add_device_option,
    add_overwrite_option,
)

HELP = "embed a split of a checkpoint's dataset and save embeddings.npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. best.pt)")
    parser.add_argument("--out", required=True, help="output .npz (embeddings, labels, masks)")
    add_overwrite_option(parser, "an embeddings file")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="which split of the checkpoint's dataset to embed (train without "
                             "augmentation)")
    add_device_option(parser, "for embedding")
    add_batch_size_option(parser)
    add_data_root_option(parser)


def run(args: argparse.Namespace) -> int:
    from nirdml.devices import resolve_device
    from nirdml.embeddings import is_embeddings_file
    from nirdml.files import check_output_file
    from nirdml.inference import TrainedRun

    check_output_file(args.out, "--out", is_embeddings_file, args.overwrite)
    resolve_device(args.device, "--device")
    run = TrainedRun.open(args.checkpoint, args.device, args.data_root)
    emb = run.embed(args.split, args.batch_size, progress=args.split)
    emb.save_npz(args.out)
    print(f"wrote {emb.embeddings.shape[0]} x {emb.embeddings.shape[1]} embeddings of "
          f"{run.config.data.name}/{args.split} to {args.out}")
    return 0
