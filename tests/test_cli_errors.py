"""A new user's bad paths: one clear line (exit 2) before any work, never a traceback."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import refused


@pytest.fixture
def readonly(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)


def test_unwritable_outputs_are_refused_before_any_work(checkpoint, readonly, tmp_path, capsys,
                                                        monkeypatch):
    import os

    if os.geteuid() == 0:  # root writes anywhere: block the folder with a file instead
        readonly = tmp_path / "a-file"
        readonly.write_text("not a folder")
    from nirdml.inference import TrainedRun

    monkeypatch.setattr(TrainedRun, "open",
                        lambda *a, **k: pytest.fail("opened the checkpoint before checking --out"))
    refused(capsys, ["embed", "--checkpoint", str(checkpoint), "--out",
                      str(readonly / "e.npz")], "--out", "cannot be written")
    refused(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--json",
                      str(readonly / "m.json")], "--json", "cannot be written")
    refused(capsys, ["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                      "--out", str(readonly / "m.pt")], "--out", "cannot be written")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    refused(capsys, ["report", "--run", str(run), "--out", str(readonly / "r.html")],
            "--out", "cannot be written")
    refused(capsys, ["embed", "--checkpoint", str(checkpoint), "--out", str(tmp_path)],
            "is a folder")


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    refused(capsys, ["report", "--run", str(tmp_path)], "not a training run")


def test_evaluate_on_a_file_that_is_not_npz(tmp_path, capsys):
    bad = tmp_path / "emb.npy"
    np.save(bad, np.zeros((3, 2)))
    refused(capsys, ["evaluate", "--embeddings", str(bad)], "is not an .npz file")
    text = tmp_path / "emb.npz"
    text.write_text("hello")
    refused(capsys, ["evaluate", "--embeddings", str(text)], "is not an .npz file")
