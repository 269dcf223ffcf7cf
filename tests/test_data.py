"""nirdml.data: every layout on tiny fixture trees, errors, sampler, transforms, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, need_shared
from nirdml.data import (
    ClassBalancedBatchSampler,
    build_transforms,
    download_file,
    load_splits,
)
from nirdml.errors import ConfigError, DatasetError

SHARED_OMNIGLOT = SHARED_DATA / "omniglot"


# ---- fixture helpers -----------------------------------------------------------------------
def write_image(path: Path, seed: int = 0, size: int = 6, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def check_splits(splits, train_classes: int, test_classes: int, val_classes: int | None = None):
    """Sizes, contiguous labels and class-disjointness of a Splits."""
    parts = {"train": splits.train, "test": splits.test}
    if val_classes is None:
        assert splits.val is None
    else:
        parts["val"] = splits.val
        assert splits.val.num_classes == val_classes
    assert splits.train.num_classes == train_classes
    assert splits.test.num_classes == test_classes
    for ds in parts.values():
        assert ds.labels.dtype == np.int64
        assert np.array_equal(np.unique(ds.labels), np.arange(ds.num_classes))
        assert len(ds.class_names) == ds.num_classes
    names = [set(ds.class_names) for ds in parts.values()]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not names[i] & names[j]


def make_omniglot_part(root: Path, part: str, alphabets: dict[str, int], drawings: int = 2):
    """``root/part/<Alphabet>/characterNN/*.png`` with black ink on white, like the official."""
    for a, (alphabet, chars) in enumerate(alphabets.items()):
        for c in range(1, chars + 1):
            for d in range(drawings):
                image = np.ones((10, 10), dtype=bool)
                image[2:8, c] = False  # one ink stroke
                path = root / part / alphabet / f"character{c:02d}" / f"{a}{c:02d}_{d:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    return archive


# ---- digits --------------------------------------------------------------------------------
def test_digits_splits_and_items():
    splits = load_splits("digits")
    check_splits(splits, 4, 5, val_classes=1)
    assert splits.image_kind == "gray_small"
    assert sorted(splits.train.class_names + splits.val.class_names) == [0, 1, 2, 3, 4]
    assert splits.test.class_names == [5, 6, 7, 8, 9]
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert isinstance(y, int)
    assert splits.train.paths is None and splits.test.is_query is None
    assert load_splits("digits", val_fraction=0.0).val is None
    again = load_splits("digits", seed=0)
    assert again.val.class_names == splits.val.class_names  # deterministic given seed


def test_no_dataset_option_shadows_an_argument_of_load_splits():
    """``data.options`` go to the loader as keywords beside load_splits' own: a loader option
    named like one of those (digits' old ``train_classes``) made every run of it a TypeError."""
    import inspect

    from nirdml.data import DATASETS

    own = set(inspect.signature(load_splits).parameters) - {"name", "options", "root", "seed",
                                                              "on_error"}
    assert {"val_fraction", "folds", "fold", "train_classes", "class_seed"} <= own
    for name in DATASETS.names():
        taken = set(inspect.signature(DATASETS.get(name)).parameters)
        assert not taken & own, f"dataset {name!r} option(s) {taken & own} shadow load_splits'"


def test_digits_split_point_and_a_class_draw_go_together():
    splits = load_splits("digits", val_fraction=0.0, train_digits=8, train_classes=3,
                         class_seed=1)
    assert len(splits.train.class_names) == 3 and set(splits.train.class_names) <= set(range(8))
    assert splits.test.class_names == [8, 9]


def test_a_small_training_set_is_a_seeded_draw_of_whole_classes_the_same_for_every_run_seed():
    full = load_splits("digits", val_fraction=0.0).train
    per_class = np.bincount(full.labels)
    names = {}
    for seed, class_seed in ((0, 0), (7, 0), (0, 3)):
        splits = load_splits("digits", val_fraction=0.3, seed=seed, train_classes=3,
                             class_seed=class_seed)
        drawn = splits.train.class_names + splits.val.class_names
        assert len(splits.val.class_names) == 1 and len(set(drawn)) == 3
        assert set(drawn) <= set(full.class_names)
        # every sample of a drawn class is kept, none of the others
        want = sum(per_class[full.class_names.index(c)] for c in drawn)
        assert len(splits.train) + len(splits.val) == want
        assert splits.test.class_names == [5, 6, 7, 8, 9]  # the test classes are untouched
        names[seed, class_seed] = sorted(drawn)
    assert names[0, 0] == names[7, 0]  # the run seed does not change the draw
    assert names[0, 0] != names[0, 3]  # the class seed does
    assert load_splits("digits", train_classes=5).train.class_names == \
        load_splits("digits").train.class_names  # all of them: the plain split
    with pytest.raises(ConfigError, match=r"data.train_classes=9, but .* has 5 training "
                                          r"classes; choose 1..5"):
        load_splits("digits", train_classes=9)


# ---- CUB200 ------------------------------------------------------------------------------------
def test_cub_official_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = {1: "001.Albatross", 2: "002.Auklet", 3: "003.Blackbird", 101: "101.Pelican",
               102: "102.Puffin"}
    images, labels = [], []
    for cid, cname in classes.items():
        for k in range(2):
            rel = f"{cname}/{cname}_{k}.jpg"
            write_image(base / "images" / rel, seed=cid * 10 + k)
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {cid}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{k} {v}" for k, v in classes.items()) + "\n")
    splits = load_splits("cub200", root=tmp_path, val_fraction=0.0)
    check_splits(splits, 3, 2)
    assert splits.image_kind == "rgb"
    assert splits.train.class_names == ["001.Albatross", "002.Auklet", "003.Blackbird"]
    assert len(splits.train) == 6 and len(splits.test) == 4
    x, y = splits.test[3]
    assert x.shape == (3, 6, 6) and y == 1
    assert all(Path(p).is_file() for p in splits.train.paths)
    # root may also be the CUB_200_2011 folder itself; val holds out one training class
    splits = load_splits("cub200", root=base, val_fraction=0.3)
    check_splits(splits, 2, 2, val_classes=1)


def test_cub_plain_layout(tmp_path):
    for name in ("001.a", "002.b", "101.c", "102.d", "103.e"):
        for k in range(2):
            write_image(tmp_path / "images" / name / f"{k}.png", seed=k)
    splits = load_splits("cub200", root=tmp_path, val_fraction=0.0)
    check_splits(splits, 2, 3)
    assert splits.test.class_names == ["101.c", "102.d", "103.e"]


def test_missing_and_wrong_roots(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*vision.caltech.edu"):
        load_splits("cub200", root=tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as info:
        load_splits("cub200", root=tmp_path)
    message = str(info.value)
    assert "CUB_200_2011/images.txt" in message and "images/<class>/" in message
    assert str(tmp_path) in message and "found: readme.txt" in message
    for name, expected in (("cars196", "cars_annos.mat"), ("sop", "Ebay_train.txt"),
                           ("inshop", "list_eval_partition.txt")):
        with pytest.raises(DatasetError, match=expected):
            load_splits(name, root=tmp_path)
    with pytest.raises(DatasetError, match="download=True"):
        load_splits("omniglot", root=tmp_path / "nope")
    with pytest.raises(DatasetError, match="download=True"):
        load_splits("omniglot", root=tmp_path)
    with pytest.raises(ConfigError, match="does not take option"):
        load_splits("digits", colour="red")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_splits("imagenet")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_splits("digits", val_fraction=1.0)


# ---- Cars196 -----------------------------------------------------------------------------------
def test_cars_mat_layout(tmp_path):
    from scipy.io import savemat

    records = []
    for i, cid in enumerate([1, 1, 2, 2, 98, 99, 99, 196]):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_image(tmp_path / rel, seed=i)
        records.append((rel, cid, i % 2))
    annotations = np.array(records, dtype=[("relative_im_path", object), ("class", object),
                                            ("test", object)])
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations})
    splits = load_splits("cars196", root=tmp_path, val_fraction=0.0)
    check_splits(splits, 3, 2)
    assert splits.train.class_names == [1, 2, 98] and splits.test.class_names == [99, 196]
    assert len(splits.train) == 5 and len(splits.test) == 3
    assert splits.test[2][1] == 1


def test_cars_folder_layout(tmp_path):
    for name in ("Acura", "BMW", "Chevy", "Dodge"):
        write_image(tmp_path / name / "a.jpg")
        write_image(tmp_path / name / "b.jpg", seed=1)
    splits = load_splits("cars196", root=tmp_path, val_fraction=0.0, num_train_classes=3)
    check_splits(splits, 3, 1)
    assert splits.test.class_names == ["Dodge"]


# ---- SOP and In-Shop ---------------------------------------------------------------------------
def test_sop_layout(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    for split, classes in (("train", [1, 1, 2, 2, 3]), ("test", [11, 11, 12, 12])):
        lines = ["image_id class_id super_class_id path"]
        for i, cid in enumerate(classes):
            rel = f"bicycle_final/{split}_{i}.JPG"
            write_image(base / rel, seed=i, size=5)
            lines.append(f"{i + 1} {cid} 1 {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    splits = load_splits("sop", root=tmp_path, val_fraction=0.0)
    check_splits(splits, 3, 2)
    assert len(splits.train) == 5 and splits.test[0][0].shape == (3, 5, 5)


def test_inshop_layout(tmp_path):
    rows = [("train", "id_01"), ("train", "id_01"), ("train", "id_02"), ("train", "id_03"),
            ("query", "id_10"), ("gallery", "id_10"), ("gallery", "id_10"),
            ("query", "id_11"), ("gallery", "id_11"), ("gallery", "id_12")]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for i, (status, item) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{i:02d}_front.jpg"
        write_image(tmp_path / rel, seed=i)
        lines.append(f"{rel} {item} {status}")
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    splits = load_splits("inshop", root=tmp_path, val_fraction=0.0)
    check_splits(splits, 3, 3)
    test = splits.test
    assert test.is_query.tolist() == [True, False, False, True, False, False]
    assert test.is_gallery.tolist() == [not q for q in test.is_query]
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert splits.train.is_query is None


# ---- folder and CSV ----------------------------------------------------------------------------
def test_folder_layouts(tmp_path):
    for c in range(6):
        for k in range(2):
            write_image(tmp_path / "all" / f"class{c}" / "sub" / f"{k}.png", seed=c)
    splits = load_splits("folder", root=tmp_path / "all", val_fraction=0.0, seed=3)
    check_splits(splits, 3, 3)
    assert splits.test.class_names == load_splits(
        "folder", root=tmp_path / "all", val_fraction=0.0, seed=3).test.class_names
    gray = load_splits("folder", root=tmp_path / "all", test_fraction=0.2, image_kind="gray_small",
                       val_fraction=0.25)
    check_splits(gray, 4, 1, val_classes=1)
    assert gray.image_kind == "gray_small" and gray.train[0][0].shape == (1, 6, 6)

    for split, names in (("tr", ["a", "b"]), ("te", ["c"])):
        for name in names:
            write_image(tmp_path / split / name / "x.jpg")
    splits = load_splits("folder", train_root=str(tmp_path / "tr"), test_root=tmp_path / "te",
                         val_fraction=0.0)
    check_splits(splits, 2, 1)
    with pytest.raises(ConfigError, match="train_root"):
        load_splits("folder")
    with pytest.raises(DatasetError, match="<class>/<image files>"):
        load_splits("folder", root=tmp_path / "tr" / "a")


def test_csv_layout(tmp_path):
    lines = ["label,path,split,is_query,is_gallery"]
    table = [("cat", "train"), ("cat", "train"), ("dog", "train"), ("dog", "train"),
             ("fox", "validation"), ("owl", "test"), ("owl", "test"), ("eel", "test")]
    masks = {5: ("1", "0"), 6: ("0", "1"), 7: ("yes", "true")}
    for i, (label, split) in enumerate(table):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
        q, g = masks.get(i, ("", ""))
        lines.append(f"{label},imgs/{i}.png,{split},{q},{g}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    splits = load_splits("csv", root=tmp_path / "data.csv")  # validation rows: val_fraction unused
    check_splits(splits, 2, 2, val_classes=1)
    assert splits.test.class_names == ["eel", "owl"]
    assert splits.test.is_query.tolist() == [True, False, True]
    assert splits.test.is_gallery.tolist() == [False, True, True]
    assert load_splits("csv", root=tmp_path).train.paths[0] == str(tmp_path / "imgs" / "0.png")

    bad = tmp_path / "bad" / "x.csv"
    bad.parent.mkdir()
    bad.write_text("label,path,split\na,x.png,holdout\n")
    with pytest.raises(DatasetError, match="line 2: split must be"):
        load_splits("csv", root=bad)
    bad.write_text("name,file\na,x.png\n")
    with pytest.raises(DatasetError, match="missing"):
        load_splits("csv", root=bad)


# ---- Omniglot ------------------------------------------------------------------------------------
OMNI_TRAIN = {"Latin": 3, "Greek": 2}
OMNI_TEST = {"Runic": 2}


def check_ink_bright(dataset):
    x, _ = dataset[0]
    assert x.shape[0] == 1 and set(torch.unique(x).tolist()) <= {0.0, 1.0}
    assert x.mean() < 0.5  # mostly dark background, bright ink


def test_omniglot_folder_and_zip_layouts(tmp_path):
    folders = tmp_path / "folders"
    make_omniglot_part(folders, "images_background", OMNI_TRAIN)
    make_omniglot_part(folders, "images_evaluation", OMNI_TEST)
    splits = load_splits("omniglot", root=folders, val_fraction=0.0)
    check_splits(splits, 5, 2)
    assert "Latin/character03" in splits.train.class_names
    check_ink_bright(splits.train)
    x, _ = splits.train[0]
    assert x[0, 2:8, 1].eq(1).all() and x[0, 0].eq(0).all()

    zips = tmp_path / "zips"
    zips.mkdir()
    for part in ("images_background", "images_evaluation"):
        zip_folder(folders / part, zips / f"{part}.zip")
    splits = load_splits("omniglot", root=zips, val_fraction=0.2)
    check_splits(splits, 4, 2, val_classes=1)
    assert (zips / "images_background" / "Greek").is_dir()  # extracted once, next to the zip
    assert not list(zips.glob(".images_*"))  # no temporary folders left behind
    assert load_splits("omniglot", root=zips, val_fraction=0.0).train.num_classes == 5

    (zips / "images_evaluation").rename(zips / "moved")
    (zips / "images_evaluation.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a valid zip"):
        load_splits("omniglot", root=zips)


def test_omniglot_npz_layout(tmp_path):
    rng = np.random.default_rng(0)
    for part, classes in (("images_background", 4), ("images_evaluation", 3)):
        images = rng.random((classes, 3, 12, 12)) > 0.2  # True = background
        labels = np.repeat(np.arange(classes), 3).reshape(classes, 3)
        np.savez_compressed(tmp_path / f"{part}.npz", images=images, labels=labels)
    splits = load_splits("omniglot", root=tmp_path, val_fraction=0.25)
    check_splits(splits, 3, 3, val_classes=1)
    assert splits.test.class_names == [965, 966, 967]
    data = np.load(tmp_path / "images_evaluation.npz")
    x, y = splits.test[4]
    assert y == 1 and torch.equal(x[0], torch.from_numpy(~data["images"][1, 1]).float())
    assert splits.test.class_counts().tolist() == [3, 3, 3]
    np.savez(tmp_path / "images_evaluation.npz", images=np.zeros((2, 2, 3, 3), np.uint8),
             labels=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="bool images"):
        load_splits("omniglot", root=tmp_path)


def test_real_omniglot_npz():
    need_shared("omniglot/images_background.npz")
    need_shared("omniglot/images_evaluation.npz")
    splits = load_splits("omniglot", root=SHARED_OMNIGLOT, val_fraction=0.1, seed=0)
    check_splits(splits, 868, 659, val_classes=96)
    assert sorted(splits.train.class_names + splits.val.class_names) == list(range(1, 965))
    assert splits.test.class_names == list(range(965, 1624))
    for ds in (splits.train, splits.val, splits.test):
        assert (ds.class_counts() == 20).all()
    check_ink_bright(splits.test)
    x = build_transforms("gray_small", train=False)(splits.test._read(0))
    assert x.shape == (1, 28, 28)
    # a CUB-sized training set: 100 drawn background classes, 10 of them for validation
    small = load_splits("omniglot", root=SHARED_OMNIGLOT, val_fraction=0.1, train_classes=100)
    assert (small.train.num_classes, small.val.num_classes) == (90, 10)
    assert len(small.train) == 90 * 20 and small.test.num_classes == 659


def test_real_omniglot_official_zip(tmp_path):
    shutil.copy(need_shared("omniglot/images_background_small1.zip"), tmp_path)
    make_omniglot_part(tmp_path, "images_evaluation", OMNI_TEST)
    splits = load_splits("omniglot", root=tmp_path, val_fraction=0.0,
                         background="images_background_small1")
    assert splits.train.num_classes == 136 and (splits.train.class_counts() == 20).all()
    x, _ = splits.train[0]
    assert x.shape == (1, 105, 105)
    check_ink_bright(splits.train)


# ---- unreadable images ---------------------------------------------------------------------
@pytest.fixture
def tree_with_bad_images(tmp_path):
    """``tree/{a,b,c}/{0,1,2}.png`` (a/0: not an image, a/1: truncated) and ``other/z/0.png``."""
    root = tmp_path / "tree"
    for c in ("a", "b", "c"):
        for k in range(3):
            write_image(root / c / f"{k}.png", seed=k, size=32)
    (root / "a" / "0.png").write_bytes(b"this is not an image")
    full = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(full[: len(full) // 2])  # truncated
    write_image(tmp_path / "other" / "z" / "0.png")
    return root


def load_tree(root: Path, on_error: str = "skip"):
    return load_splits("folder", train_root=root, test_root=root.parent / "other",
                       val_fraction=0.0, on_error=on_error).train


def test_unreadable_images_skip(tree_with_bad_images):
    root = tree_with_bad_images
    dataset = load_tree(root)
    bad = [dataset.paths.index(str(root / "a" / f"{k}.png")) for k in (0, 1)]
    good = np.asarray(Image.open(root / "a" / "2.png").convert("RGB"))
    expected = torch.from_numpy(good.copy()).permute(2, 0, 1).float() / 255
    with pytest.warns(RuntimeWarning, match=r"cannot read image .*a/0\.png") as record:
        x0, y0 = dataset[bad[0]]
        x1, y1 = dataset[bad[1]]
        dataset[bad[0]]
    assert len([w for w in record if "cannot read" in str(w.message)]) == 1  # warned once
    assert y0 == y1 == dataset.labels[bad[0]]
    assert torch.equal(x0, expected) and torch.equal(x1, expected)
    assert dataset.bad_samples == 2 and len(dataset.bad_paths) == 2


def test_unreadable_images_fail_and_all_bad(tree_with_bad_images):
    root = tree_with_bad_images
    strict = load_tree(root, on_error="fail")
    with pytest.raises(DatasetError, match=r"cannot read image .*a/0\.png"):
        strict[strict.paths.index(str(root / "a" / "0.png"))]
    strict[strict.paths.index(str(root / "b" / "0.png"))]  # good images still load

    (root / "a" / "2.png").write_bytes(b"")
    lenient = load_tree(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="every image of class 'a'"):
            lenient[0]
    with pytest.raises(ConfigError, match="on_error"):
        load_splits("digits", on_error="ignore")


# ---- sampler -------------------------------------------------------------------------------
LABELS = np.repeat(np.arange(60), 5)  # 300 samples, 60 classes


def test_sampler_batch_composition():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=90, samples_per_class=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 300 // 90
    for batch in batches:
        assert len(batch) == 90
        classes, counts = np.unique(LABELS[batch], return_counts=True)
        assert len(classes) == 45 and (counts == 2).all()
        assert len(set(batch)) == 90  # classes with >= 2 samples never repeat an image
        pairs = LABELS[batch].reshape(45, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all()  # laid out class by class
    small = np.array([0, 1, 1, 2, 2, 2])
    batch = next(iter(ClassBalancedBatchSampler(small, 6, samples_per_class=2)))
    assert sorted(small[batch].tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(ClassBalancedBatchSampler(LABELS, 90, drop_last=False)) == 4
    with pytest.raises(ConfigError, match="distinct classes"):
        ClassBalancedBatchSampler(np.repeat(np.arange(10), 9), 90, 2)
    with pytest.raises(ConfigError, match="multiple"):
        ClassBalancedBatchSampler(LABELS, 91, 2)


def test_sampler_epochs_are_reproducible():
    a = ClassBalancedBatchSampler(LABELS, 90, 2, seed=7)
    b = ClassBalancedBatchSampler(LABELS, 90, 2, seed=7)
    assert list(a) == list(b) == list(a)
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0
    assert list(ClassBalancedBatchSampler(LABELS, 90, 2, seed=8)) != epoch0


def test_sampler_resume_mid_epoch():
    labels = np.repeat(np.arange(40), 12)
    sampler = ClassBalancedBatchSampler(labels, 40, 4, seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == 12
    it = iter(sampler)
    consumed = [next(it) for _ in range(5)]
    assert consumed == full[:5]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["batches_consumed"] == 5
    resumed = ClassBalancedBatchSampler(labels, 40, 4, seed=123)
    resumed.load_state_dict(state)
    assert list(resumed) == full[5:]
    assert list(resumed) == full  # the offset applies once
    resumed.set_epoch(3)
    assert list(resumed.from_batch(10)) == full[10:] and len(resumed.from_batch(10)) == 2
    explicit = ClassBalancedBatchSampler(labels, 40, 4, seed=1, start_batch=7)
    explicit.set_epoch(3)
    assert list(explicit) == full[7:]
    stale = ClassBalancedBatchSampler(labels, 40, 4, seed=1)
    stale.load_state_dict(state)
    stale.set_epoch(4)  # a different epoch: the saved offset no longer applies
    assert len(list(stale)) == 12
    assert sampler.state_dict(consumed_batches=2)["batches_consumed"] == 2


def test_sampler_ddp_shards():
    global_sampler = ClassBalancedBatchSampler(LABELS, 90, 2, seed=0)
    global_sampler.set_epoch(2)
    shards = []
    for rank in range(3):
        s = ClassBalancedBatchSampler(LABELS, 90, 2, seed=0, num_replicas=3, rank=rank)
        s.set_epoch(2)
        shards.append(list(s))
        assert len(s) == len(global_sampler)
    for b, batch in enumerate(global_sampler):
        parts = [shards[r][b] for r in range(3)]
        assert all(len(p) == 30 for p in parts)
        assert sum(parts, []) == batch
        class_sets = [set(LABELS[p].tolist()) for p in parts]
        assert not (class_sets[0] & class_sets[1] or class_sets[1] & class_sets[2]
                    or class_sets[0] & class_sets[2])  # class pairs stay on one rank
    with pytest.raises(ConfigError, match="per-rank"):
        ClassBalancedBatchSampler(LABELS, 90, 2, num_replicas=4)


def test_sampler_with_dataloader():
    splits = load_splits("digits", val_fraction=0.0)
    sampler = ClassBalancedBatchSampler(splits.train.labels, 40, 8)
    loader = torch.utils.data.DataLoader(splits.train, batch_sampler=sampler)
    x, y = next(iter(loader))
    assert x.shape == (40, 1, 8, 8) and torch.bincount(y).tolist() == [8] * 5


# ---- transforms ----------------------------------------------------------------------------
def test_transforms_shapes():
    rgb = Image.new("RGB", (300, 200), (255, 0, 0))
    for train in (True, False):
        x = build_transforms("rgb", train)(rgb)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert build_transforms("rgb", train, image_size=64)(rgb).shape == (3, 64, 64)
    red = build_transforms("rgb", False)(rgb)
    assert torch.allclose(red[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224,
                                                      -0.406 / 0.225]), atol=1e-4)
    omni = torch.zeros(1, 105, 105, dtype=torch.uint8)
    digit = torch.rand(1, 8, 8)
    for train in (True, False):
        gray = build_transforms("gray_small", train)
        assert gray(omni).shape == (1, 28, 28)
        assert gray(digit).shape == (1, 8, 8)
        assert gray(Image.new("L", (105, 105))).shape == (1, 28, 28)
        assert build_transforms("gray_small", train, image_size=32)(omni).shape == (1, 32, 32)
    x = build_transforms("gray_small", False)(omni)
    assert torch.allclose(x, torch.full_like(x, -1.0))  # background 0 -> -1 after normalising
    with pytest.raises(ConfigError, match="image_kind"):
        build_transforms("hsv", True)


@pytest.mark.parametrize("size", [(28, 28), (8, 8), (21, 34)])
def test_gray_affine_and_normalize_equal_torchvision(size):
    """Our gray-image steps give torchvision's outputs bit for bit from the same seed (so the
    same random numbers are drawn): v2.RandomAffine(8, (0.1, 0.1), (0.9, 1.1), fill=0) and
    v2.Normalize, on odd and even sizes, and the whole gray train transform equals the
    torchvision-only pipeline."""
    from torchvision.transforms import v2

    from nirdml.data.transforms import GRAY_MEAN, GRAY_STD, Normalize, RandomAffineNearest

    reference = v2.RandomAffine(degrees=8, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=0)
    ours = RandomAffineNearest(degrees=8, translate=(0.1, 0.1), scale=(0.9, 1.1))
    moved = 0
    for seed in range(300):
        image = torch.rand(1, *size, generator=torch.Generator().manual_seed(10_000 + seed))
        torch.manual_seed(seed)
        want = reference(image)
        torch.manual_seed(seed)
        got = ours(image)
        assert torch.equal(got, want), seed
        moved += int(not torch.equal(got, image))
    assert moved > 200  # the draws really move the images (some 8 x 8 ones round to none)
    image = torch.rand(1, *size) * 3
    assert torch.equal(Normalize(GRAY_MEAN, GRAY_STD)(image),
                       v2.Normalize(GRAY_MEAN, GRAY_STD)(image))

    pipeline = build_transforms("gray_small", True, image_size=28)
    torchvision_only = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                   v2.Resize((28, 28), antialias=True), reference,
                                   v2.Normalize(GRAY_MEAN, GRAY_STD)])
    drawing = torch.randint(0, 256, (1, *size), dtype=torch.uint8)
    torch.manual_seed(7)
    want = torchvision_only(drawing)
    torch.manual_seed(7)
    assert torch.equal(pipeline(drawing), want)


def test_dataset_transform_is_settable():
    splits = load_splits("digits", val_fraction=0.0)
    splits.test.transform = build_transforms("gray_small", False, image_size=16)
    assert splits.test[0][0].shape == (1, 16, 16)
    splits.test.transform = None
    assert splits.test[0][0].shape == (1, 8, 8)


# ---- download ------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                              daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_file_checksums(http_root, tmp_path, capsys):
    served, url = http_root
    payload = b"omniglot" * 1000
    (served / "data.bin").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "out" / "data.bin"
    assert download_file(f"{url}/data.bin", dest, sha256=good) == dest
    assert dest.read_bytes() == payload and not list(dest.parent.glob("*.part"))

    other = tmp_path / "out" / "other.bin"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        download_file(f"{url}/data.bin", other, sha256="0" * 64)
    assert not other.exists() and not list(other.parent.glob("*.part"))

    download_file(f"{url}/data.bin", other)  # no checksum: size > 0, sha256 printed
    assert good in capsys.readouterr().err
    assert download_file(dest.as_uri(), tmp_path / "copy.bin", sha256=good).read_bytes() == payload
    with pytest.raises(DatasetError, match="cannot download"):
        download_file(f"{url}/missing.bin", tmp_path / "missing.bin")
    (served / "empty.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        download_file(f"{url}/empty.bin", tmp_path / "empty.bin")


def test_omniglot_download(http_root, tmp_path, capsys):
    served, url = http_root
    make_omniglot_part(tmp_path / "src", "images_background", OMNI_TRAIN)
    make_omniglot_part(tmp_path / "src", "images_evaluation", OMNI_TEST)
    for part in ("images_background", "images_evaluation"):
        zip_folder(tmp_path / "src" / part, served / f"{part}.zip")
    root = tmp_path / "cache" / "omniglot"
    splits = load_splits("omniglot", root=root, download=True, base_url=url, val_fraction=0.0)
    check_splits(splits, 5, 2)
    assert (root / "images_background.zip").is_file() and (root / "images_evaluation").is_dir()
    assert "sha256" in capsys.readouterr().err
