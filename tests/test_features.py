"""Tests of nirdml.data.features (the frozen-backbone feature cache) and its training path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirdml.data import build_transforms, load_splits
from nirdml.data.features import FeatureDataset, cache_key, feature_splits
from nirdml.models import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


def _encoder(seed=0):
    torch.manual_seed(seed)
    model = build_model("small_cnn", embedding_dim=8, in_chans=1)
    return model, torch.nn.Sequential(model.backbone, model.pool)


def test_features_equal_the_encoder_and_are_read_back(tmp_path, monkeypatch):
    splits = load_splits("digits", val_fraction=0.0)
    model, encoder = _encoder()
    tf = build_transforms(splits.image_kind, train=False)
    feats = feature_splits(encoder, splits, tf, torch.device("cpu"), tmp_path, {"d": 1},
                           batch_size=100)
    assert feats.val is None and feats.image_kind == "features"
    for name in ("train", "test"):
        ds, fd = getattr(splits, name), getattr(feats, name)
        assert isinstance(fd, FeatureDataset) and len(fd) == len(ds)
        assert np.array_equal(fd.labels, ds.labels) and fd.class_names == ds.class_names
        images = torch.stack([ds[i][0] for i in range(7)])
        with torch.no_grad():
            expected = encoder.eval()(images)
        got = torch.stack([fd[i][0] for i in range(7)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        sub = fd.select([3, 5])
        torch.testing.assert_close(sub[1][0], fd[5][0])
    assert len(list(tmp_path.glob("*.npy"))) == 2
    import nirdml.data.features as features

    monkeypatch.setattr(features, "encode", lambda *a, **k: pytest.fail("not cached"))
    again = feature_splits(encoder, splits, tf, torch.device("cpu"), tmp_path, {"d": 1})
    torch.testing.assert_close(again.test[4][0], feats.test[4][0])


def test_cache_key_changes_with_weights_transform_data_and_description():
    splits = load_splits("digits", val_fraction=0.0)
    _, encoder = _encoder(0)
    _, other = _encoder(1)
    tf = build_transforms(splits.image_kind, train=False)
    key = cache_key(encoder, tf, splits.test, {"a": 1})
    assert key == cache_key(encoder, tf, splits.test, {"a": 1})
    assert key != cache_key(other, tf, splits.test, {"a": 1})
    assert key != cache_key(encoder, build_transforms(splits.image_kind, False, 6),
                            splits.test, {"a": 1})
    assert key != cache_key(encoder, tf, splits.test.select(np.arange(10)), {"a": 1})
    assert key != cache_key(encoder, tf, splits.test, {"a": 2})


@pytest.mark.slow
def test_frozen_backbone_run_trains_the_head_only_and_embeds_images(tmp_path):
    from nirdml.inference import TrainedRun
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    cfg = load_config("digits", [
        "train.epochs=2", "train.progress=false", "train.tensorboard=false",
        "model.embedding_dim=16", "model.frozen_backbone=true", "model.head_hidden=[32]",
        f"data.feature_cache={tmp_path / 'cache'}"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = [p.detach().clone() for p in trainer.model.head.parameters()]
    final = trainer.fit()
    for k, v in trainer.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics untouched
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.model.head.parameters()))
    assert trainer.splits.image_kind == "features"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # train and test
    # the checkpoint is a whole image model: embedding the test images gives what was evaluated
    emb = TrainedRun.open(tmp_path / "run" / "checkpoints" / "best.pt", "cpu").embed("test")
    from nirdml.evaluation import evaluate

    again = evaluate(emb.embeddings, emb.labels, recall_ks=(1,), metrics=["recall", "map@r"])
    # equal up to float rounding of the two paths (cached features vs one forward): the frozen
    # random CNN's embeddings are nearly collapsed, so rounding reorders a few near-ties
    assert again["recall@1"] == pytest.approx(final["recall@1"], abs=1e-3)
    assert again["map@r"] == pytest.approx(final["map@r"], abs=1e-4)


def test_split_trunk_gives_the_backbone_back_and_refuses_other_trunks():
    pytest.importorskip("timm")
    from nirdml.errors import ConfigError
    from nirdml.models.backbones import split_trunk

    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", embedding_dim=8, in_chans=1).eval()
    x = torch.randn(3, 1, 40, 40)
    for n in (1, 5, 16):
        frozen, trainable = split_trunk(model.backbone, n)
        with torch.no_grad():
            torch.testing.assert_close(trainable(frozen(x)), model.backbone(x))
        assert len(trainable) == n + 2  # the blocks, conv_head, bn2
    with pytest.raises(ConfigError, match=r"trainable_blocks: 17; the trunk has 16 blocks"):
        split_trunk(model.backbone, 17)
    with pytest.raises(ConfigError, match="stages of blocks"):
        split_trunk(build_model("small_cnn", embedding_dim=8).backbone, 1)


@pytest.mark.slow
def test_the_last_blocks_fine_tune_on_their_cached_input(tmp_path):
    """model.trainable_blocks=2: the input of the last two blocks is cached once per image;
    they (and the head) train, the blocks before them do not move; the checkpoint embeds
    images through the whole backbone as the cut path embedded their cached input."""
    pytest.importorskip("timm")
    from nirdml.errors import ConfigError
    from nirdml.inference import TrainedRun
    from nirdml.models.backbones import split_trunk
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    base = ["train.epochs=2", "train.progress=false", "train.tensorboard=false",
            "model.name=efficientnet_lite0", "model.pretrained=false", "model.embedding_dim=16",
            "data.image_size=32", "model.frozen_backbone=true", "optim.warmup_epochs=1",
            "train.select_on=last", f"data.feature_cache={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match="model.trainable_blocks"):
        load_config("digits", [*base[:-3], "model.frozen_backbone=false",
                               "model.trainable_blocks=2"])
    cfg = load_config("digits", [*base, "model.trainable_blocks=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    frozen, trainable = split_trunk(trainer.model.backbone, 2)
    shape = trainer.model.cut_shape
    assert trainer.splits.train[0][0].shape == (int(np.prod(shape)),)
    before_f = {k: v.clone() for k, v in frozen.state_dict().items()}
    before_t = {k: v.clone() for k, v in trainable.state_dict().items()}
    history = []
    real = trainer._train_one_epoch

    def epoch():
        out = real()
        history.append({k: v.clone() for k, v in trainable.state_dict().items()})
        return out
    trainer._train_one_epoch = epoch
    final = trainer.fit()
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before_f[k]), k
    # warm-up epoch: the trunk's end does not move; then it does
    assert all(torch.equal(history[0][k], before_t[k]) for k in before_t)
    assert any(not torch.equal(history[1][k], before_t[k]) for k in before_t)
    emb = TrainedRun.open(tmp_path / "run" / "checkpoints" / "best.pt", "cpu").embed("test")
    from nirdml.evaluation import evaluate

    again = evaluate(emb.embeddings, emb.labels, recall_ks=(1,), metrics=["recall", "map@r"])
    assert again["recall@1"] == pytest.approx(final["recall@1"], abs=2e-3)
    assert again["map@r"] == pytest.approx(final["map@r"], abs=2e-3)
