"""``nirdml evaluate``: retrieval / clustering metrics of saved embeddings or a checkpoint."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import positive_float

HELP = "Compute Recall@k, MAP@R, R-Precision, mAP@1000, NMI, AMI and F1 for embeddings."
# Same as nirdml.evaluation.DEFAULT_METRICS (not imported here: keep `nirdml --help` light).
DEFAULT_METRICS = ["recall", "map@r", "r_precision", "map@1000", "nmi", "f1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options (input source, metrics, backend, output)."""
    src = parser.add_argument_group("input")
    src.add_argument(
        "--embeddings",
        metavar="FILE.npz",
        help="npz with 'embeddings' (N x D float), 'labels' (N int) and optional "
        "'is_query'/'is_gallery' (bool) for a query/gallery split",
    )
    src.add_argument(
        "--checkpoint",
        metavar="CK.pt",
        help="a training checkpoint: embed a split of its own dataset, then evaluate it with "
        "the run's eval settings (unless --metrics / --recall-ks are given)",
    )
    src.add_argument(
        "--split", choices=("train", "val", "test"), default="test",
        help="with --checkpoint: which split to embed (default: test)",
    )
    src.add_argument(
        "--data-root", default=None, help="with --checkpoint: dataset root if it moved"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="any of recall, recall@K, precision, precision@K, map@r, r_precision, map@1000, "
        "nmi, ami, f1 (default: " + " ".join(DEFAULT_METRICS) + ")",
    )
    parser.add_argument(
        "--recall-ks",
        nargs="+",
        type=int,
        default=None,
        metavar="K",
        help="k values for 'recall' and 'precision' (default 1 2 4 8; SOP: 1 10 100 1000)",
    )
    parser.add_argument(
        "--backend", choices=("auto", "faiss", "torch"), default="auto",
        help="neighbour search / k-means backend (auto: faiss when installed)",
    )
    parser.add_argument(
        "--device", default=None,
        help="device for the torch backend and for embedding a checkpoint "
        "(default: cuda when available)",
    )
    parser.add_argument("--kmeans-seed", type=int, default=0, help="k-means seed")
    parser.add_argument(
        "--max-memory-mb", type=positive_float, default=None,
        help="memory for query blocks; None: a quarter of the available, at most 512 MiB",
    )
    parser.add_argument(
        "--json", metavar="OUT.json", default=None, help="also write the metrics as JSON"
    )


def _evaluate_kwargs(args: argparse.Namespace, metrics=None, recall_ks=None) -> dict:
    """Options shared by every input source (explicit flags win over a run's settings)."""
    return {
        "metrics": args.metrics or metrics or DEFAULT_METRICS,
        "recall_ks": tuple(args.recall_ks or recall_ks or (1, 2, 4, 8)),
        "backend": args.backend,
        "device": args.device,
        "kmeans_seed": args.kmeans_seed,
        "max_memory_mb": args.max_memory_mb,
        "progress": "evaluate",  # bars on stderr (shown on a terminal)
    }


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen input, print a table and optionally write JSON."""
    from nirdml.errors import ConfigError
    from nirdml.evaluation import evaluate_npz, print_metrics_table, write_metrics_json

    if args.embeddings and args.checkpoint:
        raise ConfigError("pass either --embeddings or --checkpoint, not both")
    if args.device is not None:
        from nirdml.devices import resolve_device

        resolve_device(args.device, "--device")
    if args.json:
        from nirdml.files import check_writable_file

        check_writable_file(args.json, "--json")
    if args.embeddings:
        results = evaluate_npz(args.embeddings, **_evaluate_kwargs(args))
        title = f"nirdml evaluate: {args.embeddings}"
    elif args.checkpoint:
        from nirdml.evaluation import evaluate
        from nirdml.run import TrainedRun

        run = TrainedRun.open(args.checkpoint, args.device or "auto", args.data_root)
        emb, cfg = run.embed(args.split, progress=args.split), run.config
        results = evaluate(
            emb.embeddings, emb.labels, query_mask=emb.is_query, gallery_mask=emb.is_gallery,
            **_evaluate_kwargs(args, cfg.eval.metrics, cfg.eval.recall_ks),
        )
        title = f"nirdml evaluate: {args.checkpoint} ({cfg.data.name}, {args.split} split)"
    else:
        raise ConfigError(
            "nothing to evaluate: pass --embeddings FILE.npz or "
            "--checkpoint RUN/checkpoints/best.pt"
        )
    print_metrics_table(results, title=title)
    if args.json:
        write_metrics_json(results, args.json)
        print(f"wrote {args.json}")
    return 0
