"""Cross-validation (``nirdml crossval``, Musgrave et al.'s protocol): class-disjoint folds of
the training classes that cover every class once, one model per fold, resumable per fold."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_benchmark
from nirdml.cli import main
from nirdml.data import class_folds
from nirdml.errors import ConfigError


def csv_dataset(tmp_path, train_classes=8, test_classes=4, per_class=6, validation_rows=False):
    """A CSV dataset of tiny grey PNGs whose classes differ in brightness pattern; returns the
    overrides that train a small CNN on it quickly."""
    lines = ["label,path,split"]
    rng = np.random.default_rng(0)
    i = 0
    splits = [("train", train_classes), ("test", test_classes)]
    if validation_rows:
        splits.append(("validation", 2))
    for split, classes in splits:
        for c in range(classes):
            base = rng.integers(0, 256, (8, 8))
            for _ in range(per_class):
                noisy = np.clip(base + rng.normal(0, 30, (8, 8)), 0, 255).astype(np.uint8)
                path = tmp_path / "imgs" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(noisy).save(path)
                lines.append(f"{split}{c},imgs/{i}.png,{split}")
                i += 1
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return ["data.name=csv", f"data.root={tmp_path / 'data.csv'}", "data.val_fraction=0",
            "data.batch_size=8", "data.samples_per_class=2", "data.image_size=8",
            "model.name=small_cnn", "model.pretrained=false", "model.embedding_dim=8",
            "loss.name=margin", "loss.nir.enabled=false", "loss.proxy_lr_multiplier=null",
            "train.epochs=2", "train.progress=false", "train.tensorboard=false",
            "train.select_on=val", "train.probe_classes=0", "train.device=cpu",
            "optim.warmup_epochs=0", "optim.lr=0.003", "eval.recall_ks=[1, 2]",
            "eval.metrics=[recall, map@r, nmi]"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRDML_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize(("classes", "folds"), [(5, 2), (8, 4), (13, 4), (4, 4), (100, 3)])
def test_class_folds_are_disjoint_cover_every_class_once_and_are_balanced(classes, folds):
    parts = class_folds(classes, folds, seed=7)
    assert len(parts) == folds
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(classes))  # every class exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for a, b in itertools.combinations(parts, 2):
        assert not set(a.tolist()) & set(b.tolist())
    again = class_folds(classes, folds, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if classes >= 8:
        other = class_folds(classes, folds, seed=8)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_class_folds_refuse_impossible_splits():
    with pytest.raises(ConfigError, match="at least 2 folds"):
        class_folds(5, 1)
    with pytest.raises(ConfigError, match="at least 6 training classes"):
        class_folds(5, 6)


def test_fold_splits_of_a_config_partition_the_training_classes(tmp_path, cache):
    from nirdml.training import builders
    from nirdml.training.config import load_config

    overrides = csv_dataset(tmp_path, train_classes=9)
    every = builders.build_splits(load_config("digits", overrides))
    all_train = set(every.train.class_names)
    assert len(all_train) == 9
    seen = []
    for k in range(4):
        cfg = load_config("digits", [*overrides, "data.folds=4", f"data.fold={k}"])
        splits = builders.build_splits(cfg)
        train, val = set(splits.train.class_names), set(splits.val.class_names)
        assert not train & val and train | val == all_train
        assert splits.test.class_names == every.test.class_names
        assert len(splits.val) == 6 * len(val)  # whole classes
        seen.append(val)
    assert sorted(c for fold in seen for c in fold) == sorted(all_train)  # each exactly once
    for a, b in itertools.combinations(seen, 2):
        assert not a & b


def test_fold_options_are_checked(tmp_path, cache):
    from nirdml.training import builders
    from nirdml.training.config import load_config

    with pytest.raises(ConfigError, match="data.folds"):
        load_config("digits", ["data.folds=1"])
    with pytest.raises(ConfigError, match="data.fold"):
        load_config("digits", ["data.folds=3", "data.fold=3"])
    overrides = csv_dataset(tmp_path, validation_rows=True)
    cfg = load_config("digits", [*overrides, "data.folds=2"])
    with pytest.raises(ConfigError, match="own validation split"):
        builders.build_splits(cfg)
    assert main(["crossval", "--out", str(tmp_path / "cv"), "--folds", "2",
                 "--set", "train.select_on=test"]) == 2


@pytest.mark.slow
def test_crossval_completes_resumes_after_an_interruption_and_reuses_finished_folds(
        tmp_path, cache, monkeypatch, capsys):
    from nirdml.selection.crossval import fold_config, selected_validation, train_run
    from nirdml.training.config import load_config
    from nirdml.training.run_dir import RunDir
    from nirdml.training.trainer import Interrupted, Trainer

    overrides = csv_dataset(tmp_path)
    out = tmp_path / "cv"
    argv = ["crossval", "--config", "digits", "--folds", "4", "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]

    # 1. stopped in fold 2 after its first epoch (its checkpoint written, as on SIGINT)
    original = Trainer._save

    def stop_in_fold_2(self, name):
        original(self, name)
        if name == "last.pt" and self.cfg.data.fold == 2 and self.epoch == 1:
            raise Interrupted("stopped by signal 2 (simulated)")

    monkeypatch.setattr(Trainer, "_save", stop_in_fold_2)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "run the same nirdml crossval command again" in err
    assert (out / "fold1/final.json").is_file() and not (out / "fold2/final.json").exists()
    assert (out / "fold2/checkpoints/last.pt").is_file() and not (out / "fold3").exists()
    monkeypatch.setattr(Trainer, "_save", original)

    # 2. again: folds 0 and 1 reused, fold 2 resumed from its checkpoint, fold 3 trained
    assert main(argv) == 0
    summary = json.loads((out / "crossval.json").read_text())
    assert [r["status"] for r in summary["fold_runs"]] == ["reused", "reused", "resumed",
                                                           "trained"]
    table = (out / "crossval.md").read_text()
    assert "test, concatenated (4 models)" in table and "+-" in table
    vals = [r["val"]["recall@1"] for r in summary["fold_runs"]]
    assert summary["val"]["mean"]["recall@1"] == pytest.approx(np.mean(vals), rel=1e-12)
    assert summary["val"]["std"]["recall@1"] == pytest.approx(np.std(vals), rel=1e-9, abs=1e-12)
    tests = [r["test"]["map@r"] for r in summary["fold_runs"]]
    assert summary["test_separated"]["mean"]["map@r"] == pytest.approx(np.mean(tests))
    assert set(summary["test_concatenated"]) >= {"recall@1", "recall@2", "map@r", "nmi"}

    # the resumed fold equals the same fold trained without a stop
    base = load_config("digits", overrides)
    train_run(fold_config(base, 4, 2), tmp_path / "fold2_clean")
    assert summary["fold_runs"][2]["val"] == selected_validation(RunDir(tmp_path / "fold2_clean"))

    # 3. one fold's final.json lost: only that fold runs again (its final test)
    (out / "fold1/final.json").unlink()
    assert main(argv) == 0
    again = json.loads((out / "crossval.json").read_text())
    assert [r["status"] for r in again["fold_runs"]] == ["reused", "resumed", "reused",
                                                         "reused"]
    assert again["val"] == summary["val"]
    assert again["test_concatenated"] == summary["test_concatenated"]

    # 4. another config in the same folder is refused, not mixed in
    capsys.readouterr()
    assert main([*argv, "--set", "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained with another config" in err
    assert "optim.lr" in err


def _benchmark():
    return load_benchmark("baselines")


def test_every_loss_has_an_omniglot_config_in_the_benchmark():
    from nirdml.losses import LOSSES
    from nirdml.training.config import load_config

    bench = _benchmark()
    assert sorted(bench.CONFIGS) == LOSSES.names()
    assert all(bench.parse_arm(arm) for arm in bench.DEFAULT_ARMS)
    for loss, name in bench.CONFIGS.items():
        cfg = load_config(name)
        assert cfg.loss.name == loss and cfg.data.name == "omniglot"
        assert not cfg.loss.nir.enabled and cfg.train.select_on == "val"
        assert (cfg.data.batch_size, cfg.data.samples_per_class, cfg.optim.lr) == (90, 2, 1e-3)


@pytest.mark.slow
def test_baselines_benchmark_runs_the_protocol_and_writes_its_table(tmp_path, cache, capsys):
    """The benchmark's grid on digits: a pair loss, a proxy loss and a NIR arm paired with it;
    the tables hold every arm and the paired differences (recomputed here from the runs); two
    jobs at once give the same numbers as one (each run has one thread either way)."""
    import subprocess
    import sys

    bench = _benchmark()
    arms = ["triplet", "proxy_anchor", "proxy_anchor+nir:paper/dim w=0.1"]
    grid = ["--digits", "--arms", *arms, "--epochs", "1", "--seeds", "1", "2", "--folds", "2"]
    assert bench.main([*grid, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    table = (tmp_path / "one" / "results.md").read_text()
    assert all(f"| {arm} | 2 |" in table for arm in arms) and "R@1 concat." in table
    assert "| proxy_anchor+nir:paper/dim w=0.1 | 2 | " in table.split("paired by seed")[1]
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    runs, rows = saved["runs"], {r["arm"]: r for r in saved["rows"]}
    deltas = [100 * (runs[arms[2]][s]["test_concatenated"]["recall@1"]
                     - runs["proxy_anchor"][s]["test_concatenated"]["recall@1"])
              for s in ("1", "2")]
    assert rows[arms[2]]["delta_concat/recall@1"] == pytest.approx(
        [sum(deltas) / 2, abs(deltas[0] - deltas[1]) / 2 ** 0.5])
    summary = json.loads((tmp_path / "one/runs/triplet-seed2/crossval.json").read_text())
    assert summary["seed"] == 2 and len(summary["fold_runs"]) == 2
    assert "NIR" in json.loads((tmp_path / "one/runs/proxy_anchor+nir_paper_dim_w_0.1-seed1/"
                                "crossval.json").read_text())["loss"]

    # --report reads the finished runs back (same rows, nothing trained); an arm not run is
    # listed as unfinished, and a run under another config is refused
    (tmp_path / "one" / "results.json").unlink()
    capsys.readouterr()
    assert bench.main([*grid, "--arms", *arms, "arcface", "--report", "--out",
                       str(tmp_path / "one")]) == 0
    assert "not finished (not in the tables): arcface seed 1; arcface seed 2" in (
        capsys.readouterr().out)
    assert json.loads((tmp_path / "one" / "results.json").read_text())["rows"] == saved["rows"]
    assert not (tmp_path / "one" / "runs" / "arcface-seed1").exists()
    with pytest.raises(ConfigError, match="trained with another config"):
        bench.main([*grid, "--report", "--set", "optim.lr=0.01", "--out", str(tmp_path / "one")])
    assert bench.main([*grid, "--report", "--out", str(tmp_path / "none")]) == 2
    assert "no runs under" in capsys.readouterr().err

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
    subprocess.run([sys.executable, str(script), *grid, "--jobs", "2", "--out",
                    str(tmp_path / "two")], check=True, capture_output=True)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    for row in [*saved["rows"], *two]:
        row.pop("sec_per_epoch")
    assert two == saved["rows"]


def test_baselines_benchmark_runs_the_nir_comparison_first():
    bench = _benchmark()
    order = bench.task_order(["triplet", "proxy_anchor+nir:release", "arcface", "proxy_anchor"],
                             [1, 2])
    assert order == [("proxy_anchor+nir:release", 1), ("proxy_anchor", 1),
                     ("proxy_anchor+nir:release", 2), ("proxy_anchor", 2),
                     ("triplet", 1), ("arcface", 1), ("triplet", 2), ("arcface", 2)]


def test_baselines_benchmark_refuses_nir_on_a_pair_loss_before_training(tmp_path):
    bench = _benchmark()
    with pytest.raises(SystemExit, match="NIR needs class proxies"):
        bench.main(["--digits", "--arms", "triplet+nir:release", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_crossval_on_real_omniglot_resumes_after_sigterm(tmp_path, cache):
    """The crossval promise as a user meets it: ``nirdml crossval`` with 3 folds on real Omniglot
    drawings (the official ``images_background_small1`` zip, 136 classes; a tiny evaluation
    part), stopped by SIGTERM in fold 1, then run again to completion."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import need_shared
    from test_data import make_omniglot_part

    shutil.copy(need_shared("omniglot/images_background_small1.zip"), tmp_path)
    make_omniglot_part(tmp_path, "images_evaluation", {"Runic": 6}, drawings=4)
    out = tmp_path / "cv"
    argv = [sys.executable, "-m", "nirdml", "crossval", "--config", "omniglot_pa", "--folds",
            "3", "--out", str(out)]
    for o in [f"data.root={tmp_path}", "data.options={background: images_background_small1}",
              "data.val_fraction=0", "model.embedding_dim=32", "train.epochs=2",
              "train.progress=false", "train.tensorboard=false", "train.probe_classes=0",
              "train.device=cpu"]:
        argv += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = out / "fold1" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    assert "run the same nirdml crossval command again" in err.strip().splitlines()[-1]
    assert (out / "fold0/final.json").is_file() and not (out / "fold1/final.json").exists()
    assert checkpoint.is_file() and not (out / "fold2").exists()

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "crossval.json").read_text())
    assert [r["status"] for r in summary["fold_runs"]] == ["reused", "resumed", "trained"]
    assert 0 < summary["test_concatenated"]["recall@1"] <= 1
