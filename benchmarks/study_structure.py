"""The paper's structure claims and its convergence claim, measured on the NIR study's runs.

For every finished test-phase run of the given settings (``benchmarks/nir_study.py``'s folders:
``OUT/<setting>/<loss>/runs/<arm>-seed<k>``, k >= 1) the selected checkpoint embeds the test
split and the training split, and ``nirdml.analysis.structure_report`` measures on each: ``rho``
(the authors' form: truncated SVD of D-1 components, the first dropped), ``rho_full`` (every
singular value past the first), the numerical ``rank``, ``pi_density``, ``sigma2_kappa`` and
``G2`` (docs/results.md says which are the paper's definitions and which are ours). Per run
the numbers are cached in ``structure.json`` beside the run.

Convergence ("as fast or faster than the base proxy loss"): from the run's ``metrics.jsonl``,
the first epoch whose validation R@1 (and MAP@R) reaches 95% of the last epoch's.

Writes ``OUT/structure.md`` and ``OUT/structure.json`` (mean +- std over seeds per arm, the
paper's table beside them, and whether NIR moved each metric the paper's way).

    python benchmarks/study_structure.py --out runs/nir_study --settings a b s a512 f
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the paper's table (ProxyAnchor vs + NIR, ResNet50, 128-d; docs/method.md)
PAPER = {"CUB": {"PA": {"rho": 0.19, "pi_density": 0.68, "sigma2_kappa": 0.37, "g2": 0.078},
                 "+NIR": {"rho": 0.13, "pi_density": 0.79, "sigma2_kappa": 0.44, "g2": 0.072}},
         "Cars": {"PA": {"rho": 0.17, "pi_density": 0.59, "sigma2_kappa": 0.32, "g2": 0.079},
                  "+NIR": {"rho": 0.13, "pi_density": 0.68, "sigma2_kappa": 0.38,
                           "g2": 0.072}}}
#: the direction the paper reports for NIR (lower / higher is "better" in its table)
PAPER_WAY = {"rho": -1, "pi_density": +1, "sigma2_kappa": +1, "g2": -1}
METRICS = ["rho", "rho_full", "rank", "pi_density", "sigma2_kappa", "g2"]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


def run_structure(folder: Path, splits: list[str]) -> dict:
    """``{split: structure metrics}`` of a run's selected checkpoint (cached per run)."""
    cache = folder / "structure.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [s for s in splits if s not in done]
    if missing:
        from nirdml.analysis.diagnostics import structure_report
        from nirdml.inference import TrainedRun

        run = TrainedRun.open(folder / "checkpoints" / "best.pt", "cpu")
        for split in missing:
            emb = run.embed(split)
            report = structure_report(emb.embeddings, emb.labels)
            done[split] = {k: report[k] for k in METRICS}
        cache.write_text(json.dumps(done, indent=1))
    return done


def epochs_to_95(folder: Path, key: str = "val/recall@1") -> float:
    """The first epoch whose validation ``key`` is at least 95% of the last epoch's."""
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    vals = [(h["epoch"], h[key]) for h in history if key in h]
    if not vals:
        return float("nan")
    final = vals[-1][1]
    return float(next(e for e, v in vals if v >= 0.95 * final))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return "-" if math.isnan(ms[0]) else f"{ms[0]:.{digits}f} +- {ms[1]:.{digits}f}"


def setting_rows(folder: Path, splits: list[str]) -> list[dict]:
    """Per arm of a setting's test phase: the seeds found, the structure metrics per split and
    the convergence epochs, each as (mean, std)."""
    table = folder / "test.json"
    if not table.exists():
        return []
    rows = []
    for arm in [r["arm"] for r in json.loads(table.read_text())]:
        runs = sorted(p for p in (folder / "runs").glob(f"{slug(arm)}-seed*")
                      if (p / "final.json").exists() and not p.name.endswith("seed0"))
        if not runs:
            continue
        found = [run_structure(r, splits) for r in runs]
        row = {"arm": arm, "seeds": [int(r.name.rsplit("seed", 1)[1]) for r in runs],
               "epochs_to_95": mean_std([epochs_to_95(r) for r in runs]),
               "epochs_to_95_map": mean_std([epochs_to_95(r, "val/map@r") for r in runs])}
        for split in splits:
            row[split] = {m: mean_std([f[split][m] for f in found]) for m in METRICS}
        rows.append(row)
    return rows


def report(out: Path, settings: list[str], loss: str, splits: list[str]) -> str:
    lines = ["# Structure and convergence of the NIR study's runs", "",
             "Mean +- std over the test seeds (the arm's selected checkpoint). The paper's "
             "table (ResNet50, 128-d, test embeddings as far as its text says):", "",
             "| paper | rho | pi_density | sigma2_kappa | G2 |", "|---|---|---|---|---|"]
    for data, arms in PAPER.items():
        for arm, vals in arms.items():
            lines.append(f"| {data} {arm} | " + " | ".join(
                f"{vals[m]:.3f}" for m in ("rho", "pi_density", "sigma2_kappa", "g2")) + " |")
    result = {}
    for setting in settings:
        rows = setting_rows(out / setting / loss, splits)
        if not rows:
            continue
        result[setting] = rows
        for split in splits:
            lines += ["", f"## Setting {setting}, {split} split", "",
                      "| arm | seeds | " + " | ".join(METRICS)
                      + " | epochs to 95% of final val R@1 | ... of val MAP@R |",
                      "|---" * (4 + len(METRICS)) + "|"]
            for row in rows:
                lines.append(f"| {row['arm']} | {len(row['seeds'])} | " + " | ".join(
                    fmt(row[split][m], 1 if m == "rank" else 3) for m in METRICS)
                    + f" | {fmt(row['epochs_to_95'], 1)} | {fmt(row['epochs_to_95_map'], 1)} |")
            base = next((r for r in rows if r["arm"] == "base"), None)
            if base is not None:
                for row in rows:
                    if row["arm"] in ("base", "control"):
                        continue
                    ways = []
                    for m, way in PAPER_WAY.items():
                        d = row[split][m][0] - base[split][m][0]
                        ways.append(f"{m} {'as the paper' if d * way > 0 else 'against it'} "
                                    f"({d:+.3f})")
                    lines.append(f"\n{row['arm']} against base: " + "; ".join(ways) + ".")
    text = "\n".join(lines) + "\n"
    (out / "structure.md").write_text(text)
    (out / "structure.json").write_text(json.dumps(result, indent=1))
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "nir_study")
    p.add_argument("--settings", nargs="+", default=["a", "b", "s", "a512", "f"])
    p.add_argument("--loss", default="proxy_anchor")
    p.add_argument("--splits", nargs="+", default=["test", "train"])
    args = p.parse_args(argv)
    print(report(args.out, args.settings, args.loss, args.splits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
