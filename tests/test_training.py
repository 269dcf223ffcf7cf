"""The trainer end to end on the offline digits data: outputs, exact resume, faults."""

import json
import os

import pytest
import torch

from nirdml.cli import main
from nirdml.errors import ConfigError, TrainingError
from nirdml.training import Interrupted, Trainer, load_checkpoint
from nirdml.training.config import load_config

FAST = ["train.epochs=2", "train.progress=false", "train.tensorboard=false",
        "model.embedding_dim=16", "loss.nir.subnet_width=32", "loss.nir.subnet_depth=3",
        "loss.nir.num_blocks=2"]


def _cfg(*extra):
    return load_config("digits", FAST + list(extra))


def _weights(path):
    state = load_checkpoint(path)
    return {**{f"m.{k}": v for k, v in state["model"].items()},
            **{f"c.{k}": v for k, v in state["criterion"].items()}}


def test_cli_main_job_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--out", str(out)] + sum((["--set", s] for s in FAST), []))
    assert rc == 0
    for name in ("config.yaml", "metrics.jsonl", "final.json", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (out / name).exists(), name
    final = json.loads((out / "final.json").read_text())
    for key in ("recall@1", "recall@8", "map@r", "r_precision", "map@1000", "nmi",
                "num_queries", "lone_queries"):
        assert key in final
    assert final["num_queries"] == 896  # digits 5-9
    assert final["recall@1"] > 0.5  # far above chance (0.2) after 2 epochs
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train/proxy", "train/nir", "train/total", "time/images_per_s"} <= set(lines[0])
    printed = capsys.readouterr().out
    assert "recall@1" in printed and "map@r" in printed


def test_resume_is_exact(tmp_path):
    full = Trainer(_cfg(), tmp_path / "full")
    full.fit()
    first = Trainer(_cfg("train.epochs=1"), tmp_path / "split")
    first.fit()
    resumed = Trainer(_cfg(), tmp_path / "split", resume=True)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = _weights(tmp_path / "full/checkpoints/last.pt"), _weights(
        tmp_path / "split/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_signal_mid_epoch_saves_and_resume_matches(tmp_path, monkeypatch):
    reference = Trainer(_cfg("train.epochs=1"), tmp_path / "ref")
    reference.fit()
    interrupted = Trainer(_cfg("train.epochs=1"), tmp_path / "int")
    real_step = interrupted._step
    calls = {"n": 0}

    def step_then_signal(x, y):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        return real_step(x, y)

    monkeypatch.setattr(interrupted, "_step", step_then_signal)
    with pytest.raises(Interrupted, match="--resume"):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "int/checkpoints/last.pt")["batch_in_epoch"] == 5
    resumed = Trainer(_cfg("train.epochs=1"), tmp_path / "int", resume=True)
    resumed.fit()
    a, b = _weights(tmp_path / "ref/checkpoints/last.pt"), _weights(
        tmp_path / "int/checkpoints/last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_is_skipped_then_stops(tmp_path, monkeypatch):
    trainer = Trainer(_cfg("train.max_bad_steps=3"), tmp_path / "nan")
    real = trainer.criterion.forward
    calls = {"n": 0}

    def sometimes_nan(emb, labels):
        calls["n"] += 1
        loss = real(emb, labels)
        return loss * float("nan") if calls["n"] in (2,) or calls["n"] >= 6 else loss

    monkeypatch.setattr(trainer.criterion, "forward", sometimes_nan)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "3 consecutive" in msg and "optim.lr" in msg and "loss.nir.weight" in msg
    assert "last.pt" in msg
    assert load_checkpoint(tmp_path / "nan/checkpoints/last.pt")["bad_steps_total"] == 4


def test_output_directory_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        Trainer(_cfg(), blocker / "run")
    Trainer(_cfg("train.epochs=1"), tmp_path / "done").fit()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(_cfg(), tmp_path / "done")
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(_cfg(), tmp_path / "empty", resume=True)


def test_select_on_test_is_labelled(tmp_path):
    final = Trainer(_cfg("train.epochs=1", "train.select_on=test"), tmp_path / "t").fit()
    assert "TEST" in final["selected_on"]


def test_evaluate_and_embed_from_checkpoint(tmp_path, capsys):
    import numpy as np

    from nirdml.inference import TrainedRun

    Trainer(_cfg("train.epochs=1"), tmp_path / "r").fit()
    ck = tmp_path / "r/checkpoints/best.pt"
    assert main(["embed", "--checkpoint", str(ck), "--out", str(tmp_path / "e.npz")]) == 0
    data = np.load(tmp_path / "e.npz")
    assert data["embeddings"].shape == (896, 16)
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1, atol=1e-5)
    # labels and order: row i is test image i of the checkpoint's own data, with its label
    run = TrainedRun.open(ck, "cpu")
    model, test = run.model, run.split("test")
    assert np.array_equal(data["labels"], test.labels)
    rows = [0, 1, 417, 895]
    with torch.no_grad():
        direct = model(torch.stack([test[i][0] for i in rows])).numpy()
    np.testing.assert_allclose(data["embeddings"][rows], direct, rtol=1e-5, atol=1e-6)
    # evaluate --checkpoint against a brute-force recomputation from those embeddings
    assert main(["evaluate", "--checkpoint", str(ck), "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    x, y = data["embeddings"].astype(np.float64), data["labels"]
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant = y[order] == y[:, None]
    assert got["recall@1"] == pytest.approx(relevant[:, 0].mean(), abs=1e-6)
    assert got["recall@8"] == pytest.approx(relevant[:, :8].any(1).mean(), abs=1e-6)
    r = np.bincount(y)[y] - 1  # relevant items per query
    map_r = np.mean([np.sum(np.cumsum(rel[:k]) / np.arange(1, k + 1) * rel[:k]) / k
                     for rel, k in zip(relevant, r)])
    assert got["map@r"] == pytest.approx(map_r, abs=1e-6)


def _crash_worker_once(dataset, marker, at_index):
    """Make a loader worker kill itself (SIGKILL) the first time it loads ``at_index``."""
    import signal

    base = type(dataset)

    def getitem(self, i):
        info = torch.utils.data.get_worker_info()
        if info is not None and i == at_index and not marker.exists():
            marker.write_text("crashed")
            os.kill(os.getpid(), signal.SIGKILL)
        return base.__getitem__(self, i)

    dataset.__class__ = type("CrashOnce", (base,), {"__getitem__": getitem})


def _record_batches(trainer):
    """Record the labels of every batch the trainer steps on."""
    seen, step = [], trainer._step

    def recording_step(x, y):
        seen.append(y.tolist())
        return step(x, y)

    trainer._step = recording_step
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork-started loader workers")
def test_crashed_loader_worker_restarts_and_loses_nothing(tmp_path):
    reference = Trainer(_cfg("train.epochs=1", "data.num_workers=1"), tmp_path / "ref")
    expected = _record_batches(reference)
    reference.fit()
    crashy = Trainer(_cfg("train.epochs=1", "data.num_workers=1"), tmp_path / "crash")
    seen = _record_batches(crashy)
    batches = list(crashy.sampler.from_batch(0))
    _crash_worker_once(crashy.splits.train, tmp_path / "marker", batches[3][0])
    with pytest.warns(RuntimeWarning, match="data-loader worker crashed"):
        final = crashy.fit()
    assert (tmp_path / "marker").exists()
    record = json.loads((tmp_path / "crash/metrics.jsonl").read_text().splitlines()[0])
    assert record["data/loader_restarts"] == 1
    # every batch trained on exactly once, in the same order (augmentations may differ)
    assert seen == expected and len(seen) == len(batches)
    assert final["recall@1"] > 0.4


class _FakeWandb:
    """Records what the trainer sends to Weights & Biases (the real package is not needed)."""

    def __init__(self):
        self.inits, self.logs, self.summary, self.finished = [], [], {}, 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "run123")})

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logs.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_logs_epochs_and_final_metrics_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    cfg = ["train.wandb=true", "train.wandb_project=proj"]
    Trainer(_cfg("train.epochs=1", *cfg), tmp_path / "run").fit()
    Trainer(_cfg(*cfg), tmp_path / "run", resume=True).fit()
    assert [i["id"] for i in fake.inits] == ["run123", "run123"]
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["config"]["train"]["wandb"] is True
    assert [step for step, _ in fake.logs] == [1, 2]
    assert "train/proxy" in fake.logs[0][1] and "epoch" not in fake.logs[0][1]
    final = json.loads((tmp_path / "run/final.json").read_text())
    assert fake.summary["final/recall@1"] == final["recall@1"]
    assert fake.finished == 2


def test_wandb_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        Trainer(_cfg("train.wandb=true"), tmp_path / "run")


def test_readme_resume_command_continues_an_interrupted_run_exactly(tmp_path, monkeypatch,
                                                                    capsys):
    """As a user does it: a run started with --set values is stopped by SIGTERM mid-epoch and
    continued with the README's `nirdml train --out RUN --resume` (no --config, no --set)."""
    sets = sum((["--set", s] for s in FAST), [])
    assert main(["train", "--out", str(tmp_path / "ref"), *sets]) == 0
    real_step = Trainer._step
    calls = {"n": 0}

    def step_then_signal(self, x, y):
        calls["n"] += 1
        if calls["n"] == 40:  # in epoch 2 (23 batches per epoch)
            os.kill(os.getpid(), __import__("signal").SIGTERM)
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "_step", step_then_signal)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *sets]) == 2
    err = capsys.readouterr().err
    assert f"continue with: nirdml train --out {run} --resume" in err
    monkeypatch.setattr(Trainer, "_step", real_step)
    config_before = (run / "config.yaml").read_text()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config_before
    ref = json.loads((tmp_path / "ref/final.json").read_text())
    got = json.loads((run / "final.json").read_text())
    for key in ("recall@1", "map@r", "nmi", "selected_epoch"):
        assert got[key] == ref[key], key


def test_resume_refuses_another_config_before_writing_anything(tmp_path, capsys):
    sets = sum((["--set", s] for s in FAST), [])
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *sets, "--set", "train.epochs=1"]) == 0
    config_before = (run / "config.yaml").read_text()
    checkpoint_before = (run / "checkpoints/last.pt").read_bytes()
    capsys.readouterr()
    for extra in (["--config", "omniglot_pa_nir"], ["--set", "seed=1"],
                  ["--set", "loss.nir.weight=1"]):
        assert main(["train", "--out", str(run), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert "differs from the one" in err and "in the run" in err, err
        assert (run / "config.yaml").read_text() == config_before
        assert (run / "checkpoints/last.pt").read_bytes() == checkpoint_before
    err_seed = main(["train", "--out", str(run), "--resume", "--set", "seed=1"])
    assert err_seed == 2 and "seed: 0 in the run, 1 given" in capsys.readouterr().err
    # more epochs (and loading/logging keys) are allowed: the run is extended
    assert main(["train", "--out", str(run), "--resume", "--set", "train.epochs=2",
                 "--set", "data.num_workers=0"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert main(["train", "--out", str(run), "--resume", "--set", "train.epochs=1"]) == 2
    assert "may only grow" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_class_count(tmp_path):
    """A dataset that changed under a run (a class folder added) is named in one line before
    any weight is loaded, whatever the proxies' layout."""
    from nirdml.training.state import restore_trainer, trainer_state

    cfg = load_config("digits", [*FAST, "train.epochs=1", "loss.shard=true"])
    trainer = Trainer(cfg, tmp_path / "run")
    state = trainer_state(trainer)
    assert state["num_classes"] == 5
    before = {k: v.clone() for k, v in trainer.criterion.state_dict().items()}
    with pytest.raises(ConfigError, match="was trained on 6 classes but data.name='digits' now "
                                          "has 5 training classes"):
        restore_trainer(trainer, {**state, "num_classes": 6})
    assert all(torch.equal(v, trainer.criterion.state_dict()[k]) for k, v in before.items())
    restore_trainer(trainer, state)   # its own count: accepted
