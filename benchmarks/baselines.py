"""The baselines under one protocol: every loss on Omniglot, cross-validated as in Musgrave,
Belongie and Lim, "A Metric Learning Reality Check" (ECCV 2020).

For every loss (its shipped config ``omniglot_<loss>``; ProxyAnchor's is ``omniglot_pa``) and
seed, ``nirdml crossval``'s protocol: the 964 background classes are split into ``--folds``
class-disjoint folds, one small CNN per fold trains on the others and selects its epoch on its
held-out fold; the 659 evaluation classes are the test set, for each fold model ("separated",
averaged over the folds) and for the fold ensemble ("concatenated" L2-normalised embeddings).
Writes ``OUT/results.md`` (test R@1, MAP@R and NMI, mean +- std over seeds, both ways, and the
validation R@1), ``OUT/results.json`` and every run under ``OUT/runs/<loss>-seed<k>/`` (finished
folds are reused and an unfinished one resumes, so the script itself resumes).

    python benchmarks/baselines.py --epochs 4 --seeds 0 1 2 --out runs/baselines   # hours on a CPU
    python benchmarks/baselines.py --losses triplet arcface --epochs 1 --seeds 0 --folds 2 \\
        --out runs/baselines_smoke
    python benchmarks/baselines.py --digits --epochs 1 --seeds 0 --folds 2 --out runs/bl_digits

Data: ``--root`` (default ``../shared/data/omniglot`` next to the repository); ``--digits``
runs the same grid on the offline digits instead (a smoke test of the script, not a result).
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

# loss -> shipped config (NIR off in every one of them)
CONFIGS = {
    "proxy_anchor": "omniglot_pa",
    "proxy_nca": "omniglot_proxy_nca",
    "soft_triple": "omniglot_soft_triple",
    "norm_softmax": "omniglot_norm_softmax",
    "arcface": "omniglot_arcface",
    "cosface": "omniglot_cosface",
    "subcenter_arcface": "omniglot_subcenter_arcface",
    "contrastive": "omniglot_contrastive",
    "triplet": "omniglot_triplet",
    "multi_similarity": "omniglot_multi_similarity",
    "margin": "omniglot_margin",
}
# the digits smoke test: 5 training classes, so at most 2 classes per training batch
DIGITS = ["data.name=digits", "data.root=null", "data.image_size=null", "data.options={}",
          "data.batch_size=16", "data.samples_per_class=8", "model.embedding_dim=32"]
SHOWN = (("recall@1", "R@1"), ("map@r", "MAP@R"), ("nmi", "NMI"))


def run_loss(loss: str, seed: int, args, extra: list[str]) -> dict:
    """One cross-validation (resumable) of ``loss`` with ``seed``: its crossval summary."""
    from nirdml.crossval import crossval, print_log
    from nirdml.training.config import load_config

    overrides = [f"seed={seed}", "train.progress=false", "train.tensorboard=false"]
    overrides += DIGITS if args.digits else [f"data.root={args.root}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(CONFIGS[loss], overrides + extra)
    out = args.out / "runs" / f"{loss}-seed{seed}"
    summary = crossval(cfg, args.folds, out, log=print_log)
    secs = []
    for fold in summary["fold_runs"]:
        metrics = Path(fold["run"]) / "metrics.jsonl"
        secs += [json.loads(line)["time/epoch_s"] for line in metrics.read_text().splitlines()
                 if "time/epoch_s" in line]
    summary["sec_per_epoch"] = statistics.median(secs) if secs else None
    return summary


def _pm(values: list[float]) -> tuple[float, float]:
    values = [100 * v for v in values]
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per loss: mean and std over seeds of the concatenated and separated test metrics and
    of the validation R@1."""
    rows = []
    for loss, runs in results.items():
        row = {"loss": loss, "seeds": len(runs)}
        for key, _ in SHOWN:
            row[f"concat/{key}"] = _pm([r["test_concatenated"][key] for r in runs])
            row[f"separated/{key}"] = _pm([r["test_separated"]["mean"][key] for r in runs])
        row["val/recall@1"] = _pm([r["val"]["mean"]["recall@1"] for r in runs])
        secs = [r["sec_per_epoch"] for r in runs if r["sec_per_epoch"] is not None]
        row["sec_per_epoch"] = statistics.median(secs) if secs else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    cols = [f"{name} concat." for _, name in SHOWN] + [f"{name} sep." for _, name in SHOWN]
    lines = [header, "",
             "| loss | " + " | ".join(cols) + " | val R@1 | s/epoch |",
             "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        cells = [f"{r[f'concat/{k}'][0]:.2f} +- {r[f'concat/{k}'][1]:.2f}" for k, _ in SHOWN]
        cells += [f"{r[f'separated/{k}'][0]:.2f} +- {r[f'separated/{k}'][1]:.2f}"
                  for k, _ in SHOWN]
        val = r["val/recall@1"]
        sec = "-" if r["sec_per_epoch"] is None else f"{r['sec_per_epoch']:.1f}"
        lines.append(f"| {r['loss']} | " + " | ".join(cells)
                     + f" | {val[0]:.2f} +- {val[1]:.2f} | {sec} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA, help="the Omniglot data")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "baselines")
    p.add_argument("--losses", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs per fold model (0: each config's own, 20)")
    p.add_argument("--folds", type=int, default=4, help="class-disjoint folds (>= 2)")
    p.add_argument("--digits", action="store_true",
                   help="the offline digits instead of Omniglot (a smoke test)")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="a config override applied to every loss (e.g. optim.lr=0.0005)")
    args = p.parse_args(argv)
    if not args.digits and not args.root.exists():
        print(f"Omniglot not found at {args.root}; pass --root (or --digits)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    start = time.time()
    results: dict[str, list[dict]] = {}
    for loss in args.losses:
        for seed in args.seeds:
            t0 = time.time()
            summary = run_loss(loss, seed, args, args.extra)
            results.setdefault(loss, []).append(summary)
            print(f"{loss} seed {seed}: test R@1 concatenated "
                  f"{100 * summary['test_concatenated']['recall@1']:.2f}, separated "
                  f"{100 * summary['test_separated']['mean']['recall@1']:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    rows = summarize(results)
    data = "digits (smoke test)" if args.digits else "Omniglot"
    header = (f"{data}, small CNN, Musgrave et al.'s protocol: {args.folds} class-disjoint "
              f"folds of the training classes, {args.epochs or 'config'} epoch(s) per fold "
              f"model, epoch selected on the held-out fold; test classes, % (mean +- std over "
              f"{len(args.seeds)} seed(s)); concat. = the {args.folds} fold models' embeddings "
              f"concatenated, sep. = the mean of the single fold models; overrides "
              f"{args.extra or 'none'}; torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; total {time.time() - start:.0f}s")
    text = markdown(rows, header)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
