"""``nirdml evaluate``: retrieval / clustering metrics of saved embeddings or a checkpoint."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import add_data_root_option, add_device_option, positive_float
from nirdml.evaluation.names import DEFAULT_METRICS, DEFAULT_RECALL_KS, SOP_RECALL_KS

HELP = "Compute Recall@k, MAP@R, R-Precision, mAP@1000, NMI, AMI and F1 for embeddings."


def _ks(ks) -> str:
    return " ".join(str(k) for k in ks)


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
    add_data_root_option(src, "with --checkpoint: ")
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
        help=f"k values for 'recall' and 'precision' (default {_ks(DEFAULT_RECALL_KS)}; "
        f"SOP: {_ks(SOP_RECALL_KS)})",
    )
    parser.add_argument(
        "--backend", choices=("auto", "faiss", "torch"), default="auto",
        help="neighbour search / k-means backend (auto: faiss when installed)",
    )
    parser.add_argument(
        "--precision", choices=("auto", "float32"), default="auto",
        help="neighbour search in two passes (bfloat16 candidates, float32 re-scoring) where "
             "the hardware has native bfloat16 and it pays (auto), or one float32 pass; the "
             "metrics are the same",
    )
    parser.add_argument(
        "--rerank", default=None, metavar="NAME[:K=V,...]",
        help="re-rank the neighbour lists before the ranking metrics: none, alpha_qe, dba or "
        "k_reciprocal, optionally with parameters, e.g. alpha_qe:n=3,alpha=1 (default: none)",
    )
    parser.add_argument(
        "--fnmr-at-fmr", nargs="*", type=positive_float, default=[1e-2, 1e-3], metavar="F",
        help="report the false non-match rate (and its cosine threshold) at these target "
        "false-match rates over all query-gallery pairs (default: 1e-2 1e-3; none: give the "
        "option without values)",
    )
    add_device_option(parser, "for the torch backend and for embedding a checkpoint")
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
        "recall_ks": tuple(args.recall_ks or recall_ks or DEFAULT_RECALL_KS),
        "backend": args.backend,
        "precision": args.precision,
        "device": args.device,
        "kmeans_seed": args.kmeans_seed,
        "max_memory_mb": args.max_memory_mb,
        "progress": "evaluate",  # bars on stderr (shown on a terminal)
        "rerank": args.rerank,
        "fnmr_at_fmr": tuple(args.fnmr_at_fmr),
    }


def run(args: argparse.Namespace) -> int:
    """Evaluate the chosen input, print a table and optionally write JSON."""
    from nirdml.console import print_metrics_table
    from nirdml.devices import resolve_device
    from nirdml.errors import ConfigError
    from nirdml.evaluation import evaluate_npz, write_metrics_json

    if args.embeddings and args.checkpoint:
        raise ConfigError("pass either --embeddings or --checkpoint, not both")
    resolve_device(args.device, "--device")
    from nirdml.evaluation.rerank import parse_rerank
    from nirdml.evaluation.verification import check_rates

    parse_rerank(args.rerank)  # bad names and values fail before any embedding
    check_rates(args.fnmr_at_fmr)
    if args.json:
        from nirdml.files import check_writable_file

        check_writable_file(args.json, "--json")
    if args.embeddings:
        results = evaluate_npz(args.embeddings, **_evaluate_kwargs(args))
        title = f"nirdml evaluate: {args.embeddings}"
    elif args.checkpoint:
        from nirdml.evaluation import evaluate
        from nirdml.inference import TrainedRun

        run = TrainedRun.open(args.checkpoint, args.device, args.data_root)
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
