"""Safety of nirdml's data readers: never destructive, no wrong labels, no silent success.

- one class-folder rule for every reader of ``ROOT/<class>/**/<image>`` trees (galleries, the
  ``folder`` dataset, the CUB and Cars class-folder layouts);
- one pixel limit: decompression bombs are refused from their header, never decoded;
- index folders: ``nirdml index build --out`` writes only into folders nirdml owns, and an
  index finds its files from any working directory;
- seeded fuzzing of the index folder, CSV and image file readers: a nirdml error or a correct
  result, never another exception, a hang or a crash.
"""

from __future__ import annotations

import io
import json
import random
import resource
import shutil
import signal
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nirdml.cli import main
from nirdml.data import load_splits
from nirdml.data.image_files import scan_class_folders
from nirdml.data.images import load_image
from nirdml.data.scan import check_image, scan_splits
from nirdml.errors import ConfigError, DatasetError, InputError, NirdmlError
from nirdml.retrieval import GalleryIndex, Retriever


# ---- helpers -------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIRDML_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models and images: one intra-op thread (see conftest)."""


@pytest.fixture
def deadline():
    """Fail (instead of hanging) when a test runs past 120 s."""

    def expired(signum, frame):
        raise TimeoutError("the test ran past its 120 s deadline (a reader hangs?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def write_png(path: Path, seed: int = 0, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_huge_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grey PNG of ``width`` x ``height`` pixels, all black: a few dozen KB on
    disk, ``width * height`` bytes (and more) once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed 1-bit pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(path: Path) -> Path:
    """An untrained 16-d small_cnn RGB checkpoint (32 x 32 inputs) that TrainedRun accepts."""
    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=16, in_chans=3)
    cfg = Config.from_dict({
        "data": {"name": "digits", "image_size": 32, "eval_batch_size": 8, "val_fraction": 0.0},
        "model": {"name": "small_cnn", "embedding_dim": 16, "pretrained": False},
    })
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 3,
                     "image_kind": "rgb", "epoch": 1, "num_classes": 5}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("safety") / "model.pt")


def nested_tree(root: Path) -> dict[str, list[str]]:
    """Two classes whose sub-folders share names, plus hidden files and folders; returns the
    expected ``class -> sorted image paths``."""
    expected = {"cat": ["2019/a.png", "2020/b.png", "c.png"], "dog": ["2019/a.png", "2020/d.png"]}
    seed = 0
    for name, rels in expected.items():
        for rel in rels:
            write_png(root / name / rel, seed=seed)
            seed += 1
    for hidden in ("cat/.e.png", "cat/.thumbs/f.png", ".trash/g.png", "dog/2020/.h.png",
                   ".hidden_class/2019/i.png"):
        write_png(root / hidden, seed=99)
    (root / "notes.txt").write_text("not an image, ignored")
    (root / "dog" / "readme.txt").write_text("not an image, ignored")
    return {name: [str(root / name / rel) for rel in rels] for name, rels in expected.items()}


# ---- 1. one class-folder rule --------------------------------------------------------------
def test_class_is_the_first_folder_level_in_gallery_and_datasets(tmp_path):
    expected = nested_tree(tmp_path / "G")
    paths = expected["cat"] + expected["dog"]
    labels = [0, 0, 0, 1, 1]
    assert scan_class_folders(tmp_path / "G") == (paths, ["cat", "dog"], labels)
    gallery = scan_class_folders(tmp_path / "G", what="gallery", error=InputError)  # a gallery
    assert gallery == (paths, ["cat", "dog"], labels)

    # the folder dataset: a seeded class split and train_root/test_root read it the same way
    splits = load_splits("folder", root=tmp_path / "G", val_fraction=0.0)
    seen = {}
    for ds in (splits.train, splits.test):
        for path, label in zip(ds.paths, ds.labels):
            seen[path] = ds.class_names[label]
    assert seen == {p: name for name, ps in expected.items() for p in ps}
    write_png(tmp_path / "H" / "bird" / "2019" / "a.png")
    splits = load_splits("folder", train_root=tmp_path / "G", test_root=tmp_path / "H",
                         val_fraction=0.0)
    assert splits.train.class_names == ["cat", "dog"] and splits.train.paths == paths
    assert splits.test.class_names == ["bird"]

    # the CUB and Cars class-folder layouts
    for rel in ("images/001.cat", "images/002.dog"):
        shutil.copytree(tmp_path / "G" / rel.split(".")[-1], tmp_path / "cub" / rel)
    cub = load_splits("cub200", root=tmp_path / "cub", val_fraction=0.0, num_train_classes=1)
    assert cub.train.class_names == ["001.cat"] and len(cub.train) == 3
    assert cub.test.class_names == ["002.dog"] and len(cub.test) == 2
    cars = load_splits("cars196", root=tmp_path / "G", val_fraction=0.0, num_train_classes=1)
    assert cars.train.class_names == ["cat"] and cars.train.paths == expected["cat"]
    assert cars.test.class_names == ["dog"] and cars.test.paths == expected["dog"]


def test_gallery_index_labels_by_the_first_level(tmp_path, checkpoint):
    expected = nested_tree(tmp_path / "G")
    r = Retriever.from_checkpoint(checkpoint, tmp_path / "G", device="cpu")
    assert r.class_names == ["cat", "dog"]
    assert r.paths == [str(Path(p).absolute()) for p in expected["cat"] + expected["dog"]]
    assert r.labels.tolist() == [0, 0, 0, 1, 1]


def test_images_directly_in_the_root_are_refused(tmp_path):
    write_png(tmp_path / "G" / "cat" / "a.png")
    write_png(tmp_path / "G" / "dog" / "b.png")
    write_png(tmp_path / "G" / "loose.png")
    with pytest.raises(InputError, match="outside any class folder") as info:
        scan_class_folders(tmp_path / "G", what="gallery", error=InputError)
    assert "\n" not in str(info.value) and "loose.png" in str(info.value)
    with pytest.raises(DatasetError, match="outside any class folder"):
        load_splits("folder", root=tmp_path / "G")
    with pytest.raises(InputError, match="does not exist or is not a folder"):
        scan_class_folders(tmp_path / "nothing", what="gallery", error=InputError)
    (tmp_path / "E" / "empty_class").mkdir(parents=True)
    with pytest.raises(InputError, match="no image files"):
        scan_class_folders(tmp_path / "E", what="gallery", error=InputError)


# ---- 2. the pixel limit --------------------------------------------------------------------
def test_decompression_bomb_is_refused_from_its_header(tmp_path, deadline):
    bomb = write_huge_png(tmp_path / "bomb.png", 20_000, 20_000)  # 400 M pixels
    assert bomb.stat().st_size < 200_000
    before, start = peak_rss_mb(), time.perf_counter()
    with pytest.raises(InputError, match="too large") as info:
        load_image(bomb)
    assert "\n" not in str(info.value) and "bomb.png" in str(info.value)
    reason = check_image(str(bomb))
    assert reason is not None and reason.startswith("too large") and "\n" not in reason
    assert time.perf_counter() - start < 5
    assert peak_rss_mb() - before < 200  # decoding would take 400 MB and more


def test_pixel_limit_holds_when_pil_limit_was_lifted(tmp_path, monkeypatch, deadline):
    """Between PIL's warning and error thresholds (and with PIL's limit switched off by some
    other code) the image is refused all the same."""
    import PIL.Image

    from nirdml.data.image_files import MAX_IMAGE_PIXELS

    big = write_huge_png(tmp_path / "big.png", 10_000, 10_000)  # 100 M: PIL only warns
    assert MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * MAX_IMAGE_PIXELS
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray DecompressionBombWarning either
        assert check_image(str(big)).startswith("too large")
        with pytest.raises(InputError, match="too large"):
            load_image(big, in_chans=1)


def test_pixel_limit_is_one_constant_for_queries_galleries_and_datasets(
        tmp_path, monkeypatch, checkpoint):
    import PIL.Image

    import nirdml.data.image_files as image_files

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", PIL.Image.MAX_IMAGE_PIXELS)  # restored
    for c in range(4):
        for k in range(2):
            write_png(tmp_path / "G" / f"c{c}" / f"{k}.png", seed=10 * c + k, size=8)
    big = write_png(tmp_path / "G" / "c0" / "big.png", size=40)  # 1600 pixels
    monkeypatch.setattr(image_files, "MAX_IMAGE_PIXELS", 1000)
    # a query
    with pytest.raises(InputError, match="too large"):
        load_image(big)
    # a gallery: skipped and recorded, or fatal with on_error="fail"
    r = Retriever.from_checkpoint(checkpoint, tmp_path / "G", device="cpu")
    assert len(r) == 8 and r.source["skipped"] == [str(big.absolute())]
    with pytest.raises(InputError, match="too large"):
        Retriever.from_checkpoint(checkpoint, tmp_path / "G", device="cpu", on_error="fail")
    with pytest.raises(InputError, match="too large"):
        r.search(big, k=1)
    # a dataset: the up-front scan drops it (skip) or names it (fail)
    with pytest.warns(RuntimeWarning, match="occur in both"):
        splits = load_splits("folder", train_root=tmp_path / "G", test_root=tmp_path / "G",
                             val_fraction=0.0)
    kept, dropped = scan_splits(splits, "skip", cache=False)
    assert dropped == {"train": 1, "test": 1} and str(big) not in kept.train.paths
    with pytest.raises(DatasetError, match="big.png: too large"):
        scan_splits(splits, "fail", cache=False)
    # and a dataset file read later (after the scan) is refused as well
    from nirdml.data.base import FileDataset

    ds = FileDataset([str(big)], ["c0"], on_error="fail", name="t")
    with warnings.catch_warnings(), pytest.raises(DatasetError, match="too large"):
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # PIL's own
        ds[0]


# ---- 3. index folders ----------------------------------------------------------------------
def _cli_build(checkpoint, gallery, out) -> int:
    return main(["index", "build", "--checkpoint", str(checkpoint), "--gallery", str(gallery),
                 "--out", str(out), "--device", "cpu"])


def test_index_build_never_writes_into_a_folder_it_did_not_create(tmp_path, checkpoint, capsys):
    nested_tree(tmp_path / "G")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _cli_build(checkpoint, tmp_path / "G", foreign) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "not empty" in err and len(err.splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    assert _cli_build(checkpoint, tmp_path / "G", a_file) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me too"
    r = Retriever.from_checkpoint(checkpoint, tmp_path / "G", device="cpu")
    with pytest.raises(ConfigError, match="not empty"):
        r.save(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # a new or empty folder becomes an index (with nirdml's marker); ours is replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "idx", empty, empty):
        assert _cli_build(checkpoint, tmp_path / "G", out) == 0
        assert {p.name for p in out.iterdir()} == {"index.faiss", "labels.npy", "meta.json",
                                                   ".nirdml"}
        assert json.loads((out / ".nirdml").read_text())["kind"] == "index"
    # an index of an older nirdml (no marker, its own meta.json) is recognised and replaced
    legacy = tmp_path / "legacy"
    shutil.copytree(empty, legacy)
    (legacy / ".nirdml").unlink()
    assert _cli_build(checkpoint, tmp_path / "G", legacy) == 0
    assert (legacy / ".nirdml").is_file()
    # but a folder with someone else's meta.json is not an index
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"title": "my photos"}')
    assert _cli_build(checkpoint, tmp_path / "G", other) == 2
    assert [p.name for p in other.iterdir()] == ["meta.json"]


def test_index_finds_its_files_from_another_working_directory(tmp_path, checkpoint,
                                                              monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    nested_tree(work / "gal")
    monkeypatch.chdir(work)
    assert _cli_build(checkpoint, "gal", "idx") == 0  # relative gallery and index paths
    monkeypatch.chdir(elsewhere)
    r = Retriever.load(work / "idx", device="cpu")
    assert len(r.paths) == 5 and all(Path(p).is_file() for p in r.paths)
    res = r.search(r.paths[3], k=2)
    assert res.ids[0, 0] == 3 and Path(res.paths[0][0]).is_file()
    with Image.open(res.paths[0][0]) as image:  # e.g. a thumbnail of the hit
        image.thumbnail((4, 4))
    capsys.readouterr()
    assert main(["search", "--index", str(work / "idx"), "--query", r.paths[1], "-k", "1",
                 "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"][0]["results"][0]["path"] == r.paths[1]
    # an index written by an older nirdml (paths relative to its cwd, no checksums) still opens
    meta_file = work / "idx" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["paths"] = [str(Path(p).relative_to(work)) for p in meta["paths"]]
    meta.pop("checksums", None)
    meta_file.write_text(json.dumps(meta))
    monkeypatch.chdir(work)
    old = GalleryIndex.load(work / "idx")
    assert old.paths == meta["paths"] and all(Path(p).is_file() for p in old.paths)


# ---- 4. fuzzing ----------------------------------------------------------------------------
def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random corruption of ``data``: its name and the corrupted bytes."""
    kind = rng.choice(["truncate", "flip", "flip", "garbage", "empty", "oversized", "splice"])
    if kind == "truncate":
        return kind, data[:rng.randrange(max(1, len(data)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            if out:
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "garbage":
        return kind, rng.randbytes(rng.randint(1, 400))
    if kind == "empty":
        return kind, b""
    if kind == "oversized":
        return kind, data + rng.randbytes(rng.randint(1, 3)) * rng.randint(1, 200_000)
    i = rng.randrange(max(1, len(data)))
    return kind, data[:i] + rng.randbytes(rng.randint(1, 16)) + data[i:]


_JSON_VALUES = [None, True, 0, -1, 3.5, 10**30, "", "x", [], [1, "a"], {}, {"a": [None]},
                [[[]]], "../../etc/passwd"]


def _wrong_json(meta: dict, rng: random.Random) -> bytes:
    """``meta`` with one field (or the whole document) of a wrong type."""
    if rng.random() < 0.1:
        return json.dumps(rng.choice(_JSON_VALUES)).encode()
    meta = json.loads(json.dumps(meta))
    key = rng.choice(sorted(meta))
    if isinstance(meta[key], dict) and meta[key] and rng.random() < 0.5:
        inner = rng.choice(sorted(meta[key]))
        meta[key][inner] = rng.choice(_JSON_VALUES)
    elif isinstance(meta[key], list) and meta[key] and rng.random() < 0.5:
        meta[key][rng.randrange(len(meta[key]))] = rng.choice(_JSON_VALUES)
    elif rng.random() < 0.15:
        del meta[key]
    else:
        meta[key] = rng.choice(_JSON_VALUES)
    return json.dumps(meta).encode()


def _check_loaded_index(index: GalleryIndex, queries: np.ndarray) -> None:
    """A loaded index must answer searches with real ids and valid labels."""
    res = index.search(queries, k=min(3, len(index)))
    assert ((res.ids >= 0) & (res.ids < len(index))).all()
    for q in range(len(res)):
        for hit in res.hits(q):
            assert hit["label"] == int(index.labels[hit["id"]])
    res.to_json()


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_fuzz_index_folder_reader(tmp_path, legacy, deadline):
    rng_np = np.random.default_rng(0)
    emb = rng_np.normal(size=(40, 8)).astype(np.float32)
    labels = np.arange(40) % 4
    built = GalleryIndex.build(emb, labels, [f"/gallery/{i}.png" for i in range(40)],
                               class_names=["a", "b", "c", "d"], source={"kind": "folder"})
    base = built.save(tmp_path / "base")
    originals = {name: (base / name).read_bytes()
                 for name in ("meta.json", "labels.npy", "index.faiss")}
    meta = json.loads(originals["meta.json"])
    if legacy:  # as an older nirdml wrote it
        meta.pop("checksums", None)
        originals["meta.json"] = json.dumps(meta, indent=1).encode()
    case_dir = tmp_path / "case"
    rng = random.Random(1 if legacy else 0)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(240):
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        target = rng.choice(sorted(originals))
        for name, data in originals.items():
            (case_dir / name).write_bytes(data)
        if target == "meta.json" and rng.random() < 0.4:
            kind, data = "wrong-type", _wrong_json(meta, rng)
        else:
            kind, data = _mutate(originals[target], rng)
        (case_dir / target).write_bytes(data)
        try:
            index = GalleryIndex.load(case_dir)
            _check_loaded_index(index, emb[:2])
            Retriever.load(case_dir, load_model=False)
            outcomes["loaded"] += 1
        except NirdmlError as exc:
            assert "\n" not in str(exc), (case, target, kind, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {kind} {target} raised {type(exc).__name__}: {exc}")
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 0


def _csv_table(rng: random.Random) -> bytes:
    lines = ["label,path,split,is_query,is_gallery"]
    for i in range(12):
        split = ("train", "train", "test", "validation")[i % 4]
        lines.append(f"c{i % 5},imgs/{i}.png,{split},{i % 2},{'yes' if i % 3 else 'no'}")
    if rng.random() < 0.3:  # wrong or shuffled columns
        columns = lines[0].split(",")
        rng.shuffle(columns)
        if rng.random() < 0.5:
            columns[rng.randrange(len(columns))] = rng.choice(["lable", "", "path", "x y"])
        lines[0] = ",".join(columns)
    if rng.random() < 0.2:  # rows with too few or too many fields
        j = rng.randrange(1, len(lines))
        lines[j] = rng.choice([lines[j] + ",extra,fields", lines[j].rsplit(",", 2)[0], ""])
    return ("\n".join(lines) + "\n").encode()


def test_fuzz_csv_reader(tmp_path, deadline):
    rng = random.Random(0)
    table = tmp_path / "data.csv"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(400):
        data = _csv_table(rng)
        kind = "plain"
        if rng.random() < 0.8:
            kind, data = _mutate(data, rng)
        if rng.random() < 0.05:
            kind, data = "huge field", data + b'c1,"' + b"p" * 300_000 + b'",train\n'
        table.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # labels in train and test
                splits = load_splits("csv", root=table, val_fraction=0.0)
            for ds in (splits.train, splits.val, splits.test):
                if ds is not None:
                    assert len(ds.paths) == len(ds.labels) > 0
                    assert all(Path(p).is_absolute() for p in ds.paths)
            outcomes["loaded"] += 1
        except NirdmlError as exc:
            assert "\n" not in str(exc), (case, kind, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({kind}): {type(exc).__name__}: {exc}\n{data[:200]!r}")
    assert outcomes["refused"] > 50 and outcomes["loaded"] > 20


def _encoded(fmt: str, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (9 + seed % 7, 11, 3) if mode == "RGB" else (9 + seed % 7, 11)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, fmt)
    return buffer.getvalue()


def test_fuzz_image_file_reader(tmp_path, deadline):
    rng = random.Random(0)
    sources = {"png": [_encoded("PNG", s) for s in range(3)] + [_encoded("PNG", 3, "L")],
               "jpg": [_encoded("JPEG", s) for s in range(3)] + [_encoded("JPEG", 3, "L")]}
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(400):
        ext = rng.choice(sorted(sources))
        kind, data = _mutate(rng.choice(sources[ext]), rng)
        path = tmp_path / f"case.{ext}"
        path.write_bytes(data)
        reason = "not run"
        try:
            reason = check_image(str(path))
            assert reason is None or (isinstance(reason, str) and "\n" not in reason)
            for in_chans in (1, 3):
                image = load_image(path, in_chans)
                assert image.mode == ("L" if in_chans == 1 else "RGB")
                assert image.size[0] > 0 and image.size[1] > 0
            outcomes["decoded"] += 1
        except NirdmlError as exc:
            assert isinstance(exc, InputError) and "\n" not in str(exc), (case, kind, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {kind} {ext} (check_image: {reason!r}) raised "
                        f"{type(exc).__name__}: {exc}")
    assert outcomes["refused"] > 50 and outcomes["decoded"] > 20
