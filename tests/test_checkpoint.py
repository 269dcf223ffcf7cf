"""Atomic checkpoints: corruption is detected, the previous good file survives, no partial files."""

import errno

import pytest
import torch

from nirdml.errors import CheckpointError
from nirdml.training.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint({"w": torch.arange(3.0), "epoch": 1}, path)
    save_checkpoint({"w": torch.arange(4.0), "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert load_checkpoint(path.with_name("last.pt.prev"))["epoch"] == 1
    assert not path.with_name("last.pt.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_file_is_detected(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2, "w": torch.randn(100)}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-20] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "last.pt.prev" in str(err.value)
    assert load_checkpoint(path.with_name("last.pt.prev"))["epoch"] == 1


def test_disk_full_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    real_fsync = __import__("os").fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("nirdml.training.checkpoint.os.fsync", full_disk)
    with pytest.raises(CheckpointError, match="disk is full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr("nirdml.training.checkpoint.os.fsync", real_fsync)
    assert load_checkpoint(path)["epoch"] == 1
    assert not path.with_name("last.pt.tmp").exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
