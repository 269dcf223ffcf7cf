"""Does re-ranking pay? Each method's parameters chosen on the validation classes, measured
on the test classes, paired over trained runs (seeds).

For every run folder (``RUN/checkpoints/best.pt``) the validation and test splits are embedded
once; each re-ranking method of ``nirdml.evaluation.rerank`` searches its grid on the
validation classes (MAP@R), and the chosen parameters are applied to the test classes. Printed
and written (``--out``: ``.md`` and ``.json``): R@1 and MAP@R of the plain ranking and of each
method, their paired differences (mean +- std over runs), and each method's time per query as a
ratio to the plain exact search measured in the same run.

    python benchmarks/bench_rerank.py --runs runs/a/proxy_anchor/runs/base-seed{1,2,3} \\
        --root ../shared/data/omniglot --out docs/results/rerank_setting_a
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

METRICS = ["recall@1", "map@r"]


def grid_specs(name: str) -> list[str]:
    """Every ``name:k=v,...`` of the method's grid (its defaults where the grid is silent)."""
    from nirdml.evaluation.rerank import RERANKERS

    method = RERANKERS[name]
    keys = list(method.grid)
    if not keys:
        return [name]
    return [name + ":" + ",".join(f"{k}={v}" for k, v in zip(keys, values))
            for values in itertools.product(*(method.grid[k] for k in keys))]


def split_masks(labels):
    """The outside-query protocol: in each class every second item (in order) is a query, the
    others the gallery, so no query is a gallery item (as for a served index)."""
    import numpy as np

    rank = np.zeros(labels.size, np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(members.size)
    return rank % 2 == 1, rank % 2 == 0


def timed_eval(emb, spec: str, protocol: str) -> tuple[dict, float]:
    from nirdml.evaluation import evaluate

    q, g = split_masks(emb.labels) if protocol == "split" else (None, None)
    start = time.perf_counter()
    res = evaluate(emb.embeddings, emb.labels, METRICS, query_mask=q, gallery_mask=g,
                   rerank=spec)
    return res, time.perf_counter() - start


def measure(run: Path, root: str | None, methods: list[str], protocol: str) -> dict:
    from nirdml.inference import TrainedRun

    trained = TrainedRun.open(run / "checkpoints" / "best.pt", "cpu", root)
    val, test = trained.embed("val"), trained.embed("test")
    out = {"run": str(run), "protocol": protocol, "val_size": len(val.labels),
           "test_size": len(test.labels)}
    plain, plain_s = timed_eval(test, "none", protocol)
    out["none"] = {"spec": "none", **plain, "seconds": plain_s}
    for name in methods:
        scored = [(timed_eval(val, spec, protocol)[0]["map@r"], spec)
                  for spec in grid_specs(name)]
        best = max(scored, key=lambda t: t[0])[1]
        res, seconds = timed_eval(test, best, protocol)
        out[name] = {"spec": best, **res, "seconds": seconds, "val_map@r": max(scored)[0]}
        print(f"{run.name} ({protocol}): {best:40s} R@1 {100 * res['recall@1']:.2f} "
              f"MAP@R {100 * res['map@r']:.2f} ({seconds:.1f} s)", flush=True)
    return out


def table(rows: list[dict], methods: list[str]) -> str:
    def ms(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = ["| method | chosen on val (per run) | test R@1 | test MAP@R | dR@1 | dMAP@R "
             "| time / query vs plain |", "|---|---|---|---|---|---|---|"]
    for name in ["none", *methods]:
        r1 = ms([100 * r[name]["recall@1"] for r in rows])
        mp = ms([100 * r[name]["map@r"] for r in rows])
        d1 = ms([100 * (r[name]["recall@1"] - r["none"]["recall@1"]) for r in rows])
        dm = ms([100 * (r[name]["map@r"] - r["none"]["map@r"]) for r in rows])
        ratio = statistics.mean(r[name]["seconds"] / r["none"]["seconds"] for r in rows)
        specs = "; ".join(r[name]["spec"].partition(":")[2] or "-" for r in rows)
        lines.append(f"| {name} | {specs} | {r1[0]:.2f} ± {r1[1]:.2f} | {mp[0]:.2f} ± "
                     f"{mp[1]:.2f} | {d1[0]:+.2f} ± {d1[1]:.2f} | {dm[0]:+.2f} ± {dm[1]:.2f} "
                     f"| {ratio:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from nirdml.evaluation.rerank import RERANKERS

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="trained run folders")
    p.add_argument("--root", default=None, help="the dataset root (default: the runs' own)")
    p.add_argument("--methods", nargs="+", default=[m for m in RERANKERS if m != "none"])
    p.add_argument("--protocol", choices=["all", "split"], default="all",
                   help="all: every item a query against all others (the DML protocol); "
                        "split: half of each class queries the other half (served queries)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "checkpoints" / "best.pt").is_file()]
    if missing:
        print(f"no checkpoints/best.pt in: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = [measure(run, args.root, args.methods, args.protocol) for run in args.runs]
    what = ("every test item queries all others" if args.protocol == "all" else
            "half of each test class queries the other half")
    text = (f"Re-ranking on the test classes ({what}), parameters chosen on the validation "
            f"classes (MAP@R, same protocol), {len(rows)} runs; ± is the std over runs, d = "
            f"paired difference to the plain ranking.\n\n{table(rows, args.methods)}\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
