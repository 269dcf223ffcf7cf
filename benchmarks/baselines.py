"""The baselines under one protocol: every loss on Omniglot, and NIR beside them, cross-validated
as in Musgrave, Belongie and Lim, "A Metric Learning Reality Check" (ECCV 2020).

An *arm* is a loss (its shipped config ``omniglot_<loss>``; ProxyAnchor's is ``omniglot_pa``) or
a proxy loss with a NIR arm of ``benchmarks/nir_study.py``: ``"proxy_anchor+nir:release"`` (the
authors' recipe, the shipped ``omniglot_pa_nir``), ``"proxy_anchor+nir:paper/dim+warmup w=0.3"``
(the NIR study's validation winner of setting a). Every arm and seed runs ``nirdml crossval``'s
protocol: the 964 background classes are split into ``--folds`` class-disjoint folds, one small
CNN per fold trains on the others and selects its epoch on its held-out fold; the 659 evaluation
classes are the test set, for each fold model ("separated", averaged over the folds) and for the
fold ensemble ("concatenated" L2-normalised embeddings). NIR arms change only ``loss.nir``, so
each is paired by seed with its base loss.

The NIR arms and their base losses run first on every seed, then the other arms seed by seed.
Writes, after every finished cross-validation (so a stopped run leaves a table of what is done):
``OUT/results.md`` (test R@1, MAP@R, NMI, mean +- std over seeds, both ways; validation R@1; the
NIR arms' paired differences to their base loss), ``OUT/results.json``, and every run under
``OUT/runs/<arm>-seed<k>/`` (finished folds are reused and an unfinished one resumes, so the
script itself resumes). ``--report`` rewrites the tables from the cross-validations finished
under ``--out`` without training anything (the arms and seeds asked for, where done).

    python benchmarks/baselines.py --out runs/baselines                  # hours on a 2-core CPU
    python benchmarks/baselines.py --arms triplet arcface --epochs 1 --seeds 1 --folds 2 \\
        --out runs/baselines_smoke
    python benchmarks/baselines.py --digits --epochs 1 --seeds 1 --folds 2 --out runs/bl_digits
    python benchmarks/baselines.py --report --out runs/baselines         # tables of what is done

``--jobs N`` runs N cross-validations at once in worker processes of ``--threads`` torch threads
each (default 1 thread, as many jobs as cores): on a 2-core CPU two 1-thread jobs train ~1.3x
more per hour than one 2-thread job, and the thread count per run, not the number of jobs, is
what the numbers depend on (float summation order). Data: ``--root`` (default
``../shared/data/omniglot`` next to the repository); ``--digits`` runs the same grid on the
offline digits instead (a smoke test of the script, not a result).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
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
NIR_SEP = "+nir:"
#: the default grid, in the order it runs within a seed (the NIR comparison first)
DEFAULT_ARMS = ["proxy_anchor", "proxy_anchor+nir:paper/dim+warmup w=0.3",
                "proxy_anchor+nir:release", *[loss for loss in CONFIGS if loss != "proxy_anchor"]]
# the digits smoke test: 5 training classes, so at most 2 classes per training batch
DIGITS = ["data.name=digits", "data.root=null", "data.image_size=null", "data.options={}",
          "data.batch_size=16", "data.samples_per_class=8", "model.embedding_dim=32"]
SHOWN = (("recall@1", "R@1"), ("map@r", "MAP@R"), ("nmi", "NMI"))


def _nir_study():
    """``benchmarks/nir_study.py`` (its NIR variants), loaded from beside this file."""
    spec = importlib.util.spec_from_file_location("nir_study", Path(__file__).with_name(
        "nir_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arm(arm: str) -> tuple[str, list[str]]:
    """``"proxy_anchor+nir:paper/dim w=0.1"`` -> ("proxy_anchor", the NIR arm's overrides);
    a plain loss name -> (loss, [])."""
    loss, sep, nir_arm = arm.partition(NIR_SEP)
    if loss not in CONFIGS:
        raise SystemExit(f"unknown loss {loss!r} in arm {arm!r}; choose from: "
                         f"{', '.join(CONFIGS)}")
    if not sep:
        return loss, []
    from nirdml.losses import PROXY_LOSSES

    if loss not in PROXY_LOSSES:
        raise SystemExit(f"arm {arm!r}: NIR needs class proxies and {loss} has none; NIR "
                         f"wraps: {', '.join(sorted(PROXY_LOSSES))}")
    variant, overrides = _nir_study().parse_arm(nir_arm)
    if variant == "base":
        raise SystemExit(f"arm {arm!r}: 'base' is the loss itself; write {loss!r}")
    return loss, overrides


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-+" else "_" for c in text).strip("_")


def arm_config(arm: str, seed: int, args: argparse.Namespace):
    """The config of ``arm`` with ``seed`` and the folder of its cross-validation."""
    from nirdml.training.config import load_config

    loss, nir = parse_arm(arm)
    overrides = [f"seed={seed}", "train.progress=false", "train.tensorboard=false"]
    overrides += DIGITS if args.digits else [f"data.root={args.root}"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(CONFIGS[loss], overrides + nir + args.extra)
    return cfg, args.out / "runs" / f"{slug(arm)}-seed{seed}"


def _timed(summary: dict, arm: str, wall_s: float | None) -> dict:
    """``summary`` with the arm, its wall time and the median seconds per epoch of its folds."""
    secs = []
    for fold in summary["fold_runs"]:
        metrics = Path(fold["run"]) / "metrics.jsonl"
        secs += [json.loads(line)["time/epoch_s"] for line in metrics.read_text().splitlines()
                 if "time/epoch_s" in line]
    summary["sec_per_epoch"] = statistics.median(secs) if secs else None
    summary["arm"], summary["wall_s"] = arm, wall_s
    return summary


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """One cross-validation (resumable) of ``arm`` with ``seed``: its crossval summary."""
    from nirdml.selection.crossval import crossval, print_log

    cfg, out = arm_config(arm, seed, args)

    def log(message: str) -> None:
        print_log(f"[{arm} seed {seed}] {message}")
    t0 = time.time()
    summary = crossval(cfg, args.folds, out, log=log)
    return _timed(summary, arm, time.time() - t0)


def report(tasks: list[tuple[str, int]], args: argparse.Namespace) -> int:
    """``--report``: the tables from the cross-validations finished under ``--out`` (read
    back, nothing trained or evaluated); the unfinished ones are listed."""
    from nirdml.selection.crossval import finished_summary

    if not (args.out / "runs").is_dir():
        print(f"--report: no runs under {args.out} (its runs/ folder is missing); pass the "
              f"--out the grid ran with", file=sys.stderr)
        return 2
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    missing = []
    for arm, seed in tasks:
        cfg, out = arm_config(arm, seed, args)
        summary = finished_summary(cfg, args.folds, out)
        if summary is None:
            missing.append(f"{arm} seed {seed}")
        else:
            results[arm][seed] = _timed(summary, arm, None)
    results = {arm: r for arm, r in results.items() if r}
    if results:
        print(write_tables(results, args, "read back from the finished runs (s/epoch: the "
                           "median of each run as it trained)"))
    if missing:
        print(f"not finished (not in the tables): {'; '.join(missing)}")
    return 0


def task_order(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The NIR comparison first (the NIR arms and their base losses, every seed), then the
    other arms seed by seed: a run stopped early has the paired NIR test complete and the
    baselines on as many seeds as it reached."""
    bases = {arm.partition(NIR_SEP)[0] for arm in arms if NIR_SEP in arm}
    first = [arm for arm in arms if NIR_SEP in arm or arm in bases]
    rest = [arm for arm in arms if arm not in first]
    return ([(arm, seed) for seed in seeds for arm in first]
            + [(arm, seed) for seed in seeds for arm in rest])


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_task(task: tuple[str, int], args: argparse.Namespace) -> dict:
    return run_arm(task[0], task[1], args)


def _pm(values: list[float]) -> tuple[float, float]:
    values = [100 * v for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: dict[str, dict[int, dict]]) -> list[dict]:
    """Per arm: mean and std (over seeds) of the concatenated and separated test metrics and of
    the validation R@1; for a NIR arm also the differences to its base loss, paired by seed."""
    rows = []
    for arm, by_seed in results.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        row = {"arm": arm, "seeds": sorted(by_seed)}
        for key, _ in SHOWN:
            row[f"concat/{key}"] = _pm([r["test_concatenated"][key] for r in runs])
            row[f"separated/{key}"] = _pm([r["test_separated"]["mean"][key] for r in runs])
        row["val/recall@1"] = _pm([r["val"]["mean"]["recall@1"] for r in runs])
        secs = [r["sec_per_epoch"] for r in runs if r.get("sec_per_epoch") is not None]
        row["sec_per_epoch"] = statistics.median(secs) if secs else None
        loss, sep, _ = arm.partition(NIR_SEP)
        base = results.get(loss) if sep else None
        paired = sorted(set(by_seed) & set(base or {}))
        if paired:
            row["paired_seeds"] = paired
            for way, part in (("concat", "test_concatenated"), ("separated", "test_separated")):
                for key in ("recall@1", "map@r"):
                    def value(run, part=part, key=key):
                        got = run[part]
                        return got["mean"][key] if "mean" in got else got[key]
                    row[f"delta_{way}/{key}"] = _pm([value(by_seed[s]) - value(base[s])
                                                     for s in paired])
        rows.append(row)
    return rows


def _cell(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.2f} +- {pair[1]:.2f}"


def markdown(rows: list[dict], header: str) -> str:
    cols = [f"{name} concat." for _, name in SHOWN] + [f"{name} sep." for _, name in SHOWN]
    lines = [header, "",
             "| arm | seeds | " + " | ".join(cols) + " | val R@1 | s/epoch |",
             "|---" * (len(cols) + 4) + "|"]
    for r in rows:
        cells = [_cell(r[f"concat/{k}"]) for k, _ in SHOWN]
        cells += [_cell(r[f"separated/{k}"]) for k, _ in SHOWN]
        sec = "-" if r["sec_per_epoch"] is None else f"{r['sec_per_epoch']:.1f}"
        lines.append(f"| {r['arm']} | {len(r['seeds'])} | " + " | ".join(cells)
                     + f" | {_cell(r['val/recall@1'])} | {sec} |")
    nir = [r for r in rows if "paired_seeds" in r]
    if nir:
        lines += ["", "NIR arms against their base loss, test classes, paired by seed "
                  "(arm minus base, mean +- std over the paired seeds; target: >= 1.0 point "
                  "of R@1 and of MAP@R, each more than twice its std):", "",
                  "| arm | paired seeds | dR@1 concat. | dMAP@R concat. | dR@1 sep. | "
                  "dMAP@R sep. | target met (concat.) |", "|---" * 7 + "|"]
        for r in nir:
            deltas = [r[f"delta_{w}/{k}"] for w in ("concat", "separated")
                      for k in ("recall@1", "map@r")]
            met = all(d[0] >= 1.0 and d[0] > 2 * d[1] for d in deltas[:2])
            met_text = "yes" if met else "no" if len(r["paired_seeds"]) > 1 else "-"
            lines.append(f"| {r['arm']} | {len(r['paired_seeds'])} | "
                         + " | ".join(_cell(d) for d in deltas) + f" | {met_text} |")
    return "\n".join(lines) + "\n"


def write_tables(results: dict[str, dict[int, dict]], args: argparse.Namespace,
                 timing: str) -> str:
    import torch

    from nirdml.files import atomic_write_text

    rows = summarize(results)
    epochs = args.epochs or "each config's own"
    data = "digits (smoke test)" if args.digits else "Omniglot"
    header = (f"{data}, small CNN, Musgrave et al.'s protocol: {args.folds} class-disjoint "
              f"folds of the training classes, {epochs} epochs per fold "
              f"model, epoch selected on the held-out fold; test classes, % (mean +- std over "
              f"seeds {', '.join(map(str, args.seeds))}, where done); concat. = the "
              f"{args.folds} fold models' embeddings concatenated, sep. = the mean of the "
              f"single fold models; overrides {args.extra or 'none'}; torch {torch.__version__}; "
              f"{timing}")
    text = markdown(rows, header)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(
        {"header": header, "rows": rows,
         "runs": {arm: {str(s): {k: v for k, v in run.items() if k != "fold_runs"}
                        for s, run in by_seed.items()} for arm, by_seed in results.items()}},
        indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA, help="the Omniglot data")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "baselines")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS,
                   help="losses, or LOSS+nir:VARIANT[ w=WEIGHT] (variants: "
                        "python benchmarks/nir_study.py --list)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="seeds (1-3: the NIR study's test seeds; seed 0 selected its arms)")
    p.add_argument("--epochs", type=int, default=0,
                   help="epochs per fold model (0: each config's own, 20)")
    p.add_argument("--folds", type=int, default=4, help="class-disjoint folds (>= 2)")
    p.add_argument("--jobs", type=int, default=0,
                   help="cross-validations at once (0: cores // threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--digits", action="store_true",
                   help="the offline digits instead of Omniglot (a smoke test)")
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="a config override applied to every arm (e.g. optim.lr=0.0005)")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the tables from the cross-validations finished under "
                        "--out (trains nothing)")
    args = p.parse_args(argv)
    if not args.digits and not args.root.exists():
        print(f"Omniglot not found at {args.root}; pass --root (or --digits)", file=sys.stderr)
        return 2
    if args.threads < 1 or args.jobs < 0 or args.folds < 2:
        print("--threads must be >= 1, --jobs >= 0 and --folds >= 2", file=sys.stderr)
        return 2
    for arm in args.arms:
        parse_arm(arm)  # a typo fails before any training
    tasks = task_order(args.arms, args.seeds)
    if args.report:
        return report(tasks, args)
    args.jobs = min(args.jobs or max(1, (os.cpu_count() or 1) // args.threads), len(tasks))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}

    failed: list[str] = []

    def done(task: tuple[str, int], summary: dict | BaseException) -> None:
        if isinstance(summary, BaseException):  # the others go on; the exit status says it
            failed.append(f"{task[0]} seed {task[1]}: {type(summary).__name__}: {summary}")
            print(f"FAILED {failed[-1]}", file=sys.stderr, flush=True)
            return
        results[task[0]][task[1]] = summary
        print(f"{task[0]} seed {task[1]}: test R@1 concatenated "
              f"{100 * summary['test_concatenated']['recall@1']:.2f}, separated "
              f"{100 * summary['test_separated']['mean']['recall@1']:.2f} "
              f"({summary['wall_s']:.0f}s)", flush=True)
        write_tables({a: r for a, r in results.items() if r}, args,
                     f"{args.threads} thread(s) per run, {args.jobs} run(s) at once (s/epoch is "
                     f"per run); {time.time() - start:.0f}s in this invocation")

    if args.jobs == 1:
        import torch

        threads = torch.get_num_threads()
        _worker_init(args.threads)
        try:
            for task in tasks:
                try:
                    summary = _run_task(task, args)
                except Exception as error:  # reported; the grid goes on
                    summary = error
                done(task, summary)
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                                 initializer=_worker_init, initargs=(args.threads,)) as pool:
            pending = {pool.submit(_run_task, task, args): task for task in tasks}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    done(task, future.exception() or future.result())
    if any(results.values()):
        print((args.out / "results.md").read_text())
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
