"""Benchmark ``nirdml.evaluation.evaluate`` against pytorch-metric-learning's AccuracyCalculator.

Runs, each in its own subprocess so that its peak RSS (``ru_maxrss`` from ``os.wait4``) is its
own, on synthetic clustered data of the Stanford Online Products test size (60,502 x 128, 11,316
classes of 2-12 samples, 12 super-classes so that negatives can be hard):

1. head to head on the metrics both compute (recall@1 = PML's precision_at_1, map@r,
   r_precision): ours vs PML (``k="max_bin_count"``), wall time, peak RSS, agreement;
2. our full SOP set alone (recall@{1,10,100,1000}, map@r, r_precision, map@1000, nmi);
3. 1,000,000 x 128 with 100,000 classes, ours alone (recall@1, map@r) -- ``--skip-1m`` skips it,
   ``--1m-query-fraction F`` times only the first F of the queries (all 1M are the gallery) and
   extrapolates the time linearly (the search is linear in the number of queries);
4. the two-pass neighbour search (bfloat16 candidates, float32 re-scoring; ``precision="auto"``)
   against one float32 pass, on the SOP set's selection metrics (recall@1, map@r), its full
   set (k = 1000) and the 1M set: times side by side (alternating pairs with ``--repeat``),
   their ratio, and whether every metric is identical (``--only-precision`` runs only this).

Times cover the evaluation call only (data loading and imports excluded); RSS and the child's
CPU time (user + sys, a check that is less sensitive to other jobs sharing the CPU) include them.
Usage: ``python benchmarks/bench_evaluation.py [--skip-1m] [--1m-query-fraction 0.1]
[--repeat 3] [--torch-backend]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

H2H_METRICS = ["recall@1", "map@r", "r_precision"]
PML_KEYS = {"recall@1": "precision_at_1", "map@r": "mean_average_precision_at_r",
            "r_precision": "r_precision"}


# ----------------------------------------------------------------------------- data
def class_sizes(n: int, n_classes: int, lo: int, hi: int, rng) -> np.ndarray:
    """``n_classes`` sizes in [lo, hi], skewed to small ones, every size present, sum ``n``."""
    scale = max(n / n_classes - lo, 0.5)
    sizes = np.minimum(lo + np.floor(rng.exponential(scale, size=n_classes)), hi).astype(int)
    fixed = np.zeros(n_classes, dtype=bool)
    fixed[: hi - lo + 1] = True
    sizes[: hi - lo + 1] = np.arange(lo, hi + 1)  # every size occurs at least once
    diff = n - int(sizes.sum())
    while diff:
        step = 1 if diff > 0 else -1
        ok = np.flatnonzero(~fixed & (sizes + step >= lo) & (sizes + step <= hi))
        sizes[rng.choice(ok, size=min(abs(diff), ok.size), replace=False)] += step
        diff = n - int(sizes.sum())
    return rng.permutation(sizes)


def make_data(n, n_classes, dim=128, lo=2, hi=12, seed=0, noise=1.15, n_super=12):
    """L2-normalised float32 embeddings: class centres around super-class directions + noise."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n, n_classes, lo, hi, rng)
    labels = rng.permutation(np.repeat(np.arange(n_classes), sizes)).astype(np.int64)
    sup = rng.standard_normal((n_super, dim))
    sup /= np.linalg.norm(sup, axis=1, keepdims=True)
    centres = 0.9 * sup[rng.integers(0, n_super, n_classes)]
    centres += rng.standard_normal((n_classes, dim)) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        blk = centres[labels[s:e]] + noise * rng.standard_normal((e - s, dim)) / np.sqrt(dim)
        x[s:e] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return x, labels


# ----------------------------------------------------------------------------- children
def child(mode: str, data_dir: str, backend: str, fraction: float, precision: str) -> None:
    """Run one measurement and print one JSON line (time in seconds, results)."""
    x = np.load(os.path.join(data_dir, "x.npy"))
    y = np.load(os.path.join(data_dir, "y.npy"))
    if mode == "pml":
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=tuple(PML_KEYS.values()), k="max_bin_count",
                                  device=torch.device("cpu"))
        t0 = time.perf_counter()
        res = calc.get_accuracy(x, y)
        seconds = time.perf_counter() - t0
        res = {ours: float(res[theirs]) for ours, theirs in PML_KEYS.items()}
    else:
        if backend in ("auto", "faiss"):
            import faiss  # noqa: F401  (import cost outside the timing, as for PML)
        import nirdml.evaluation.twopass  # noqa: F401  (torch: imported by any real caller)
        from nirdml.evaluation import SOP_RECALL_KS, evaluate

        kwargs = {"backend": backend, "precision": precision}
        if mode == "h2h":
            kwargs["metrics"] = H2H_METRICS
        elif mode == "full":
            kwargs.update(metrics=["recall", "map@r", "r_precision", "map@1000", "nmi"],
                          recall_ks=SOP_RECALL_KS)
        elif mode == "select":  # what training selects on and the study reports
            kwargs["metrics"] = ["recall@1", "map@r"]
        elif mode == "1m":
            kwargs["metrics"] = ["recall@1", "map@r"]
            if fraction < 1.0:
                q = np.zeros(len(y), dtype=bool)
                q[: max(1, int(round(fraction * len(y))))] = True
                kwargs["query_mask"] = q
        t0 = time.perf_counter()
        res = evaluate(x, y, **kwargs)
        seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "results": res}), flush=True)


def run_child(mode: str, data_dir: str, backend: str = "auto", fraction: float = 1.0,
              precision: str = "auto") -> dict:
    """Start a child, wait for it with ``os.wait4`` and return its result plus peak RSS (GiB)."""
    cmd = [sys.executable, __file__, "--child", mode, "--data", data_dir, "--backend", backend,
           "--1m-query-fraction", str(fraction), "--precision", precision]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed with exit code {proc.returncode}:\n{out}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30  # Linux reports KiB
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole child, setup included
    return result


def save_data(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "x.npy", x)
    np.save(path / "y.npy", y)
    return str(path)


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (its RSS and results), RSS replaced by the largest seen."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    best = dict(ordered[(len(ordered) - 1) // 2])
    best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return best


def fmt(name: str, r: dict) -> str:
    return (f"  {name:<26} {r['seconds']:8.2f} s   peak RSS {r['peak_rss_gib']:6.2f} GiB   "
            f"child CPU {r['cpu_seconds']:7.1f} s   load {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-1m", action="store_true", help="skip the 1,000,000-sample run")
    ap.add_argument("--1m-query-fraction", dest="fraction", type=float, default=1.0,
                    help="time this fraction of the 1M queries and extrapolate")
    ap.add_argument("--repeat", type=int, default=1,
                    help="head-to-head pairs to run (alternating); medians are compared")
    ap.add_argument("--torch-backend", action="store_true",
                    help="also time our torch backend head to head")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink every data set by this factor (smoke tests)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--only-precision", action="store_true",
                    help="run only part [4], the two-pass search against one float32 pass")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.backend, args.fraction, args.precision)
        return

    print(f"cpu cores: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        x, y = make_data(int(60502 * args.scale), int(11316 * args.scale), lo=2, hi=12, seed=0)
        sop = save_data(Path(tmp) / "sop", x, y)
        print(f"SOP-sized data: {x.shape}, {len(np.unique(y))} classes, "
              f"sizes {np.bincount(y).min()}-{np.bincount(y).max()}")

        if args.only_precision:
            big = None
            if not args.skip_1m:
                x, y = make_data(int(1_000_000 * args.scale), int(100_000 * args.scale),
                                 lo=2, hi=18, seed=1)
                big = save_data(Path(tmp) / "1m", x, y)
                del x, y
            two_pass_against_float32(sop, big, args)
            return
        print("\n[1] head to head (recall@1, map@r, r_precision)")
        pml_runs, our_runs = [], []
        for _ in range(args.repeat):  # alternate, so that changing CPU contention hits both
            pml_runs.append(run_child("pml", sop))
            print(fmt("PML AccuracyCalculator", pml_runs[-1]))
            our_runs.append(run_child("h2h", sop))
            print(fmt("nirdml (faiss backend)", our_runs[-1]))
        pml, ours = median_run(pml_runs), median_run(our_runs)
        if args.repeat > 1:
            print(fmt("PML median", pml))
            print(fmt("nirdml median", ours))
        extra = {}
        if args.torch_backend:
            extra = run_child("h2h", sop, backend="torch")
            print(fmt("nirdml (torch backend)", extra))
        for key in H2H_METRICS:
            a, b = ours["results"][key], pml["results"][key]
            line = f"    {key:<12} ours {a:.6f}  PML {b:.6f}  |diff| {abs(a - b):.2e}"
            if extra:
                line += f"  torch {extra['results'][key]:.6f}"
            print(line)
        worst = max(abs(ours["results"][k] - pml["results"][k]) for k in H2H_METRICS)
        print(f"    values agree: {worst < 1e-4} (max |diff| {worst:.2e}; one query of "
              f"{len(y):,} = {1 / len(y):.1e}; PML's L2 search may order float near-ties "
              "differently)")

        print("\n[2] our full SOP set (recall@1,10,100,1000, map@r, r_precision, map@1000, nmi)")
        full = run_child("full", sop)
        print(fmt("nirdml full SOP set", full))
        print("    " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in full["results"].items()))
        del x, y

        if not args.skip_1m:
            n1m, c1m = int(1_000_000 * args.scale), int(100_000 * args.scale)
            print(f"\n[3] {n1m:,} x 128, {c1m:,} classes (recall@1, map@r)")
            x, y = make_data(n1m, c1m, lo=2, hi=18, seed=1)
            big = save_data(Path(tmp) / "1m", x, y)
            del x, y
            r1m = run_child("1m", big, fraction=args.fraction)
            print(fmt(f"nirdml 1M ({args.fraction:g} of queries)", r1m))
            if args.fraction < 1.0:
                print(f"    extrapolated to all queries: {r1m['seconds'] / args.fraction:.0f} s")
            print("    " + ", ".join(f"{k}={v}" for k, v in r1m["results"].items()))

        two_pass_against_float32(sop, big if not args.skip_1m else None, args)
        print(f"\nload average at end: {os.getloadavg()}")
        print(f"peak RSS ratio ours/PML: {ours['peak_rss_gib'] / pml['peak_rss_gib']:.3f}")
        print(f"time ratio ours/PML: {ours['seconds'] / pml['seconds']:.3f} "
              f"({pml['seconds'] / ours['seconds']:.2f}x faster)")


def two_pass_against_float32(sop: str, big: str | None, args) -> None:
    """Part [4]: evaluation with the two-pass search (bfloat16 candidates, float32 re-scoring)
    against one float32 pass, in alternating pairs of fresh processes: times, their ratio, and
    whether every metric is identical."""
    from nirdml.evaluation.knn import bf16_native

    print(f"\n[4] two passes (bfloat16 + float32 re-scoring) against one float32 pass; "
          f"native bfloat16 on this CPU: {bf16_native()}")
    cases = [("SOP selection set (recall@1, map@r)", "select", sop, 1.0),
             ("SOP full set (k = 1000)", "full", sop, 1.0)]
    if big is not None:
        cases.append((f"1M (recall@1, map@r; {args.fraction:g} of queries)", "1m", big,
                      args.fraction))
    for title, mode, data, fraction in cases:
        runs = {"float32": [], "auto": []}
        for _ in range(max(args.repeat, 1)):
            for precision in runs:
                runs[precision].append(run_child(mode, data, fraction=fraction,
                                                 precision=precision))
        one, two = median_run(runs["float32"]), median_run(runs["auto"])
        same = one["results"] == two["results"]
        print(f"  {title}")
        print(fmt("one float32 pass", one))
        print(fmt("two passes", two))
        print(f"    two passes / float32 time: {two['seconds'] / one['seconds']:.3f} "
              f"({one['seconds'] / two['seconds']:.2f}x faster); metrics identical: {same}")
        if not same:
            print(f"    float32: {one['results']}\n    two pass: {two['results']}")


if __name__ == "__main__":
    main()
