"""Does NIR help? Every proxy loss with and without NIR on real Omniglot, same budget, 3 seeds.

Train on the 964 background classes (10% held out as validation classes), test retrieval on the
659 unseen evaluation classes; small CNN from scratch. The epoch is selected on the validation
classes. Writes ``OUT/results.md`` (mean +- std over seeds of test recall@1, map@r, nmi, epochs
to 95% of the final validation recall@1, median seconds per epoch, NIR overhead; for a clean
overhead figure use ``bench_train_step.py``), ``OUT/results.json``
and ``OUT/convergence.png`` (validation recall@1 per epoch, every arm).

    python benchmarks/omniglot_nir.py --out runs/omniglot_bench            # the full grid
    python benchmarks/omniglot_nir.py --quick --out runs/omniglot_quick    # a few minutes

Data: ``--root`` (default ``../shared/data/omniglot`` next to the repository).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "omniglot"

# arm name -> config overrides on top of the shipped omniglot_pa config
ARMS = {
    "ProxyAnchor": ["loss.name=proxy_anchor", "loss.nir.enabled=false"],
    "ProxyAnchor + NIR": ["loss.name=proxy_anchor", "loss.nir.enabled=true"],
    "ProxyAnchor + NIR (paper mode)": ["loss.name=proxy_anchor", "loss.nir.enabled=true",
                                       "loss.nir.mode=paper"],
    "ProxyNCA": ["loss.name=proxy_nca", "loss.nir.enabled=false"],
    "ProxyNCA + NIR": ["loss.name=proxy_nca", "loss.nir.enabled=true"],
    "SoftTriple": ["loss.name=soft_triple", "loss.nir.enabled=false"],
    "SoftTriple + NIR": ["loss.name=soft_triple", "loss.nir.enabled=true"],
}


def run_arm(name: str, overrides: list[str], seed: int, out: Path, root: Path,
            extra: list[str]) -> dict:
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    folder = out / "runs" / f"{slug}-seed{seed}"
    final_path = folder / "final.json"
    if final_path.exists():  # finished earlier: reuse (the benchmark itself resumes)
        final = json.loads(final_path.read_text())
    else:
        cfg = load_config("omniglot_pa", [f"data.root={root}", f"seed={seed}",
                                          "train.progress=false", "train.tensorboard=false",
                                          *overrides, *extra])
        resume = (folder / "checkpoints" / "last.pt").exists()
        final = Trainer(cfg, folder, resume=resume).fit()
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"final": final, "history": history}


def epochs_to_95(history: list[dict]) -> int | None:
    curve = [h.get("val/recall@1") for h in history if "val/recall@1" in h]
    if not curve:
        return None
    target = 0.95 * curve[-1]
    return next(i + 1 for i, v in enumerate(curve) if v >= target)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    base_time = {}
    for arm, runs in results.items():
        # median over every epoch of every seed: robust to a run that shared the CPU
        secs = [h["time/epoch_s"] for r in runs for h in r["history"]]
        row = {"arm": arm, "seeds": len(runs), "sec_per_epoch": statistics.median(secs)}
        for key in ("recall@1", "map@r", "nmi"):
            vals = [100 * r["final"][key] for r in runs]
            row[key] = (statistics.mean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0)
        e95 = [epochs_to_95(r["history"]) for r in runs]
        e95 = [e for e in e95 if e is not None]
        row["epochs_to_95"] = statistics.mean(e95) if e95 else None
        rows.append(row)
        if "NIR" not in arm:
            base_time[arm] = row["sec_per_epoch"]
    for row in rows:
        base = row["arm"].split(" + ")[0]
        row["overhead"] = row["sec_per_epoch"] / base_time[base] if base in base_time else None
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| arm | R@1 | MAP@R | NMI | epochs to 95% | s/epoch | time vs base |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        def pm(k, r=r):
            return f"{r[k][0]:.2f} +- {r[k][1]:.2f}"
        e95 = "-" if r["epochs_to_95"] is None else f"{r['epochs_to_95']:.1f}"
        ov = "-" if r["overhead"] is None else f"{r['overhead']:.2f}x"
        lines.append(f"| {r['arm']} | {pm('recall@1')} | {pm('map@r')} | {pm('nmi')} | {e95} | "
                     f"{r['sec_per_epoch']:.1f} | {ov} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in results.items():
        curves = [[h["val/recall@1"] * 100 for h in r["history"] if "val/recall@1" in h]
                  for r in runs]
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=arm, linestyle="-" if "NIR" in arm else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation recall@1 (%)")
    ax.set_title("Omniglot: validation classes, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "omniglot_bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="extra config override applied to every arm (e.g. loss.nir.weight=0.1)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 3 epochs, ProxyAnchor with/without NIR only")
    args = p.parse_args(argv)
    if not args.root.exists():
        print(f"Omniglot not found at {args.root}; pass --root", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds = args.seeds[:1]
        args.arms = ["ProxyAnchor", "ProxyAnchor + NIR"]
        args.epochs = args.epochs or 3
    extra = list(args.extra) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    start = time.time()
    results: dict[str, list[dict]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            t0 = time.time()
            results.setdefault(arm, []).append(
                run_arm(arm, ARMS[arm], seed, args.out, args.root, extra))
            r1 = results[arm][-1]["final"]["recall@1"]
            print(f"{arm} seed {seed}: test R@1 {100 * r1:.2f} ({time.time() - t0:.0f}s)",
                  flush=True)
    rows = summarize(results)
    header = (f"Omniglot, small CNN, {len(args.seeds)} seed(s), overrides {extra or 'none'}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"total {time.time() - start:.0f}s")
    text = markdown(rows, header)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(results, args.out / "convergence.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
