"""Test helpers shared by several modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_untrained_digits_checkpoint(path: Path):
    """An untrained 16-d small-CNN digits checkpoint at ``path``; returns the digits splits."""
    from nirdml.models import build_model
    from nirdml.training import builders
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["model.embedding_dim=16"])
    splits = builders.build_splits(cfg)
    in_chans = int(splits.test[0][0].shape[0])
    model = build_model("small_cnn", embedding_dim=16, in_chans=in_chans)
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": in_chans,
                     "image_kind": splits.image_kind, "epoch": 1}, path)
    return splits
