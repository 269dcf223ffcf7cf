"""Safe to open what others share, never destructive: checkpoints run no code, and nirdml never
deletes or overwrites a file or folder it did not create (train, crossval, tune)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct

import numpy as np
import pytest
import torch

from nirdml.cli import main
from nirdml.errors import CheckpointError
from nirdml.training.checkpoint import (
    TRAINER_KEYS,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)


class _RunsCode:
    """Unpickling this touches a file: the proof that code from a checkpoint ran."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def format1_bytes(state) -> bytes:
    """A format-1 file (header, valid sha256, torch pickle) as an attacker could write it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return b"NIRDMLCK" + hashlib.sha256(payload).digest() + payload


def _one_line_error(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("nirdml ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err  # progress lines may precede
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _run_folder(folder, checkpoint_bytes_, name="last.pt", config=None):
    """A run folder of nirdml's (marker, config.yaml) whose checkpoint holds ``bytes``."""
    from nirdml.owned import claim_folder
    from nirdml.training.config import load_config

    claim_folder(folder, "run")
    (folder / "checkpoints").mkdir(exist_ok=True)
    (folder / "config.yaml").write_text((config or load_config("digits")).to_yaml())
    (folder / "checkpoints" / name).write_bytes(checkpoint_bytes_)
    (folder / "metrics.jsonl").write_text("")
    return folder


def test_a_format1_checkpoint_is_never_unpickled_by_any_reader(tmp_path, checkpoint, capsys):
    flag = tmp_path / "code-ran"
    evil = format1_bytes({"format_version": 1, "config": {}, "x": _RunsCode(flag)})
    # the old loader ran it (as the issue reports): the file is a working exploit
    torch.load(io.BytesIO(evil[40:]), weights_only=False)
    assert flag.exists()
    flag.unlink()

    ck = tmp_path / "evil.pt"
    ck.write_bytes(evil)
    run = _run_folder(tmp_path / "run", evil)
    _run_folder(tmp_path / "report_run", evil, "best.pt")
    cv = tmp_path / "cv"
    from nirdml.owned import claim_folder
    from nirdml.selection.crossval import fold_config
    from nirdml.training.config import load_config

    claim_folder(cv, "crossval")
    _run_folder(cv / "fold0", evil,
                config=fold_config(load_config("digits", ["train.epochs=1"]), 2, 0))
    out = tmp_path / "out"
    commands = [
        ["evaluate", "--checkpoint", str(ck)],
        ["embed", "--checkpoint", str(ck), "--out", str(out / "e.npz")],
        ["analyze", "--checkpoint", str(ck), "--out", str(out / "analysis")],
        ["export", "--checkpoint", str(ck), "--format", "torchscript", "--out",
         str(out / "m.pt")],
        ["index", "build", "--checkpoint", str(ck), "--gallery", "split:test", "--out",
         str(out / "idx")],
        ["train", "--resume", "--out", str(run)],
        ["crossval", "--config", "digits", "--folds", "2", "--out", str(cv),
         "--set", "train.epochs=1"],
        ["upgrade-checkpoint", str(ck)],
    ]
    for argv in commands:
        line = _one_line_error(capsys, argv)
        assert "format 1" in line or "--trust" in line, (argv, line)
        assert not flag.exists(), argv
    # report: the grid section says why it is missing, the rest of the report is written
    assert main(["report", "--run", str(tmp_path / "report_run"), "--out",
                 str(out / "r.html")]) == 0
    assert "format 1" in (out / "r.html").read_text() and not flag.exists()
    # search: an index built with a sound checkpoint, queried with the evil one
    assert main(["index", "build", "--checkpoint", str(checkpoint), "--gallery", "split:test",
                 "--out", str(tmp_path / "idx")]) == 0
    from PIL import Image

    Image.new("L", (8, 8), 128).save(tmp_path / "q.png")
    _one_line_error(capsys, ["search", "--index", str(tmp_path / "idx"), "--checkpoint",
                             str(ck), "--query", str(tmp_path / "q.png")], "format 1")
    assert not flag.exists()


def test_tune_refuses_a_format1_checkpoint_in_a_trial_folder(tmp_path, capsys):
    pytest.importorskip("optuna")
    from nirdml.selection.search_space import params_hash

    flag = tmp_path / "code-ran"
    evil = format1_bytes({"format_version": 1, "x": _RunsCode(flag)})
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: categorical, choices: [0.001]}\n")
    out = tmp_path / "tune"
    from nirdml.owned import claim_folder
    from nirdml.selection.crossval import fold_config
    from nirdml.selection.search_space import apply_params
    from nirdml.training.config import load_config

    trial = apply_params(load_config("digits", ["train.epochs=1"]), {"optim.lr": 0.001})
    claim_folder(out, "tune")
    _run_folder(out / "trials" / params_hash({"optim.lr": 0.001}) / "fold0", evil,
                config=fold_config(trial, 2, 0))
    line = _one_line_error(capsys, ["tune", "--config", "digits", "--space", str(space),
                                    "--trials", "1", "--folds", "2", "--out", str(out),
                                    "--set", "train.epochs=1"])
    assert not flag.exists()
    assert "format 1" in line or "no trial completed" in line, line


def test_upgrade_with_trust_converts_a_format1_checkpoint(tmp_path, checkpoint, capsys):
    state = load_checkpoint(checkpoint)
    state.pop("format_version")
    old = tmp_path / "old.pt"
    old.write_bytes(format1_bytes({"format_version": 1, **state}))
    with pytest.raises(CheckpointError, match="--trust"):
        upgrade_checkpoint(old)
    assert main(["upgrade-checkpoint", str(old), "--trust"]) == 0
    assert (tmp_path / "old.pt.format1").is_file()
    new = load_checkpoint(old)
    assert new["format_version"] == 2
    for k, v in state["model"].items():
        assert torch.equal(new["model"][k], v)
    assert main(["evaluate", "--checkpoint", str(old), "--split", "test"]) == 0


def test_the_state_of_a_training_run_round_trips_exactly(tmp_path):
    """Everything trainer_state holds (optimiser with int keys, RNG tuples and NumPy arrays,
    inf, None, views that share storage) comes back equal and usable."""
    import random

    from nirdml.training.state import rng_state, set_rng_state

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    base = torch.randn(6, 4)
    state = {"optimizer": opt.state_dict(), "rng": rng_state(), "best_score": -float("inf"),
             "nan": float("nan"), "view": base[2:4], "t": base.t(), "same": base, "none": None,
             "mixed": {0: "a", "b": (1, [2.5, True])}, "empty": torch.zeros(0, 3),
             "arr": np.arange(6, dtype=np.uint32).reshape(2, 3)}
    save_checkpoint(state, tmp_path / "s.pt")
    back = load_checkpoint(tmp_path / "s.pt")
    assert back["best_score"] == -float("inf") and np.isnan(back["nan"])
    assert torch.equal(back["view"], base[2:4]) and torch.equal(back["t"], base.t())
    assert torch.equal(back["same"], base) and back["none"] is None
    assert back["mixed"] == {0: "a", "b": (1, [2.5, True])}
    assert back["empty"].shape == (0, 3) and back["arr"].dtype == np.uint32
    assert (back["arr"] == state["arr"]).all()
    opt.load_state_dict(back["optimizer"])
    random.random()
    set_rng_state(back["rng"])
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(back["rng"])
    assert first == (random.random(), np.random.rand(), torch.rand(1).item())


def test_missing_or_mistyped_keys_are_one_line_errors(tmp_path, checkpoint, capsys):
    state = load_checkpoint(checkpoint)
    no_config = {k: v for k, v in state.items() if k not in ("config", "format_version")}
    save_checkpoint(no_config, tmp_path / "a.pt")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "a.pt")],
                    "lacks 'config'")
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(checkpoint, require=TRAINER_KEYS)
    bad_type = {**{k: v for k, v in state.items() if k != "format_version"}, "epoch": "x"}
    save_checkpoint(bad_type, tmp_path / "b.pt")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "b.pt")],
                    "'epoch' is a str")
    not_tensors = {**{k: v for k, v in state.items() if k != "format_version"},
                   "model": {"w": [1, 2]}}
    save_checkpoint(not_tensors, tmp_path / "c.pt")
    _one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "c.pt")],
                    "not a mapping of names to tensors")


def _rewrap(body: bytes) -> bytes:
    """A format-2 file around ``body`` with a correct digest (a deliberate forgery)."""
    return b"NIRDMLC2" + hashlib.sha256(body).digest() + body


def _with_metadata(body: bytes, text: str) -> bytes:
    """``body`` (safetensors) with its checkpoint metadata replaced by ``text``."""
    (size,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + size])
    header["__metadata__"]["nirdml_checkpoint"] = text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + size:]


def test_fuzzed_checkpoints_end_in_a_checkpoint_error_or_a_correct_state(tmp_path):
    """Truncated, bit-flipped (digest recomputed, so the parser itself is hit), wrong-type,
    empty and oversized files, and forged metadata: a CheckpointError or a correct state,
    never another exception."""
    state = {"config": {"seed": 1}, "model": {"w": torch.arange(12.0).reshape(3, 4),
                                              "b": torch.ones(3, dtype=torch.float64)},
             "epoch": 3, "rng": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2)},
             "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": []}}
    valid = checkpoint_bytes(state)
    body = valid[40:]
    rng = np.random.default_rng(0)
    path = tmp_path / "f.pt"
    cases = []
    for _ in range(80):  # truncations of the file and of the body
        cut = int(rng.integers(0, len(valid)))
        cases.append(valid[:cut])
        cases.append(_rewrap(body[:int(rng.integers(0, len(body)))]))
    for _ in range(150):  # flipped bits, digest recomputed
        raw = bytearray(body)
        for _ in range(int(rng.integers(1, 4))):
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        cases.append(_rewrap(bytes(raw)))
    forged = ['[]', '"x"', '{"__tensor__": "99"}', '{"model": {"__tensor__": 5}}',
              '{"format_version": 2, "model": {"__ndarray__": "0", "dtype": "O", "shape": [1]}}',
              '{"format_version": 2, "a": {"__items__": [[true, 1]]}}',
              '{"format_version": 2, "a": {"__float__": "1e999"}}',
              '{"format_version": 2, "a": {"__unknown__": 1}}',
              '{"format_version": 2, "a": {"__tuple__": 3}}',
              '{"format_version": 2, "model": {"__ndarray__": "0", "dtype": "<f8", '
              '"shape": [99, 99]}}',
              '{"format_version": 2, "epoch": true}', '{"format_version": 3}',
              '[' * 5000 + ']' * 5000, "not json", ""]
    cases += [_rewrap(_with_metadata(body, text)) for text in forged]
    cases += [b"", b"NIRDMLC2", b"\x00" * 64, valid + b"trailing", valid * 2,
              _rewrap(b"\xff" * 8 + body[8:]), _rewrap(struct.pack("<Q", 2**40) + body[8:])]
    outcomes = {"error": 0, "ok": 0}
    for data in cases:
        path.write_bytes(data)
        try:
            back = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1  # a flipped bit in a tensor or a key: what the file now says
        assert isinstance(back, dict) and back["format_version"] == 2
    assert len(cases) > 300 and outcomes["error"] > 250


# ---- folders nirdml did not create --------------------------------------------------------------
def _digits(*more):
    from nirdml.training.config import load_config

    return load_config("digits", ["train.epochs=1", "train.progress=false",
                                  "train.tensorboard=false", "model.embedding_dim=8", *more])


def test_train_refuses_a_folder_with_the_users_files_and_leaves_it_untouched(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    line = _one_line_error(capsys, ["train", "--out", str(folder), "--set", "train.epochs=1"],
                           "not written by nirdml")
    assert str(folder) in line
    assert (folder / "config.yaml").read_text() == "my own notes\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    _one_line_error(capsys, ["train", "--out", str(blocker)], "is a file")
    assert blocker.read_text() == "x"


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    from nirdml.training import Trainer

    bad = _digits("data.name=folder", f"data.root={tmp_path / 'no-such-images'}")
    with pytest.raises(Exception):  # noqa: B017 - whatever the dataset says
        Trainer(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception):  # noqa: B017
        Trainer(bad, empty)
    assert empty.is_dir() and not any(empty.iterdir())  # the user's folder stays, empty

    # a failure inside the first epoch (before any checkpoint) is undone too
    def broken_step(self, x, y):
        raise RuntimeError("boom")

    trainer = Trainer(_digits(), tmp_path / "t")
    assert (tmp_path / "t" / ".nirdml").is_file()
    trainer._step = broken_step.__get__(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert not (tmp_path / "t").exists()


def test_a_run_of_ours_that_never_checkpointed_is_restarted_in_place(tmp_path):
    from nirdml.training import Trainer

    first = Trainer(_digits(), tmp_path / "r")
    (tmp_path / "r" / "metrics.jsonl").write_text('{"epoch": 9}\n')  # a stale record
    (tmp_path / "r" / "notes.txt").write_text("mine")
    (tmp_path / "r" / "checkpoints" / "my-empty-folder").mkdir()
    del first
    Trainer(_digits(), tmp_path / "r").fit()
    records = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "r" / "checkpoints" / "my-empty-folder").is_dir()


def test_crossval_never_removes_a_fold_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "OUT"
    precious = out / "fold0" / "my_images" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("keep me")
    argv = ["crossval", "--folds", "2", "--out", str(out), "--set", "train.epochs=1"]
    line = _one_line_error(capsys, argv, "fold0", "not written by nirdml")
    assert precious.read_text() == "keep me"
    assert not (out / ".nirdml").exists() and not (out / "fold1").exists()
    # OUT/fold0 a file, OUT a file, an unwritable OUT: one line each, before any work
    precious.parent.parent.rename(tmp_path / "moved")
    from nirdml.owned import claim_folder

    claim_folder(out, "crossval")
    (out / "fold0").write_text("x")
    _one_line_error(capsys, argv, "fold0", "is a file")
    _one_line_error(capsys, ["crossval", "--out", str(out / "fold0")], "is a file")
    assert "nirdml does not write into it" in line


def test_tune_refuses_an_out_that_is_a_file_or_not_ours(tmp_path, capsys):
    pytest.importorskip("optuna")
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: float, low: 0.001, high: 0.01, log: true}\n")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    argv = ["tune", "--space", str(space), "--trials", "1", "--folds", "2"]
    _one_line_error(capsys, [*argv, "--out", str(blocker)], "is a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "study.txt").write_text("mine")
    _one_line_error(capsys, [*argv, "--out", str(mine)], "not written by nirdml")
    assert sorted(p.name for p in mine.iterdir()) == ["study.txt"]


def test_crossval_and_tune_run_with_their_default_config(tmp_path, capsys):
    """The shipped default of crossval/tune (digits_cv: 8 training classes, 4 folds of 2)
    trains every fold; before it, digits' 5 classes left 3 per training fold for a batch
    that needs 5. --folds and a data.folds override that disagree are one line."""
    from nirdml.commands import crossval as command

    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    defaults = parser.parse_args(["--out", str(tmp_path / "cv")])
    assert (defaults.config, defaults.folds) == ("digits_cv", 4)
    assert main(["crossval", "--out", str(tmp_path / "cv"), "--set", "train.epochs=1",
                 "--set", "train.progress=false"]) == 0
    summary = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert [r["status"] for r in summary["fold_runs"]] == ["trained"] * 4
    _one_line_error(capsys, ["crossval", "--folds", "2", "--out", str(tmp_path / "cv2"),
                             "--set", "data.folds=3"], "--folds 2 and data.folds=3 disagree")
    assert not (tmp_path / "cv2").exists()


def test_a_single_class_test_split_is_refused_before_training(tmp_path):
    """A split that no metric can judge is a data problem known up front: one line, and the
    run folder is not even created."""
    from PIL import Image

    from nirdml.errors import InputError
    from nirdml.training import Trainer

    lines = ["label,path,split"]
    for i in range(16):
        split, label = ("test", "t0") if i >= 12 else ("train", f"c{i % 3}")
        Image.new("L", (8, 8), 16 * i).save(tmp_path / f"{i}.png")
        lines.append(f"{label},{i}.png,{split}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    cfg = _digits("data.name=csv", f"data.root={tmp_path / 'data.csv'}", "data.batch_size=6",
                  "data.samples_per_class=2", "data.image_size=8")
    with pytest.raises(InputError, match="test split of csv holds a single class"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
