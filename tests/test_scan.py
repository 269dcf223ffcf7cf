"""Unreadable image files are found before any work, listed by name, and never substituted in
evaluation splits (nirdml.data.scan and its use by the trainer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nirdml.data.scan import check_image, find_unreadable
from nirdml.errors import DatasetError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRDML_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


def _image(path, seed=0, size=16, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, fmt)
    return path


def test_check_image_finds_every_kind_of_bad_file(tmp_path):
    good_png, good_jpg = _image(tmp_path / "a.png"), _image(tmp_path / "a.jpg", fmt="JPEG")
    assert check_image(str(good_png)) is None and check_image(str(good_jpg)) is None
    text = tmp_path / "text.png"
    text.write_bytes(b"this is not an image")
    half_png = tmp_path / "half.png"
    half_png.write_bytes(good_png.read_bytes()[:-40])
    half_jpg = tmp_path / "half.jpg"
    half_jpg.write_bytes(good_jpg.read_bytes()[:-100])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "UnidentifiedImageError" in check_image(str(text))
    assert check_image(str(half_png)) is not None
    assert check_image(str(half_jpg)) == "truncated JPEG (no end-of-image marker)"
    assert check_image(str(empty)) is not None
    assert check_image(str(tmp_path / "gone.png")) == "file not found"


def test_scan_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import nirdml.data.scan as scan

    paths = [str(_image(tmp_path / f"{i}.png", seed=i)) for i in range(5)]
    (tmp_path / "3.png").write_bytes(b"broken")
    paths.append(str(tmp_path / "missing.png"))
    bad = find_unreadable(paths)
    assert set(bad) == {paths[3], paths[5]}
    monkeypatch.setattr(scan, "check_image", lambda p: pytest.fail("not cached"))
    assert find_unreadable(paths) == bad
    _image(tmp_path / "3.png", seed=3)  # repaired: a new size/mtime, a new scan
    monkeypatch.undo()
    monkeypatch.setenv("NIRDML_CACHE", str(tmp_path / "cache"))
    assert set(find_unreadable(paths)) == {paths[5]}


def _csv_run(tmp_path, bad_test_rows):
    """A small CSV dataset: 6 train classes x 6 images, 4 test classes x 6 images; some test
    files unreadable."""
    lines = ["label,path,split"]
    i = 0
    for split, classes in (("train", 6), ("test", 4)):
        for c in range(classes):
            for _ in range(6):
                path = _image(tmp_path / "imgs" / f"{i}.png", seed=i, size=12)
                if split == "test" and i - 36 in bad_test_rows:
                    path.write_bytes(b"not an image" if i % 2 else path.read_bytes()[:50])
                lines.append(f"{split}{c},imgs/{i}.png,{split}")
                i += 1
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return ["data.name=csv", f"data.root={tmp_path / 'data.csv'}", "data.val_fraction=0",
            "data.batch_size=12", "data.samples_per_class=2", "data.image_size=8",
            "model.name=small_cnn", "model.pretrained=false", "model.embedding_dim=8",
            "loss.nir.enabled=false", "train.epochs=1", "train.progress=false",
            "train.tensorboard=false", "train.select_on=last", "train.probe_classes=0",
            "optim.warmup_epochs=0", "optim.lr=0.001"]


def test_skip_drops_unreadable_test_images_and_reports_them(tmp_path, capsys):
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    cfg = load_config("digits", _csv_run(tmp_path, bad_test_rows={0, 1, 7, 8, 20, 23}))
    trainer = Trainer(cfg, tmp_path / "run")
    assert "6 from test" in capsys.readouterr().err
    test = trainer.splits.test
    assert len(test) == 24 - 6
    files = [open(p, "rb").read() for p in test.paths]
    assert len(set(files)) == len(files)  # no duplicates: nothing was substituted
    final = trainer.fit()
    assert final["num_queries"] == 18 and final["unreadable_dropped"] == {"test": 6}
    assert json.loads((tmp_path / "run/final.json").read_text())["unreadable_dropped"] == {
        "test": 6}
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert record["data/unreadable_test"] == 6


def test_fail_stops_before_the_first_step_and_names_the_files(tmp_path, monkeypatch):
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    cfg = load_config("digits", [*_csv_run(tmp_path, bad_test_rows={5}), "data.on_error=fail"])
    monkeypatch.setattr(Trainer, "_step", lambda *a: pytest.fail("trained before failing"))
    with pytest.raises(DatasetError, match=r"1 unreadable image file\(s\): .*imgs/41\.png"):
        Trainer(cfg, tmp_path / "run")


def test_evaluation_split_never_substitutes_a_file_that_breaks_later(tmp_path):
    from nirdml.training import builders
    from nirdml.training.config import load_config

    cfg = load_config("digits", _csv_run(tmp_path, bad_test_rows=set()))
    splits = builders.build_splits(cfg)
    (tmp_path / "imgs" / "40.png").write_bytes(b"broken after the scan")
    with pytest.raises(DatasetError, match="never substitutes"):
        splits.test[4]
    (tmp_path / "imgs" / "0.png").write_bytes(b"broken after the scan")
    with pytest.warns(RuntimeWarning, match="using another image of the same class"):
        splits.train[0]  # training may substitute (counted in bad_samples)
    assert splits.train.bad_samples == 1
