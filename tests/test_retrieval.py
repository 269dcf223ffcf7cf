"""Retriever, faiss indexes, index directories and the index/search commands."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import save_untrained_digits_checkpoint
from nirdml.cli import main
from nirdml.errors import CheckpointError, ConfigError, InputError
from nirdml.models.fingerprint import model_fingerprint
from nirdml.retrieval import (
    GalleryIndex,
    IndexSpec,
    Retriever,
    build_index,
    read_embeddings_npz,
    search_index,
)
from nirdml.retrieval.faiss_index import resolve_spec

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_checkpoint(path, seed=0, image_size=32, embedding_dim=16):
    """A small_cnn checkpoint that ``TrainedRun`` accepts (no training)."""
    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    torch.manual_seed(seed)
    model = build_model("small_cnn", embedding_dim=embedding_dim, in_chans=3)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cfg = Config.from_dict({
        "data": {"name": "digits", "image_size": image_size, "eval_batch_size": 8,
                 "val_fraction": 0.0},
        "model": {"name": "small_cnn", "embedding_dim": embedding_dim, "pretrained": False},
    })
    state = {"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 3,
             "image_kind": "rgb", "epoch": 1, "num_classes": 5}
    save_checkpoint(state, path)
    return path


def write_image_folder(root, per_class=4, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(color) + rng.normal(0, 20, (size, size, 3)), 0, 255)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{name}_{i}.{ext}")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("retrieval")
    ckpt = make_checkpoint(base / "model.pt")
    other = make_checkpoint(base / "other.pt", seed=1)
    gallery = write_image_folder(base / "gallery")
    index_dir = base / "index"
    Retriever.from_checkpoint(ckpt, gallery, device="cpu").save(index_dir)
    return {"base": base, "ckpt": ckpt, "other": other, "gallery": gallery, "index": index_dir}


def test_fingerprint_tracks_weights_and_dim():
    from nirdml.models import build_model

    torch.manual_seed(0)
    a = build_model("small_cnn", embedding_dim=16, in_chans=3)
    b = build_model("small_cnn", embedding_dim=16, in_chans=3)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    from nirdml.models.fingerprint import state_dict_fingerprint

    assert state_dict_fingerprint(a.state_dict(), 16) != state_dict_fingerprint(a.state_dict(), 8)


def test_folder_gallery_search_finds_itself(files):
    r = Retriever.load(files["index"], device="cpu")
    assert len(r) == 12 and r.dim == 16
    assert r.class_names == ["blue", "green", "red"]
    paths = sorted(str(p) for p in files["gallery"].rglob("*.*"))
    assert r.paths == paths
    res = r.search(paths[:3], k=4)
    assert res.ids.shape == (3, 4) and res.scores.shape == (3, 4)
    assert res.ids[:, 0].tolist() == [0, 1, 2]  # each query's best match is itself
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-4)
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()
    assert res.labels[:, 0].tolist() == [0, 0, 0]
    assert res.paths[0][0] == paths[0]
    doc = json.loads(res.to_json())
    assert doc["k"] == 4 and doc["queries"][0]["query"] == paths[0]
    assert doc["queries"][0]["results"][0]["class"] == "blue"


def test_search_by_image_tensor_and_embeddings_agree(files):
    from PIL import Image

    r = Retriever.load(files["index"], device="cpu")
    path = r.paths[5]
    x = r.transform()(Image.open(path).convert("RGB"))
    by_path = r.search(path, k=3)
    by_tensor = r.search(x, k=3)
    by_emb = r.search(r.embed_tensors(x), k=3)
    for res in (by_tensor, by_emb):
        np.testing.assert_array_equal(res.ids, by_path.ids)
        np.testing.assert_allclose(res.scores, by_path.scores, atol=1e-5)


def test_flat_index_matches_brute_force():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    r = Retriever(GalleryIndex(build_index(gallery, IndexSpec("flat"))[0], np.arange(300) % 7))
    queries = rng.normal(size=(10, 16)).astype(np.float32)
    res = r.search(queries, k=5)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.argsort(-(q @ gallery.T), axis=1)[:, :5]
    np.testing.assert_array_equal(res.ids, expected)
    np.testing.assert_array_equal(res.labels, expected % 7)
    assert res.paths[0] == [None] * 5


def test_ivf_types_answer_k_real_neighbours(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    cluster = rng.integers(0, 20, 2000)
    x = (centres[cluster] + 0.1 * rng.normal(size=(2000, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact, _ = build_index(x, IndexSpec("flat"))
    _, truth = search_index(exact, x[:50], 1)
    for spec in (IndexSpec("ivf", nlist=20, nprobe=1), IndexSpec("ivfpq", nlist=20, nprobe=4,
                                                                  m=4)):
        index, resolved = build_index(x, spec)
        assert resolved.nlist == 20
        # k larger than one cell holds: the search widens nprobe instead of returning -1
        scores, ids = search_index(index, x[:50], 300)
        assert ids.shape == (50, 300) and (ids >= 0).all()
        assert all(len(set(row)) == 300 for row in ids.tolist())
        assert faiss_nprobe(index) == spec.nprobe  # restored
        _, top1 = search_index(index, x[:50], 1)
        if spec.type == "ivf":  # exact within the visited cells
            assert (top1[:, 0] == truth[:, 0]).mean() >= 0.9
        else:  # compressed codes: the right cluster, not necessarily the very same vector
            assert (cluster[top1[:, 0]] == cluster[:50]).mean() >= 0.9
    # saved and reopened with its parameters
    np.savez(tmp_path / "g.npz", embeddings=x, labels=np.arange(2000) % 20)
    g = read_embeddings_npz(tmp_path / "g.npz", 16)
    r = Retriever(GalleryIndex.build(g.embeddings, g.labels, spec=IndexSpec("ivfpq", nlist=16,
                                                                            m=8)))
    r.save(tmp_path / "idx")
    back = Retriever.load(tmp_path / "idx", load_model=False)
    assert back.spec.type == "ivfpq" and back.spec.m == 8 and back.spec.nlist == 16
    assert len(back) == 2000


def faiss_nprobe(index):
    import faiss

    return faiss.extract_index_ivf(index).nprobe


def test_index_spec_validation():
    assert resolve_spec(IndexSpec("IVF-PQ"), 10_000, 128).m == 32
    with pytest.raises(ConfigError, match="m=5 must divide"):
        resolve_spec(IndexSpec("ivfpq", m=5), 1000, 16)
    with pytest.raises(ConfigError, match="nlist"):
        resolve_spec(IndexSpec("ivf", nlist=50), 10, 16)
    with pytest.raises(ConfigError, match="unknown index type"):
        resolve_spec(IndexSpec("hnsw"), 10, 16)
    with pytest.raises(ConfigError, match="at least 256"):
        resolve_spec(IndexSpec("ivfpq", nlist=1, m=4, nbits=8), 100, 16)


def test_npz_gallery_and_split_spec(files, tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(20, 16)).astype(np.float32)
    np.savez(tmp_path / "e.npz", embeddings=emb, labels=np.arange(20) % 4,
             paths=np.array([f"img{i}.jpg" for i in range(20)]))
    r = Retriever.from_checkpoint(files["ckpt"], tmp_path / "e.npz", device="cpu")
    res = r.search(emb[:2], k=2)
    assert res.ids[:, 0].tolist() == [0, 1] and res.paths[1][0] == "img1.jpg"
    np.savez(tmp_path / "bad.npz", embeddings=emb[:, :8], labels=np.arange(20))
    with pytest.raises(InputError, match="8-d embeddings"):
        Retriever.from_checkpoint(files["ckpt"], tmp_path / "bad.npz", device="cpu")
    np.savez(tmp_path / "nolabels.npz", embeddings=emb)
    with pytest.raises(InputError, match="no 'labels'"):
        read_embeddings_npz(tmp_path / "nolabels.npz")
    with pytest.raises(ConfigError, match="split must be"):
        Retriever.from_checkpoint(files["ckpt"], "split:holdout", device="cpu")
    with pytest.raises(ConfigError, match="neither"):
        Retriever.from_checkpoint(files["ckpt"], tmp_path / "nothing_here", device="cpu")


def test_undecodable_images(files, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    r = Retriever.load(files["index"], device="cpu")
    with pytest.raises(InputError, match="cannot decode image"):
        r.search([r.paths[0], bad], k=2)
    with pytest.raises(InputError, match="does not exist"):
        r.search(tmp_path / "missing.png", k=2)
    # in a gallery folder: skipped and recorded, or fatal with on_error="fail"
    gallery = tmp_path / "g"
    shutil.copytree(files["gallery"], gallery)
    shutil.copy(bad, gallery / "red" / "broken.jpg")
    built = Retriever.from_checkpoint(files["ckpt"], gallery, device="cpu")
    assert len(built) == 12 and built.source["skipped"] == [str(gallery / "red" / "broken.jpg")]
    with pytest.raises(InputError, match="cannot decode image"):
        Retriever.from_checkpoint(files["ckpt"], gallery, device="cpu", on_error="fail")


def test_fingerprint_mismatch_is_refused(files, tmp_path):
    with pytest.raises(CheckpointError, match="not the model this index was built with"):
        Retriever.load(files["index"], checkpoint=files["other"], device="cpu")
    # the same weights under another name are accepted
    copy = tmp_path / "moved.pt"
    shutil.copy(files["ckpt"], copy)
    assert Retriever.load(files["index"], checkpoint=copy, device="cpu").search(
        Retriever.load(files["index"], load_model=False).paths[0], k=1).ids[0, 0] == 0


def test_bad_k_and_bad_index_dirs(files, tmp_path):
    r = Retriever.load(files["index"], device="cpu")
    with pytest.raises(InputError, match="larger than the gallery"):
        r.search(r.paths[0], k=13)
    with pytest.raises(InputError, match="positive integer"):
        r.search(r.paths[0], k=0)
    with pytest.raises(InputError, match="shape"):
        r.search(np.zeros((2, 8), np.float32), k=1)
    with pytest.raises(InputError, match="all zeros"):
        r.search(np.zeros((1, 16), np.float32), k=1)
    with pytest.raises(ConfigError, match="does not exist"):
        Retriever.load(tmp_path / "no_such_index")
    partial = tmp_path / "partial"
    shutil.copytree(files["index"], partial)
    (partial / "meta.json").unlink()
    with pytest.raises(ConfigError, match="missing meta.json"):
        Retriever.load(partial)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(files["index"], corrupt)
    (corrupt / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="does not match the checksum"):
        Retriever.load(corrupt, load_model=False)
    meta = json.loads((corrupt / "meta.json").read_text())  # as an older nirdml wrote it
    del meta["checksums"]
    (corrupt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not the flat faiss index of 12 x 16"):
        Retriever.load(corrupt, load_model=False)


def test_index_and_search_commands(files, tmp_path, capsys):
    out = tmp_path / "cli_index"
    assert main(["index", "build", "--checkpoint", str(files["ckpt"]), "--gallery",
                 str(files["gallery"]), "--out", str(out), "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} == {"index.faiss", "meta.json", "labels.npy",
                                               ".nirdml"}  # the marker: an index folder
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checkpoint"] == str(files["ckpt"].resolve()) and meta["dim"] == 16
    assert len(meta["fingerprint"]) == 64 and meta["config"]["model"]["name"] == "small_cnn"
    capsys.readouterr()
    query = meta["paths"][4]
    assert main(["search", "--index", str(out), "--query", query, "-k", "3", "--json",
                 "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["queries"][0]["results"][0]["path"] == query
    assert main(["search", "--index", str(out), "--query", query, "-k", "2"]) == 0
    text = capsys.readouterr().out
    assert query in text
    assert text.splitlines()[1].split() == ["rank", "cosine", "class", "gallery", "item"]
    # errors are one line, exit code 2
    assert main(["search", "--index", str(out), "--query", query, "-k", "99"]) == 2
    assert "larger than the gallery" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "nope"), "--query", query]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "--index", str(out), "--query", query, "--checkpoint",
                 str(files["other"])]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert main(["index", "info", "--index", str(out)]) == 0
    assert "12 items x 16 dims" in capsys.readouterr().out
    # a calibrated match decision, and a re-ranked search
    cal = tmp_path / "cal_index"
    build = ["index", "build", "--checkpoint", str(files["ckpt"]), "--gallery",
             str(files["gallery"]), "--out", str(cal), "--device", "cpu"]
    assert main([*build, "--match-fmr", "2"]) == 2
    assert "in (0, 1)" in capsys.readouterr().err and not cal.exists()
    assert main([*build, "--match-fmr", "0.2", "--match-on", str(files["gallery"])]) == 0
    assert "match decision: cosine >" in capsys.readouterr().out
    assert main(["search", "--index", str(cal), "--query", query, "-k", "3", "--json",
                 "--rerank", "dba:n=2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    threshold = json.loads((cal / "meta.json").read_text())["match"]["threshold"]
    assert doc["match_threshold"] == threshold and doc["rerank"] == "dba:n=2,alpha=3.0"
    assert [h["same_item"] for h in doc["queries"][0]["results"]] == \
        [h["score"] > threshold for h in doc["queries"][0]["results"]]
    assert main(["search", "--index", str(cal), "--query", query, "--rerank",
                 "k_reciprocal:k1=4,k2=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rerank"] == \
        "k_reciprocal:k1=4,k2=2,lambda_=0.3,shortlist=100"


def test_split_gallery(tmp_path):
    splits = save_untrained_digits_checkpoint(tmp_path / "d.pt")
    r = Retriever.from_checkpoint(tmp_path / "d.pt", "split:test", device="cpu")
    assert len(r) == len(splits.test)
    np.testing.assert_array_equal(r.labels, splits.test.labels)
    x = torch.stack([splits.test[i][0] for i in range(3)])
    res = r.search(x, k=1)
    np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-4)  # each finds itself (or a twin)
    # query files go through the dataset's preprocessing: 8 x 8 (ShrinkTo would keep 32 x 32)
    from PIL import Image

    assert r.input_size == [8, 8] and r.invert is False
    pixels = (splits.test[7][0][0].numpy() * 0.5 + 0.5) * 255  # undo Normalize(0.5, 0.5)
    small = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "L")
    small.save(tmp_path / "q8.png")
    small.resize((32, 32), Image.NEAREST).convert("RGB").save(tmp_path / "q32.png")
    r.save(tmp_path / "idx")
    back = Retriever.load(tmp_path / "idx", device="cpu")
    assert back.input_size == [8, 8]
    assert back.transform()(Image.open(tmp_path / "q32.png")).shape == (1, 8, 8)
    res = back.search([tmp_path / "q8.png", tmp_path / "q32.png"], k=1)
    assert res.scores[0, 0] > 0.999 and res.labels[0, 0] == splits.test.labels[7]


def _omniglot_npz(root, part, classes, seed):
    """A small Omniglot npz (bool, True = white background) with a few ink strokes per drawing,
    about 10% ink like the real drawings."""
    rng = np.random.default_rng(seed)
    images = np.ones((classes, 6, 28, 28), dtype=bool)
    for c in range(classes):
        rows, cols = rng.integers(4, 24, 2), rng.integers(4, 24, 2)
        for d in range(6):
            jitter = rng.integers(-1, 2, 2)
            images[c, d, rows[0] + jitter[0], 4:24] = False
            images[c, d, 4:24, cols[1] + jitter[1]] = False
            images[c, d, rows[1], 6:20] = False
    labels = np.repeat(np.arange(classes), 6).reshape(classes, 6)
    np.savez(root / f"{part}.npz", images=images, labels=labels)
    return images


def test_omniglot_png_queries_get_the_training_polarity(tmp_path):
    """A model trained from the npz files (bright strokes on dark, as every Omniglot source
    reaches the model) is queried with official black-on-white PNGs: the checkpoint records the
    inversion, so the PNG of a test drawing finds that drawing; an already inverted image is
    flagged as unlike the training images."""
    import warnings

    from PIL import Image

    from nirdml.inference import UnusualQueryWarning
    from nirdml.training import Trainer, load_checkpoint
    from nirdml.training.config import load_config

    root = tmp_path / "omni"
    root.mkdir()
    _omniglot_npz(root, "images_background", 8, seed=0)
    test_images = _omniglot_npz(root, "images_evaluation", 5, seed=1)
    cfg = load_config("omniglot_pa", [
        f"data.root={root}", "data.val_fraction=0", "data.batch_size=8", "data.options={}",
        "data.image_size=null", "model.embedding_dim=16", "train.epochs=1",
        "train.select_on=last", "train.progress=false", "train.tensorboard=false",
        "train.probe_classes=0"])
    Trainer(cfg, tmp_path / "run").fit()
    ck = tmp_path / "run/checkpoints/best.pt"
    prep = load_checkpoint(ck)["preprocessing"]
    assert prep["invert"] is True and prep["input_size"] == [28, 28]
    assert prep["input_mean"] < -0.5  # mostly dark background: bright strokes on dark
    retriever = Retriever.from_checkpoint(ck, "split:test", device="cpu")
    drawing = test_images[2, 3]  # row 2 * 6 + 3 of the test split
    official = tmp_path / "official.png"
    Image.fromarray(np.where(drawing, 255, 0).astype(np.uint8)).save(official)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusualQueryWarning)
        res = retriever.search([official], k=1)
    assert res.ids[0, 0] == 2 * 6 + 3 and res.scores[0, 0] > 0.9999
    inverted = tmp_path / "inverted.png"
    Image.fromarray(np.where(drawing, 0, 255).astype(np.uint8)).save(inverted)
    with pytest.warns(UnusualQueryWarning, match="inverted.png looks unlike"):
        retriever.search([inverted], k=1)



def test_gallery_index_alone_builds_saves_loads_and_searches_like_brute_force(tmp_path):
    """GalleryIndex without a model: random embeddings in, the same exact neighbours out after
    a save/load round trip, with its labels, paths, class names, source and origin."""
    from nirdml.retrieval import IndexOrigin

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 12)).astype(np.float32) * rng.uniform(0.5, 3, (200, 1))
    labels = np.arange(200) % 5
    origin = IndexOrigin("ck.pt", "f" * 64, "rgb", 3, {"invert": True, "input_size": [8, 8]},
                         {"data": {"image_size": 32}})
    index = GalleryIndex.build(emb, labels, [f"g{i}.png" for i in range(200)],
                               class_names=list("abcde"), source={"kind": "npz"}, seed=1,
                               origin=origin)
    assert len(index) == 200 and index.dim == 12 and index.spec.type == "flat"
    index.save(tmp_path / "idx")
    assert {p.name for p in (tmp_path / "idx").iterdir()} == {"index.faiss", "meta.json",
                                                              "labels.npy", ".nirdml"}
    back = GalleryIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(back.labels, labels)
    assert back.paths == index.paths and back.class_names == list("abcde")
    assert back.source == {"kind": "npz"} and back.origin == origin
    assert back.origin.preprocessing().input_size == (8, 8)
    queries = rng.normal(size=(7, 12)).astype(np.float32)
    res = back.search(queries, k=6, names=[f"q{i}" for i in range(7)])
    g = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ g.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(res.ids, expected)
    np.testing.assert_allclose(res.scores, np.take_along_axis(sims, expected, 1), atol=1e-5)
    np.testing.assert_array_equal(res.labels, labels[expected])
    assert res.paths[0][0] == f"g{expected[0, 0]}.png" and res.queries[3] == "q3"
    assert res.hits(0)[0]["class"] == "abcde"[labels[expected[0, 0]]]
    with pytest.raises(InputError, match="larger than the gallery"):
        back.search(queries, k=201)


def test_index_match_decision_and_reranked_search(tmp_path):
    """A calibrated threshold is the verification module's, survives save/load and decides
    ``same_item``; a re-ranked search equals rerank() for outside queries; damage is refused."""
    from nirdml.evaluation.rerank import rerank
    from nirdml.evaluation.verification import fit_threshold

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(10, 8))
    labels = np.repeat(np.arange(10), 12)
    emb = (centres[labels] + 0.7 * rng.normal(size=(120, 8))).astype(np.float32)
    held = (rng.normal(size=(6, 8))[np.repeat(np.arange(6), 10)]
            + 0.7 * rng.normal(size=(60, 8))).astype(np.float32)
    held_labels = np.repeat(np.arange(6), 10)
    index = GalleryIndex.build(emb, labels)
    m = index.calibrate(held, held_labels, 0.05, on="held-out")
    assert m["threshold"] == fit_threshold(held, held_labels, 0.05).threshold
    assert m["fmr"] <= 0.05 and m["on"] == "held-out"
    index.save(tmp_path / "idx")
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.match == m
    q = (centres[:4] + 0.7 * rng.normal(size=(4, 8))).astype(np.float32)
    res = back.search(q, k=5)
    doc = res.to_dict()
    assert doc["match_threshold"] == m["threshold"]
    for hit in doc["queries"][0]["results"]:
        assert hit["same_item"] == (hit["score"] > m["threshold"])
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = back.vectors()
    for spec, name, params in [("dba:n=3,alpha=1", "dba", {"n": 3, "alpha": 1.0}),
                               ("alpha_qe", "alpha_qe", {})]:
        got = back.search(q, k=7, rerank=spec)
        ids, scores = rerank(name, qn.astype(np.float32), g, 7, **params)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_allclose(got.scores, scores, atol=1e-6)
        assert got.rerank.startswith(name)
    # k-reciprocal on a served index: each query re-ranked over the gallery and itself
    got = back.search(q, k=3, rerank="k_reciprocal:k1=3,k2=2")
    for row in range(q.shape[0]):
        ids, scores = rerank("k_reciprocal", qn[row:row + 1].astype(np.float32), g, 3,
                             k1=3, k2=2)
        np.testing.assert_allclose(got.scores[row], scores[0], atol=1e-5)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    meta["match"] = {"target_fmr": 2.0, "threshold": 0.5, "fmr": 0.0, "fnmr": 0.0}
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="field 'match' must be"):
        GalleryIndex.load(tmp_path / "idx")


def test_index_changes_keep_ids_and_commits_survive_a_crash(tmp_path, monkeypatch):
    """add/remove/commit: ids stay stable, removed items are never returned, a crash at any
    write of a commit leaves the previous index loadable, and a rebuild clears old
    generations."""
    import nirdml.retrieval.index as index_module

    rng = np.random.default_rng(7)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    index = GalleryIndex.build(emb, np.arange(30) % 3, [f"g{i}.png" for i in range(30)],
                               class_names=["a", "b", "c"])
    folder = tmp_path / "idx"
    index.save(folder)
    live = GalleryIndex.load(folder)
    new = rng.normal(size=(2, 6)).astype(np.float32)
    ids = live.add(new, [live.label_of("d"), live.label_of("a")], ["n0.png", "n1.png"])
    assert list(ids) == [30, 31] and live.class_names == ["a", "b", "c", "d"]
    live.remove(4)
    with pytest.raises(InputError, match="no item 4"):
        live.remove(4)
    live.commit(folder)
    assert {p.name for p in folder.iterdir()} == {"index.1.faiss", "labels.1.npy", "meta.json",
                                                 ".nirdml"}
    back = GalleryIndex.load(folder)
    assert back.num_live == 31 and back.deleted == {4} and back.labels[30] == 3
    res = back.search(emb[4:5], k=31)
    assert 4 not in res.ids and sorted(res.ids[0]) == [i for i in range(32) if i != 4]
    assert back.search(new[:1], k=1).ids[0, 0] == 30
    # a crash while meta.json is written: the files of generation 2 are there, the index is 1
    real = index_module.atomic_write_bytes

    def crash_on_meta(path, data):
        if str(path).endswith("meta.json"):
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(index_module, "atomic_write_bytes", crash_on_meta)
    back.remove(5)
    with pytest.raises(ConfigError, match="disk full"):
        back.commit(folder)
    monkeypatch.setattr(index_module, "atomic_write_bytes", real)
    again = GalleryIndex.load(folder)
    assert again.deleted == {4} and again.generation == 1
    again.remove(5)
    again.commit(folder)  # the next commit replaces the orphans of the failed one
    assert {p.name for p in folder.iterdir()} == {"index.2.faiss", "labels.2.npy", "meta.json",
                                                 ".nirdml"}
    assert GalleryIndex.load(folder).deleted == {4, 5}
    index.save(folder)  # a rebuild: generation 0 again, nothing stale left
    assert {p.name for p in folder.iterdir()} == {"index.faiss", "labels.npy", "meta.json",
                                                 ".nirdml"}
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {"index": "../x.faiss"}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="field 'files' must be"):
        GalleryIndex.load(folder)
