"""``nirdml search``: the nearest gallery items of query images in an index directory."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import add_device_option, positive_int

HELP = "search an index (nirdml index build) with query images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="an index directory")
    parser.add_argument("--query", required=True, nargs="+", metavar="IMG",
                        help="query image file(s)")
    parser.add_argument("-k", "--k", type=positive_int, default=10, help="results per query")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--checkpoint", default=None,
                        help="the model to embed queries with (default: the one the index "
                             "remembers; it must be the same model)")
    parser.add_argument("--rerank", default=None, metavar="NAME[:K=V,...]",
                        help="re-rank the hits: alpha_qe or dba, optionally with parameters "
                             "(e.g. alpha_qe:n=5,alpha=0; flat indexes; default: none)")
    add_device_option(parser, "for embedding the queries")


def run(args: argparse.Namespace) -> int:
    from nirdml.devices import resolve_device
    from nirdml.evaluation.rerank import parse_served
    from nirdml.retrieval import Retriever

    resolve_device(args.device, "--device")
    parse_served(args.rerank)  # a bad re-ranking is refused before the model loads
    retriever = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    results = retriever.search(args.query, k=args.k, rerank=args.rerank)
    if args.json:
        print(results.to_json())
        return 0
    for q, name in enumerate(results.queries):
        match = "" if results.threshold is None else \
            f" (same item: cosine > {results.threshold:.4f})"
        print(f"query {name}:{match}")
        same = "" if results.threshold is None else f"{'same':>4}  "
        print(f"  {'rank':>4}  {'cosine':>6}  {same}{'class':<12}  gallery item")
        for hit in results.hits(q):
            label = hit.get("class", hit["label"])
            where = hit["path"] if hit["path"] is not None else f"item {hit['id']}"
            flag = "" if "same_item" not in hit else f"{'yes' if hit['same_item'] else 'no':>4}  "
            print(f"  {hit['rank']:>4}  {hit['score']:.4f}  {flag}{str(label):<12}  {where}")
    return 0
