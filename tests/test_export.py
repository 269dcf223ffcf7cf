"""ONNX and TorchScript export: the exported network gives PyTorch's embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirdml.cli import main
from nirdml.errors import CheckpointError, ConfigError
from nirdml.export import export_model, read_export_metadata, run_exported
from nirdml.models.fingerprint import model_fingerprint


def make_checkpoint(path, image_size=32):
    """A small_cnn checkpoint that ``TrainedRun`` accepts (no training)."""
    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=16, in_chans=3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cfg = Config.from_dict({
        "data": {"name": "digits", "image_size": image_size, "val_fraction": 0.0},
        "model": {"name": "small_cnn", "embedding_dim": 16, "pretrained": False},
    })
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 3,
                     "image_kind": "rgb", "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("export") / "model.pt")


def reference(checkpoint, x):
    from nirdml.inference import TrainedRun

    model = TrainedRun.open(checkpoint, device="cpu").model
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy(), model_fingerprint(model)


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_matches_pytorch(checkpoint, tmp_path, fmt, suffix):
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "torch")
    out = tmp_path / f"model{suffix}"
    res = export_model(checkpoint, out, fmt)
    assert res.path == out and out.is_file() and res.input_shape == (3, 32, 32)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-5
    rng = np.random.default_rng(0)
    for batch in (1, 5):  # the batch axis is dynamic
        x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
        expected, fingerprint = reference(checkpoint, x)
        got = run_exported(out, x)
        assert got.shape == (batch, 16)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    meta = read_export_metadata(out)
    assert meta["fingerprint"] == fingerprint and meta["input_shape"] == [3, 32, 32]
    assert meta["image_kind"] == "rgb" and meta["embedding_dim"] == 16


def test_export_command_and_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out",
                 str(out), "--image-size", "24"]) == 0
    assert "(B, 3, 24, 24)" in capsys.readouterr().out
    x = np.zeros((2, 3, 24, 24), np.float32)
    np.testing.assert_allclose(run_exported(out, x), reference(checkpoint, x)[0], atol=1e-5)
    with pytest.raises(ConfigError, match="unknown export format"):
        export_model(checkpoint, tmp_path / "m.bin", "tflite")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_model(tmp_path / "missing.pt", tmp_path / "m2.onnx")
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out",
                 str(tmp_path / "m3.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gray_small_input_size_comes_from_the_dataset(tmp_path):
    """digits (8 x 8) has no data.image_size: the export reads the size from the test split."""
    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["model.embedding_dim=16"])
    model = build_model("small_cnn", embedding_dim=16, in_chans=1)
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 1,
                     "image_kind": "gray_small", "epoch": 1}, tmp_path / "d.pt")
    res = export_model(tmp_path / "d.pt", tmp_path / "d.onnx")
    assert res.input_shape == (1, 8, 8) and res.max_abs_diff <= 1e-5
    missing = cfg.with_overrides(["data.name=omniglot", f"data.root={tmp_path / 'none'}"])
    save_checkpoint({"config": missing.to_dict(), "model": model.state_dict(), "in_chans": 1,
                     "image_kind": "gray_small", "epoch": 1}, tmp_path / "o.pt")
    with pytest.raises(ConfigError, match="--image-size"):
        export_model(tmp_path / "o.pt", tmp_path / "o.onnx")
    assert export_model(tmp_path / "o.pt", tmp_path / "o.onnx", image_size=28).input_shape == (
        1, 28, 28)
