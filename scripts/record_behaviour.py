"""Record what every sub-command produces, and compare two recordings number by number.

A refactoring must not change behaviour. Run this on the commit before it and on the commit
after it, each from its own checkout, and compare:

    python scripts/record_behaviour.py record /tmp/before [--omniglot ../shared/data/omniglot]
    python scripts/record_behaviour.py record /tmp/after  [--omniglot ...]
    python scripts/record_behaviour.py compare /tmp/before /tmp/after

``record`` runs, on the offline digits: train (3 epochs), resume to 4, evaluate (checkpoint and
embeddings), embed, analyze, index build + search, export (TorchScript, run on a fixed input),
report, crossval and tune; and with ``--omniglot`` one short Omniglot run (the omniglot_pa_nir
recipe, 1 epoch) per NIR variant. ``compare`` checks every JSON/JSONL
number, every array of every npz, every tensor of every checkpoint and every command's stdout
for equality, leaving out what is not behaviour (wall times, paths, dates).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

#: keys whose values are timings or locations, not results
IGNORED_KEYS = re.compile(r"(time|seconds|_s$|^s$|elapsed|duration|date|created|path|root|"
                          r"folder|host|version|cache|started|finished|pid|wall|checkpoint)", re.I)

#: the NIR variants of the Omniglot runs: name -> overrides
NIR_VARIANTS = {
    "release": [],
    "paper": ["loss.nir.mode=paper", "loss.nir.weight=0.01"],
    "paper_dim_warmup": ["loss.nir.mode=paper", "loss.nir.per_dim=true",
                         "loss.nir.warmup_epochs=1", "train.epochs=2"],
    "paper_noise_uniform": ["loss.nir.mode=paper", "loss.nir.noise=0.05",
                            "loss.nir.noise_kind=uniform"],
    "paper_noise_gauss_sphere": ["loss.nir.mode=paper", "loss.nir.noise=0.05",
                                 "loss.nir.base_scale=sphere", "loss.nir.per_dim=true"],
    "selfnorm": ["loss.nir.mode=selfnorm", "loss.nir.weight=0.1"],
    "disc": ["loss.nir.mode=disc", "loss.nir.weight=0.1", "loss.nir.negatives=2",
             "loss.nir.nll_weight=0.1", "loss.nir.per_dim=true"],
    "kl": ["loss.nir.mode=kl", "loss.nir.weight=0.01", "loss.nir.per_dim=true"],
    "learned_base": ["loss.nir.mode=paper", "loss.nir.base_scale=learned",
                     "loss.nir.per_dim=true"],
    "release_cond_embed": ["loss.nir.cond_mode=dense_embed"],
}


def _nirdml(out: Path, name: str, *args: str) -> None:
    """Run ``nirdml ARGS`` in ``out``; its stdout is kept as ``NAME.stdout``."""
    cmd = [sys.executable, "-m", "nirdml", *args]
    env = dict(os.environ, NIRDML_CACHE=str(out / "cache"), PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    (out / f"{name}.stdout").write_text(proc.stdout)
    (out / f"{name}.stderr").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {name}: ok", flush=True)


def record(out: Path, omniglot: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=False)
    quiet = ["--set", "train.progress=false", "--set", "train.tensorboard=false"]
    ckpt = "run/checkpoints/best.pt"
    _nirdml(out, "train", "train", "--out", "run", *quiet, "--set", "train.epochs=3")
    _nirdml(out, "resume", "train", "--out", "run", "--resume", *quiet, "--set", "train.epochs=4")
    _nirdml(out, "evaluate", "evaluate", "--checkpoint", ckpt, "--json", "eval.json")
    _nirdml(out, "embed", "embed", "--checkpoint", ckpt, "--out", "emb.npz")
    _nirdml(out, "evaluate_emb", "evaluate", "--embeddings", "emb.npz", "--json", "eval_emb.json")
    _nirdml(out, "analyze", "analyze", "--checkpoint", ckpt, "--out", "analysis")
    _nirdml(out, "index", "index", "build", "--checkpoint", ckpt, "--gallery", "split:test",
            "--out", "idx")
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = load_digits().images[7]
    Image.fromarray((digit * 255 / 16).astype("uint8")).save(out / "query.png")
    _nirdml(out, "search", "search", "--index", "idx", "--query", "query.png", "-k", "5")
    _nirdml(out, "export", "export", "--checkpoint", ckpt, "--format", "torchscript",
            "--out", "model.pt")
    from nirdml.export import read_export_metadata, run_exported

    shape = read_export_metadata(out / "model.pt")["input_shape"]
    x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    np.savez(out / "export_outputs.npz", y=run_exported(out / "model.pt", x))
    (out / "model.pt").unlink()  # TorchScript archives hold code and dates: compared by output
    _nirdml(out, "report", "report", "--run", "run")
    _nirdml(out, "crossval", "crossval", "--out", "cv", *quiet, "--set", "train.epochs=1")
    (out / "space.yaml").write_text(
        "optim.lr: {type: float, low: 0.0003, high: 0.003, log: true}\n")
    _nirdml(out, "tune", "tune", "--space", "space.yaml", "--trials", "2", "--out", "tune",
            *quiet, "--set", "train.epochs=1")
    if omniglot is not None:
        for name, overrides in NIR_VARIANTS.items():
            _nirdml(out, f"omniglot_{name}", "train", "--config", "omniglot_pa_nir",
                    "--out", f"omni_{name}", *quiet,
                    *_sets(f"data.root={omniglot.resolve()}", "train.epochs=1",
                           "train.probe_classes=16", *overrides))


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# ------------------------------------------------------------------------------ comparing
def _numbers(value, where: str, found: dict) -> None:
    """Flatten a JSON value into ``{path: leaf}``, skipping ignored keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not IGNORED_KEYS.search(str(k)):
                _numbers(v, f"{where}.{k}", found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _numbers(v, f"{where}[{i}]", found)
    else:
        found[where] = value


def _json_leaves(path: Path) -> dict:
    found: dict = {}
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                _numbers(json.loads(line), f"[{i}]", found)
    else:
        _numbers(json.loads(path.read_text()), "", found)
    return found


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from nirdml.training.checkpoint import load_checkpoint

    state = load_checkpoint(path, map_location="cpu")
    found: dict[str, np.ndarray] = {}

    def walk(v, where):
        if hasattr(v, "detach"):
            found[where] = v.detach().cpu().numpy()
        elif isinstance(v, np.ndarray):
            found[where] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                if not IGNORED_KEYS.search(str(k)):
                    walk(x, f"{where}.{k}")
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
        elif isinstance(v, int | float | str | bool) or v is None:
            found[where] = np.asarray(v if v is not None else "None")

    walk(state, "")
    return found


_VOLATILE = re.compile(r"(\d+(\.\d+)?\s*(s|ms|min)\b|\d+(\.\d+)? (it|img)/s|/\S+|"
                       r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?)")


def compare(a: Path, b: Path) -> int:
    problems, checked = [], 0
    for fa in sorted(p for p in a.rglob("*") if p.is_file()):
        rel = fa.relative_to(a)
        if rel.parts[0] == "cache" or "tensorboard" in rel.parts or fa.suffix in (
                ".stderr", ".png", ".html", ".db", ".log") or rel.name.startswith("events."):
            continue
        fb = b / rel
        if not fb.is_file():
            problems.append(f"{rel}: missing in {b}")
            continue
        checked += 1
        if fa.suffix in (".json", ".jsonl"):
            la, lb = _json_leaves(fa), _json_leaves(fb)
            for key in sorted(set(la) | set(lb)):
                if la.get(key, "<absent>") != lb.get(key, "<absent>") and not (
                        isinstance(la.get(key), float) and np.isnan(la[key])
                        and isinstance(lb.get(key), float) and np.isnan(lb[key])):
                    problems.append(f"{rel}{key}: {la.get(key, '<absent>')!r} != "
                                    f"{lb.get(key, '<absent>')!r}")
        elif fa.suffix == ".npz":
            za, zb = np.load(fa, allow_pickle=False), np.load(fb, allow_pickle=False)
            for key in sorted(set(za.files) | set(zb.files)):
                if key not in za.files or key not in zb.files:
                    problems.append(f"{rel}[{key}]: only in one")
                elif not np.array_equal(za[key], zb[key], equal_nan=za[key].dtype.kind == "f"):
                    problems.append(f"{rel}[{key}]: arrays differ")
        elif fa.suffix == ".pt":
            ta, tb = _tensors(fa), _tensors(fb)
            for key in sorted(set(ta) | set(tb)):
                if key not in ta or key not in tb:
                    problems.append(f"{rel}{key}: only in {'before' if key in ta else 'after'}")
                elif ta[key].dtype != tb[key].dtype or not np.array_equal(
                        ta[key], tb[key], equal_nan=ta[key].dtype.kind == "f"):
                    problems.append(f"{rel}{key}: differs")
        elif fa.suffix in (".stdout", ".yaml", ".txt", ".csv", ".md"):
            sa, sb = (_VOLATILE.sub("#", f.read_text()) for f in (fa, fb))
            if sa != sb:
                problems.append(f"{rel}: text differs")
    for line in problems:
        print("DIFF", line)
    print(f"{checked} files compared, {len(problems)} differences")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--omniglot", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.what == "record":
        record(args.out.resolve(), args.omniglot)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
