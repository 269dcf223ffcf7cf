"""Does re-ranking pay? Each method's parameters chosen on the validation classes, measured
on the test classes, paired over trained runs (seeds).

For every run folder (``RUN/checkpoints/best.pt``) the validation and test splits are embedded
once; each re-ranking method of ``nirdml.evaluation.rerank`` searches its grid on the
validation classes (MAP@R, ``nirdml.selection.rerank.select_rerank``, as ``nirdml tune
--rerank`` does), and the chosen parameters are applied to the test classes. Printed
and written (``--out``: ``.md`` and ``.json``): R@1 and MAP@R of the plain ranking and of each
method, their paired differences (mean +- std over runs), and each method's time per query as a
ratio to the plain exact search measured in the same run.

    python benchmarks/bench_rerank.py --runs runs/a/proxy_anchor/runs/base-seed{1,2,3} \\
        --root ../shared/data/omniglot --out docs/results/rerank_setting_a
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METRICS = ["recall@1", "map@r"]


def timed_eval(emb, spec: str, protocol: str) -> tuple[dict, float]:
    from nirdml.evaluation import evaluate
    from nirdml.selection.rerank import split_masks

    q, g = split_masks(emb.labels) if protocol == "split" else (None, None)
    start = time.perf_counter()
    res = evaluate(emb.embeddings, emb.labels, METRICS, query_mask=q, gallery_mask=g,
                   rerank=spec)
    return res, time.perf_counter() - start


def measure(run: Path, root: str | None, methods: list[str], protocol: str) -> dict:
    from nirdml.inference import TrainedRun
    from nirdml.selection.rerank import select_rerank

    trained = TrainedRun.open(run / "checkpoints" / "best.pt", "cpu", root)
    val, test = trained.embed("val"), trained.embed("test")
    out = {"run": str(run), "protocol": protocol, "val_size": len(val.labels),
           "test_size": len(test.labels)}
    plain, plain_s = timed_eval(test, "none", protocol)
    out["none"] = {"spec": "none", **plain, "seconds": plain_s}
    chosen = select_rerank(val.embeddings, val.labels, methods, "map@r", protocol)["methods"]
    for name in methods:
        best = chosen[name]["spec"]
        res, seconds = timed_eval(test, best, protocol)
        out[name] = {"spec": best, **res, "seconds": seconds, "val_map@r": chosen[name]["score"]}
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
