"""``nirdml embed``: write the embeddings of a dataset split to an npz file."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import positive_int

HELP = "embed a split of a checkpoint's dataset and save embeddings.npz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. best.pt)")
    parser.add_argument("--out", required=True, help="output .npz (embeddings, labels, masks)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out even when it is not an embeddings file nirdml wrote")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"],
                        help="which split of the checkpoint's dataset to embed (train without "
                             "augmentation)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default: the run's data.eval_batch_size)")
    parser.add_argument("--data-root", default=None,
                        help="dataset root, if it moved since training")


def run(args: argparse.Namespace) -> int:
    from nirdml.devices import resolve_device
    from nirdml.embeddings import is_embeddings_file
    from nirdml.files import check_output_file
    from nirdml.run import TrainedRun

    check_output_file(args.out, "--out", is_embeddings_file, args.overwrite)
    resolve_device(args.device, "--device")
    run = TrainedRun.open(args.checkpoint, args.device, args.data_root)
    emb = run.embed(args.split, args.batch_size, progress=args.split)
    emb.save_npz(args.out)
    print(f"wrote {emb.embeddings.shape[0]} x {emb.embeddings.shape[1]} embeddings of "
          f"{run.config.data.name}/{args.split} to {args.out}")
    return 0
