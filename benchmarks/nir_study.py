"""The NIR study: which NIR variant beats its base proxy loss on real Omniglot, and why.

Protocol (docs/nir_study.md): a variant and its weight are chosen on the *validation* classes
(held-out background classes) with one search seed; the chosen arms then run on 3 other seeds
and are compared on the 659 unseen *test* classes, paired by seed with the base loss. The NIR
arms change no protocol setting of the base run (same warm-up, learning rates, proxy learning
rate, epochs), so the base arm is also the control "base loss with the NIR run's protocol, no
flow". Every run logs the mechanism metrics (``nirdml.nir.monitor``) per epoch.

Settings:
  a  small CNN from scratch, 28 px, 20 epochs (config omniglot_pa)
  b  frozen ImageNet EfficientNet-Lite0 (84 px, features cached once) + MLP head 1280-512-128,
     40 epochs (config omniglot_lite0_pa)
  s  setting a on a CUB-sized training set: 100 drawn background classes (90 train, 10 val),
     100 epochs, all 659 evaluation classes as test (omniglot_pa + data.train_classes=100);
     epochs and arms selected on validation MAP@R (R@1 saturates at 100% on 10 classes)
  a512  setting a at model.embedding_dim=512
  f  the paper's regime: ImageNet EfficientNet-Lite0 fine-tuned at its end (the last block and
     the head convolution train on their cached input, 84 px), the release's recipe (lr 1e-5,
     one warm-up epoch, proxies x2000 for the base, x4000 and the flow x50 with NIR; the arm
     "control" is the base under the NIR recipe), 30 epochs (config omniglot_lite0_ft)

    python benchmarks/nir_study.py --setting a --phase search --out runs/nir_study
    python benchmarks/nir_study.py --setting a --phase test --arms base "disc/dim w=1" \\
        --out runs/nir_study
    python benchmarks/nir_study.py --setting a --phase test --loss proxy_nca --arms base ...
    python benchmarks/nir_study.py --setting a --phase test --loss norm_softmax \\
        --arms base "sampled r=0.5" "sampled r=0.1" --out runs/sampling   # the cost of sampling

An arm is a variant name from VARIANTS, optionally with its weight: ``"paper/dim w=0.1"``.
Finished runs are reused, unfinished ones resume. Writes ``OUT/<setting>/<loss>/<phase>.md``
(+ ``.json`` and a figure). Data: ``--root`` (default ``../shared/data/omniglot``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "omniglot"

SETTINGS = {
    "a": {"config": "omniglot_pa", "title": "small CNN from scratch, 28 px, 20 epochs"},
    "b": {"config": "omniglot_lite0_pa",
          "title": "frozen EfficientNet-Lite0 (ImageNet) features + MLP head, 84 px"},
    # the paper's small training sets (CUB: 100 training classes): 100 drawn background
    # classes (data.class_seed=0), 10 of them for validation, all 659 evaluation classes as test
    # 10 validation classes: R@1 reaches 100% within ~20 epochs for every arm, and the first
    # epoch to reach it would be kept; MAP@R still tells the epochs apart, so it selects here
    "s": {"config": "omniglot_pa", "overrides": ["data.train_classes=100", "train.epochs=100",
                                                 "train.selection_metric=map@r"],
          "title": "small CNN from scratch, 28 px, 100 drawn training classes, 100 epochs, "
                   "selected on validation MAP@R"},
    # the paper's state-of-the-art rows: setting a at 512 dimensions
    "a512": {"config": "omniglot_pa", "overrides": ["model.embedding_dim=512"],
             "title": "small CNN from scratch, 28 px, 20 epochs, 512-d"},
    # the paper's regime: a pretrained trunk fine-tuned, the release's recipe; NIR arms and the
    # control run the release's NIR protocol (proxies x4000; the flow's x50 is in the config)
    "f": {"config": "omniglot_lite0_ft", "nir_protocol": ["loss.proxy_lr_multiplier=4000"],
          "title": "ImageNet EfficientNet-Lite0 fine-tuned at its last block, 84 px, release "
                   "recipe, 30 epochs"},
}

NIR = ["loss.nir.enabled=true"]
#: variant name -> config overrides (the weight comes from the arm, or the variant's default)
VARIANTS: dict[str, list[str]] = {
    "base": ["loss.nir.enabled=false"],
    # the base loss under the NIR arms' protocol (a setting's "nir_protocol"; elsewhere the
    # NIR arms change nothing but loss.nir, so there it is the base arm itself)
    "control": ["loss.nir.enabled=false"],
    # the two faithful forms
    "release": [*NIR, "loss.nir.mode=release", "loss.nir.weight=0.0075"],
    "paper": [*NIR, "loss.nir.mode=paper"],
    # nats per dimension: weights on the scale of the proxy loss, exp() does not vanish
    "release/dim": [*NIR, "loss.nir.mode=release", "loss.nir.per_dim=true"],
    "paper/dim": [*NIR, "loss.nir.mode=paper", "loss.nir.per_dim=true"],
    "selfnorm/dim": [*NIR, "loss.nir.mode=selfnorm", "loss.nir.per_dim=true"],
    # degeneracies: noise bounds the density, a sphere-matched base removes the free expansion
    "paper/dim+noise": [*NIR, "loss.nir.mode=paper", "loss.nir.per_dim=true",
                        "loss.nir.noise=0.03"],
    "paper/dim+sphere": [*NIR, "loss.nir.mode=paper", "loss.nir.per_dim=true",
                         "loss.nir.base_scale=sphere"],
    "paper/dim+learned": [*NIR, "loss.nir.mode=paper", "loss.nir.per_dim=true",
                          "loss.nir.base_scale=learned"],
    "paper/dim+warmup": [*NIR, "loss.nir.mode=paper", "loss.nir.per_dim=true",
                         "loss.nir.warmup_epochs=5"],
    "release/dim+warmup": [*NIR, "loss.nir.mode=release", "loss.nir.per_dim=true",
                           "loss.nir.warmup_epochs=5"],
    # discriminative: own proxy must explain the embedding better than other classes' proxies
    "disc/dim": [*NIR, "loss.nir.mode=disc", "loss.nir.per_dim=true", "loss.nir.negatives=1"],
    "disc/dim k4": [*NIR, "loss.nir.mode=disc", "loss.nir.per_dim=true",
                    "loss.nir.negatives=4"],
    "disc": [*NIR, "loss.nir.mode=disc", "loss.nir.negatives=1"],
    "disc/dim+nll": [*NIR, "loss.nir.mode=disc", "loss.nir.per_dim=true",
                     "loss.nir.negatives=1", "loss.nir.nll_weight=0.1"],
    "disc/dim+sphere": [*NIR, "loss.nir.mode=disc", "loss.nir.per_dim=true",
                        "loss.nir.negatives=1", "loss.nir.base_scale=sphere"],
    "disc/dim+embed": [*NIR, "loss.nir.mode=disc", "loss.nir.per_dim=true",
                       "loss.nir.negatives=1", "loss.nir.cond_mode=dense_embed"],
    # the paper's NLL minus a within-class entropy estimate: KL, which collapse does not lower
    "kl/dim": [*NIR, "loss.nir.mode=kl", "loss.nir.per_dim=true"],
    # sampled negatives (issue 21): the base loss on the batch's classes plus a uniform sample,
    # r of all classes in all (single process; docs/scaling.md)
    "sampled r=0.5": ["loss.nir.enabled=false", "loss.sample_rate=0.5"],
    "sampled r=0.1": ["loss.nir.enabled=false", "loss.sample_rate=0.1"],
}

#: the search grid of phase "search" (one seed, validation classes), most promising first; one
#: arm for every variant family of docs/nir_variants.md (CPU time allows ~15 runs of 20 epochs).
#: Weights were set from the NIR share of the embedding gradient after one epoch at weight 1
#: (``probe/nir_grad_share``; docs/nir_study.md): the release form is dead (2e-11), the
#: compressive forms (paper, selfnorm, sphere base) collapse the embeddings at shares >= 0.2,
#: the disc forms sit at 0.05-0.1 without collapsing.
SEARCH = [
    "base",
    "disc/dim w=1", "disc/dim w=0.3", "disc/dim+nll w=0.3",
    "release/dim w=0.1", "paper/dim w=0.1", "selfnorm/dim w=0.1",
    "paper/dim+noise w=1", "paper/dim+sphere w=0.1", "paper/dim+warmup w=0.3",
    "disc/dim+embed w=0.3", "release", "paper w=0.001", "kl/dim w=0.1", "kl/dim w=0.3",
]

#: mechanism metrics shown in the tables (key in metrics.jsonl -> column)
MECHANISM = {
    "train/nll": "NLL (nats)", "train/nir": "NIR term", "train/material": "material",
    "probe/condition_gain_nats": "cond. gain (nats)", "probe/class_id_acc": "flow class-id acc",
    "probe/nir_grad_share": "NIR grad share", "probe/cos_between": "cos between classes",
    "flow/drift": "flow drift",
}


def parse_arm(arm: str) -> tuple[str, list[str]]:
    """``"paper/dim w=0.1"`` -> (variant overrides + weight override)."""
    name, _, weight = arm.partition(" w=")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    extra = [f"loss.nir.weight={float(weight)}"] if weight else []
    return name, VARIANTS[name] + extra


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


def run_folder(out: Path, setting: str, loss: str, arm: str, seed: int) -> Path:
    """Where the run of ``arm`` at ``seed`` lives (its ``final.json`` once it has finished)."""
    return out / setting / loss / "runs" / f"{slug(arm)}-seed{seed}"


def run_arm(setting: str, loss: str, arm: str, seed: int, out: Path, root: Path,
            extra: list[str]) -> dict:
    """Train (or reuse) one run; return its final test metrics, per-epoch history, config."""
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    name, overrides = parse_arm(arm)
    if name != "base" and ("loss.nir.enabled=true" in overrides or name == "control"):
        overrides = [*SETTINGS[setting].get("nir_protocol", []), *overrides]
    folder = run_folder(out, setting, loss, arm, seed)
    final_path = folder / "final.json"
    if not final_path.exists():
        cfg = load_config(SETTINGS[setting]["config"], [
            f"data.root={root}", f"seed={seed}", f"loss.name={loss}", "train.progress=false",
            *SETTINGS[setting].get("overrides", []), *overrides, *extra])
        resume = (folder / "checkpoints" / "last.pt").exists()
        Trainer(cfg, folder, resume=resume).fit()
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"final": json.loads(final_path.read_text()), "history": history}


def with_earlier_arms(results: dict[str, list[dict]], table: Path, args, seeds: list[int]
                      ) -> dict[str, list[dict]]:
    """``results`` plus the arms of the phase's earlier table (``table``) that this invocation
    did not run and whose runs at these seeds have all finished (read back, not retrained),
    in the earlier table's order: running one more arm adds a row instead of replacing the
    table. Not with ``--set`` overrides: the earlier runs may have trained without them."""
    if not table.exists() or args.extra:
        return results
    merged: dict[str, list[dict]] = {}
    for row in json.loads(table.read_text()):
        arm = row.get("arm")
        if arm in results or arm is None:
            continue
        if all((run_folder(args.out, args.setting, args.loss, arm, seed) / "final.json").exists()
               for seed in seeds):
            merged[arm] = [run_arm(args.setting, args.loss, arm, seed, args.out, args.root,
                                   args.extra) for seed in seeds]
    return {**merged, **results}


def selected(history: list[dict]) -> dict:
    """The epoch record the run selected (best validation value of its selection metric)."""
    epoch = history[-1].get("selected_epoch") or history[-1]["epoch"]
    return next(h for h in history if h["epoch"] == epoch)


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return (float("nan"), float("nan"))
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mechanism_row(runs: list[dict]) -> list[str]:
    cells = []
    for key in MECHANISM:
        m, _ = mean_std([r["history"][-1].get(key, float("nan")) for r in runs])
        cells.append(fmt(m, 3 if abs(m) < 10 else 1) if not math.isnan(m) else "-")
    return cells


def search_table(results: dict[str, list[dict]], header: str) -> tuple[str, list[dict]]:
    rows = []
    for arm, runs in results.items():
        sel = [selected(r["history"]) for r in runs]
        rows.append({"arm": arm,
                     "val_recall@1": 100 * mean_std([s.get("val/recall@1") for s in sel])[0],
                     "val_map@r": 100 * mean_std([s.get("val/map@r") for s in sel])[0],
                     "epoch": mean_std([s["epoch"] for s in sel])[0],
                     "mechanism": mechanism_row(runs)})
    lines = [header, "", "| arm | val R@1 | val MAP@R | sel. epoch | "
             + " | ".join(MECHANISM.values()) + " |",
             "|---" * (4 + len(MECHANISM)) + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {fmt(r['val_recall@1'])} | {fmt(r['val_map@r'])} | "
                     f"{fmt(r['epoch'], 0)} | " + " | ".join(r["mechanism"]) + " |")
    return "\n".join(lines) + "\n", rows


def test_table(results: dict[str, list[dict]], seeds: list[int], header: str
               ) -> tuple[str, list[dict]]:
    base = results.get("base")
    rows = []
    for arm, runs in results.items():
        row = {"arm": arm, "seeds": len(runs)}
        for key in ("recall@1", "map@r", "nmi"):
            row[key] = mean_std([100 * r["final"][key] for r in runs])
            if base is not None and arm != "base":
                diffs = [100 * (r["final"][key] - b["final"][key]) for r, b in zip(runs, base)]
                row[f"delta_{key}"] = mean_std(diffs)
        d1, dm = row.get("delta_recall@1"), row.get("delta_map@r")
        row["beats_base"] = bool(d1 and dm and all(
            d[0] >= 1.0 and d[0] > 2 * d[1] for d in (d1, dm)))
        row["mechanism"] = mechanism_row(runs)
        rows.append(row)
    lines = [header, "", "| arm | R@1 | MAP@R | NMI | dR@1 vs base | dMAP@R vs base | "
             "target met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        def pm(v):
            return f"{v[0]:.2f} +- {v[1]:.2f}"
        d1 = pm(r["delta_recall@1"]) if "delta_recall@1" in r else "-"
        dm = pm(r["delta_map@r"]) if "delta_map@r" in r else "-"
        met = "-" if r["arm"] == "base" else ("yes" if r["beats_base"] else "no")
        lines.append(f"| {r['arm']} | {pm(r['recall@1'])} | {pm(r['map@r'])} | {pm(r['nmi'])} "
                     f"| {d1} | {dm} | {met} |")
    lines += ["", "Mechanism metrics at the last epoch (mean over seeds):", "",
              "| arm | " + " | ".join(MECHANISM.values()) + " |",
              "|---" * (1 + len(MECHANISM)) + "|"]
    lines += [f"| {r['arm']} | " + " | ".join(r["mechanism"]) + " |" for r in rows]
    return "\n".join(lines) + "\n", rows


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val/recall@1", "validation recall@1 (%)", 100.0),
              ("probe/condition_gain_nats", "condition gain (nats)", 1.0),
              ("probe/nir_grad_share", "NIR share of the embedding gradient", 1.0),
              ("probe/cos_between", "mean cosine between classes", 1.0)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    table = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")

    def colours(i: int):
        return table(i % table.N)
    for ax, (key, label, scale) in zip(axes, panels):
        for k, (arm, runs) in enumerate(results.items()):  # one colour per arm in every panel
            curves = [[h.get(key) for h in r["history"]] for r in runs]
            if not curves or any(v is None for c in curves for v in c):
                continue
            n = min(len(c) for c in curves)
            mean = [scale * statistics.mean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, marker="o" if n < 3 else None, markersize=3,
                    label=arm, color=colours(k), linestyle="--" if arm == "base" else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if key == "probe/condition_gain_nats":
            ax.set_yscale("symlog", linthresh=10.0)  # the disc forms reach thousands of nats
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=list(SETTINGS), default="a")
    p.add_argument("--phase", choices=["search", "test"], default="search")
    p.add_argument("--loss", default="proxy_anchor",
                   choices=["proxy_anchor", "proxy_nca", "soft_triple", "norm_softmax"])
    p.add_argument("--arms", nargs="+", default=None,
                   help="arms to run (default: the SEARCH grid for --phase search)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 0 for search, 1 2 3 for test")
    p.add_argument("--root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "nir_study")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="extra config override for every run (e.g. train.epochs=4)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name:22s} {' '.join(overrides)}")
        return 0
    if not args.root.exists():
        print(f"Omniglot not found at {args.root}; pass --root", file=sys.stderr)
        return 2
    arms = args.arms or (SEARCH if args.phase == "search" else ["base"])
    for arm in arms:
        parse_arm(arm)  # fail early on a typo
    seeds = args.seeds or ([0] if args.phase == "search" else [1, 2, 3])
    import torch

    start = time.time()
    results: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            t0 = time.time()
            run = run_arm(args.setting, args.loss, arm, seed, args.out, args.root, args.extra)
            results.setdefault(arm, []).append(run)
            sel = selected(run["history"])
            # the search looks at the validation classes only: no test number is shown
            shown = (f" MAP@R {100 * sel.get('val/map@r', float('nan')):.2f}"
                     if args.phase == "search" else
                     f" test R@1 {100 * run['final']['recall@1']:.2f}"
                     f" MAP@R {100 * run['final']['map@r']:.2f}")
            print(f"{arm} seed {seed}: val R@1 {100 * sel.get('val/recall@1', float('nan')):.2f}"
                  f"{shown} ({time.time() - t0:.0f}s)", flush=True)
    folder = args.out / args.setting / args.loss
    results = with_earlier_arms(results, folder / f"{args.phase}.json", args, seeds)
    header = (f"Omniglot, setting {args.setting} ({SETTINGS[args.setting]['title']}), "
              f"{args.loss}, seeds {seeds}, phase {args.phase}, overrides "
              f"{args.extra or 'none'}; torch {torch.__version__}; {time.time() - start:.0f}s")
    if args.phase == "search":
        text, rows = search_table(results, header)
    else:
        text, rows = test_table(results, seeds, header)
    (folder / f"{args.phase}.md").write_text(text)
    (folder / f"{args.phase}.json").write_text(json.dumps(rows, indent=2))
    plot(results, folder / f"{args.phase}.png", header.split(";")[0])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
