"""Safe and never destructive: degenerate inputs are errors, bad options are one line before any
work, progress is shown, files nirdml did not write are never replaced, and the readers of
embeddings, configs and search spaces end every damaged input in a nirdml error."""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import refused
from nirdml.cli import main
from nirdml.errors import ConfigError, InputError, NirdmlError


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command opens a checkpoint or reads its input: every check under
    test must come first."""
    from nirdml.analysis import pipeline
    from nirdml.inference import TrainedRun

    def refuse(*args, **kwargs):
        pytest.fail("the command started its work before checking its options")

    monkeypatch.setattr(TrainedRun, "open", refuse)
    monkeypatch.setattr(pipeline, "_read_input", refuse)


def _bad_option(capsys, argv, *words) -> str:
    """argparse refuses ``argv`` (exit 2): usage, then one error line holding ``words``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and err[-1].startswith("nirdml "), err
    for word in words:
        assert word in err[-1], err[-1]
    return err[-1]


def _clusters(n=60, d=8, c=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    y = np.arange(n) % c
    return (centers[y] + 0.3 * rng.normal(size=(n, d))).astype(np.float32), y


def _npz(path, x, y, **extra):
    np.savez(path, embeddings=x, labels=y, **extra)
    return str(path)


# ---------------------------------------------------------------- 1. degenerate inputs
def test_a_single_class_is_an_error_in_evaluate_and_analyze_with_one_wording(tmp_path, capsys):
    from nirdml.analysis import analyze
    from nirdml.evaluation import evaluate

    x, _ = _clusters()
    one = _npz(tmp_path / "one.npz", x, np.full(len(x), 3))
    said = refused(capsys, ["evaluate", "--embeddings", one], "single class", "label 3")
    again = refused(capsys, ["analyze", "--embeddings", one, "--out", str(tmp_path / "a")],
                    "single class")
    assert said.split("error: ", 1)[1] == again.split("error: ", 1)[1]
    assert not (tmp_path / "a").exists()  # a failed analysis leaves no folder behind
    with pytest.raises(InputError, match="single class"):
        evaluate(x, np.zeros(len(x), int))
    with pytest.raises(InputError, match="single class"):
        analyze(embeddings=x, labels=np.zeros(len(x), int), out_dir=tmp_path / "b")
    # In-Shop style: a query set and a gallery of one class together
    with pytest.raises(InputError, match="single class"):
        evaluate(x, np.ones(len(x), int), query_mask=np.arange(len(x)) < 20,
                 gallery_mask=np.arange(len(x)) >= 20)


@pytest.mark.parametrize("noise", [0.0, 1e-9], ids=["identical", "float-rounding"])
def test_collapsed_embeddings_are_an_error_in_evaluate_and_analyze(tmp_path, capsys, noise):
    from nirdml.analysis import analyze
    from nirdml.evaluation import evaluate

    rng = np.random.default_rng(1)
    _, y = _clusters()
    x = (np.tile(rng.normal(size=(1, 8)), (len(y), 1))
         * (1 + noise * rng.normal(size=(len(y), 8)))).astype(np.float32)
    path = _npz(tmp_path / "flat.npz", x, y)
    said = refused(capsys, ["evaluate", "--embeddings", path], "collapsed")
    again = refused(capsys, ["analyze", "--embeddings", path, "--out", str(tmp_path / "a")],
                    "collapsed")
    assert said.split("error: ", 1)[1] == again.split("error: ", 1)[1]
    with pytest.raises(InputError, match="collapsed"):
        evaluate(x, y, metrics=["recall@8"])
    with pytest.raises(InputError, match="collapsed"):
        analyze(embeddings=x, labels=y, out_dir=tmp_path / "b")


def test_nearly_collapsed_embeddings_are_still_evaluated():
    """Rows spread by 1e-3 (far above float rounding, far below any real model's spread) are
    distinguishable: not degenerate, so evaluated as before."""
    from nirdml.embeddings import COLLAPSE_TOLERANCE, collapse_spread, l2_normalize
    from nirdml.evaluation import evaluate

    rng = np.random.default_rng(2)
    _, y = _clusters()
    x = (1 + 1e-3 * rng.normal(size=(len(y), 8))).astype(np.float32)
    assert collapse_spread(l2_normalize(x)) > 10 * COLLAPSE_TOLERANCE
    res = evaluate(x, y, metrics=["recall@1"])
    assert 0 <= res["recall@1"] <= 1 and res["num_queries"] == len(y)


def test_huge_and_tiny_rows_are_normalised_not_mistaken_for_collapsed_ones():
    """Squares that overflow (or underflow) float32 must not turn rows into zeros (which would
    then look collapsed) or into "all-zero" rows."""
    from nirdml.embeddings import l2_normalize
    from nirdml.evaluation import evaluate

    x, y = _clusters()
    for scale in (1e37, 1e-42):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            unit = l2_normalize(x * np.float32(scale))
        np.testing.assert_allclose(unit, l2_normalize(x), atol=1e-3 if scale < 1 else 1e-6)
        assert evaluate(x * np.float32(scale), y, metrics=["recall@1"])["recall@1"] > 0.5


def _collapse_on(monkeypatch, trainer_module, when):
    """Make ``embed_dataset`` in the trainer return identical rows whenever ``when(split)``."""
    real = trainer_module.embed_dataset

    def embed(model, dataset, *args, **kwargs):
        emb = real(model, dataset, *args, **kwargs)
        if when(dataset):
            emb.embeddings = np.ones_like(emb.embeddings)
        return emb

    monkeypatch.setattr(trainer_module, "embed_dataset", embed)


TINY = ["train.progress=false", "train.tensorboard=false", "train.probe_classes=0",
        "model.embedding_dim=16", "loss.nir.subnet_width=32", "loss.nir.subnet_depth=3",
        "loss.nir.num_blocks=2", "data.val_fraction=0.4", "data.batch_size=24",
        "train.select_on=val"]  # digits 0-4: 3 training classes, 2 validation classes


def test_training_with_a_collapsed_epoch_warns_and_never_selects_it(tmp_path, monkeypatch,
                                                                   capsys):
    from nirdml.training import Trainer, trainer
    from nirdml.training.config import load_config

    cfg = load_config("digits", [*TINY, "train.epochs=3"])
    run = Trainer(cfg, tmp_path / "run")
    # epoch 1 real, epochs 2 and 3 collapsed on the validation classes
    _collapse_on(monkeypatch, trainer, lambda d: d is run.splits.val and run.epoch >= 2)
    final = run.fit()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text()
               .splitlines()]
    assert "val/recall@1" in records[0] and "val/degenerate" not in records[0]
    for record in records[1:]:
        assert "collapsed" in record["val/degenerate"] and "val/recall@1" not in record
        assert record["selected_epoch"] == 1
    assert final["selected_epoch"] == 1 and "degenerate" not in final
    assert 0 < final["recall@1"] <= 1  # the test metrics of the real epoch
    err = capsys.readouterr().err
    assert err.count("WARNING: the validation embeddings") == 2 and "collapsed" in err


def test_training_with_a_collapsed_model_throughout_records_it_in_final_json(tmp_path,
                                                                            monkeypatch,
                                                                            capsys):
    from nirdml.training import Trainer, trainer
    from nirdml.training.config import load_config

    _collapse_on(monkeypatch, trainer, lambda d: True)
    final = Trainer(load_config("digits", [*TINY, "train.epochs=1"]), tmp_path / "run").fit()
    written = json.loads((tmp_path / "run/final.json").read_text())
    assert "collapsed" in written["degenerate"] and "recall@1" not in written
    assert written["selected_epoch"] is None and final["degenerate"] == written["degenerate"]
    assert "WARNING: the test embeddings" in capsys.readouterr().err


def test_a_single_class_validation_split_stops_training_with_one_line(tmp_path, monkeypatch):
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    run = Trainer(load_config("digits", [*TINY, "train.epochs=1"]), tmp_path / "run")
    run.splits.val.labels = np.zeros_like(np.asarray(run.splits.val.labels))
    with pytest.raises(InputError, match="validation split of digits: .*single class"):
        run.fit()


# ---------------------------------------------------------------- 2. one-line errors
def test_devices_that_do_not_exist_are_one_line_errors(tmp_path, capsys, checkpoint, no_work):
    from nirdml.devices import resolve_device
    from nirdml.evaluation import evaluate

    x, y = _clusters()
    path = _npz(tmp_path / "e.npz", x, y)
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or none at all
    bad = ["banana", missing_gpu, "CUDA", ""] + ([] if torch.cuda.is_available() else ["cuda"])
    for name in bad:
        refused(capsys, ["evaluate", "--embeddings", path, "--device", name], "--device")
    for argv in (["embed", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.npz")],
                 ["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")],
                 ["evaluate", "--checkpoint", str(checkpoint)],
                 ["search", "--index", str(tmp_path), "--query", "q.png"],
                 ["index", "build", "--checkpoint", str(checkpoint), "--gallery", "split:test",
                  "--out", str(tmp_path / "i")]):
        refused(capsys, [*argv, "--device", "banana"], "--device 'banana' is not a device")
        refused(capsys, [*argv, "--device", missing_gpu], f"--device '{missing_gpu}'")
    with pytest.raises(ConfigError, match="train.device='banana' is not a device"):
        resolve_device("banana")
    with pytest.raises(ConfigError, match="device='banana'"):
        evaluate(x, y, device="banana")
    assert resolve_device("cpu", "--device") == torch.device("cpu")


def test_analyze_out_that_cannot_be_a_folder(tmp_path, capsys, no_work):
    x, y = _clusters()
    path = _npz(tmp_path / "e.npz", x, y)
    refused(capsys, ["analyze", "--embeddings", path, "--out", "/proc/x"], "--out", "/proc/x")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    refused(capsys, ["analyze", "--embeddings", path, "--out", str(a_file)],
            "is a file, not a folder")
    assert a_file.read_text() == "mine"


def test_export_numbers_and_suffixes_are_checked_first(tmp_path, capsys, checkpoint, no_work):
    from nirdml.export import onnx_opset_range

    base = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]
    for size in ("0", "-8", "x"):
        _bad_option(capsys, [*base, "--image-size", size], "--image-size", size)
    low, high = onnx_opset_range()
    assert low == 9 and high >= 17  # verified: torch 2.x's exporter, 9 to 20
    for opset in ("3", str(low - 1), str(high + 1)):
        refused(capsys, [*base, "--opset", opset], f"--opset {opset}",
                f"from {low} to {high}")
    refused(capsys, ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out",
                      str(tmp_path / "m.pt")], "onnx export goes to a .onnx file", "m.onnx")
    refused(capsys, ["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                      "--out", str(tmp_path / "m.onnx")], ".pt / .pth / .ts file", "m.pt")
    assert not list(tmp_path.iterdir())


def test_sizes_and_counts_must_be_positive(tmp_path, capsys, checkpoint, no_work):
    from nirdml.evaluation import evaluate

    x, y = _clusters()
    path = _npz(tmp_path / "e.npz", x, y)
    out = ["--out", str(tmp_path / "o.npz")]
    for value in ("-4", "0"):
        _bad_option(capsys, ["embed", "--checkpoint", str(checkpoint), *out, "--batch-size",
                             value], "--batch-size", ">= 1", value)
        _bad_option(capsys, ["analyze", "--checkpoint", str(checkpoint), "--out",
                             str(tmp_path / "a"), "--batch-size", value], "--batch-size")
        _bad_option(capsys, ["index", "build", "--checkpoint", str(checkpoint), "--gallery",
                             "split:test", "--out", str(tmp_path / "i"), "--batch-size",
                             value], "--batch-size")
        _bad_option(capsys, ["search", "--index", str(tmp_path), "--query", "q.png", "-k",
                             value], "-k")
    for value in ("0", "-5", "nan", "inf"):
        _bad_option(capsys, ["evaluate", "--embeddings", path, "--max-memory-mb", value],
                    "--max-memory-mb", "> 0")
    for value in (0, -5, float("nan")):
        with pytest.raises(ConfigError, match="max_memory_mb must be a number > 0"):
            evaluate(x, y, max_memory_mb=value)
    with pytest.raises(ConfigError, match="block_size"):
        evaluate(x, y, block_size=0)


# ---------------------------------------------------------------- 3. progress
def test_evaluate_shows_progress_from_the_cli_and_not_in_library_calls(tmp_path, monkeypatch,
                                                                       capsys):
    from nirdml.evaluation import core, evaluate

    shown = []
    real = core.progress_bar

    def recording_bar(total, desc, *args, **kwargs):
        shown.append(desc)
        return real(total, desc, *args, **{**kwargs, "disable": True})

    monkeypatch.setattr(core, "progress_bar", recording_bar)
    x, y = _clusters(n=300, c=6)
    path = _npz(tmp_path / "e.npz", x, y)
    quiet = {b: evaluate(x, y, backend=b) for b in ("faiss", "torch")}
    assert shown == []  # library calls: no bars unless asked
    for backend in ("faiss", "torch"):
        assert main(["evaluate", "--embeddings", path, "--backend", backend, "--json",
                     str(tmp_path / f"{backend}.json")]) == 0
        assert any("neighbours" in d for d in shown) and any("k-means" in d for d in shown)
        shown.clear()
        loud = evaluate(x, y, backend=backend, progress="test")
        assert loud == quiet[backend]  # bars change no metric
        written = json.loads((tmp_path / f"{backend}.json").read_text())
        rates = {k: written.pop(k) for k in list(written) if "@fmr=" in k}  # the CLI's default
        assert written == pytest.approx({k: v for k, v in quiet[backend].items()})
        assert set(rates) == {"fnmr@fmr=0.01", "threshold@fmr=0.01", "fnmr@fmr=0.001",
                              "threshold@fmr=0.001"}
    capsys.readouterr()


def test_the_torch_kmeans_bar_counts_every_lloyd_step():
    from nirdml.evaluation.clustering import kmeans_torch

    x, _ = _clusters(n=100)
    steps = []
    with_bar = kmeans_torch(x, 4, seed=3, niter=7, on_iteration=lambda: steps.append(1))
    assert len(steps) == 7
    np.testing.assert_array_equal(with_bar, kmeans_torch(x, 4, seed=3, niter=7))


# ---------------------------------------------------------------- 4. other people's files
def _run_folder(tmp_path) -> Path:
    """A bare run folder (marker and an empty metrics log): enough for a report."""
    from nirdml.owned import claim_folder

    run = tmp_path / "run"
    claim_folder(run, "run")
    (run / "metrics.jsonl").write_text("")
    return run


def test_files_nirdml_did_not_write_are_never_replaced(tmp_path, capsys, checkpoint, no_work):
    x, y = _clusters()
    user_npz = Path(_npz(tmp_path / "mine.npz", x, y))
    user_files = {user_npz: user_npz.read_bytes()}
    for name in ("m.onnx", "m.pt", "r.html"):
        (tmp_path / name).write_bytes(b"my own file")
        user_files[tmp_path / name] = b"my own file"
    said = "exists and was not written by nirdml; pass --overwrite"
    refused(capsys, ["embed", "--checkpoint", str(checkpoint), "--out", str(user_npz)], said)
    refused(capsys, ["export", "--checkpoint", str(checkpoint), "--out",
                      str(tmp_path / "m.onnx")], said)
    refused(capsys, ["export", "--checkpoint", str(checkpoint), "--format", "torchscript",
                      "--out", str(tmp_path / "m.pt")], said)
    run = _run_folder(tmp_path)
    refused(capsys, ["report", "--run", str(run), "--out", str(tmp_path / "r.html")], said)
    (run / "report.html").write_text("<html>my notes</html>")
    refused(capsys, ["report", "--run", str(run), "--no-grid"], said)
    user_files[run / "report.html"] = b"<html>my notes</html>"
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    refused(capsys, ["analyze", "--embeddings", str(user_npz), "--out", str(folder)],
            "not empty", "was not written by nirdml")
    for path, data in user_files.items():
        assert path.read_bytes() == data, path
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_nirdml_replaces_its_own_outputs_and_others_with_overwrite(tmp_path, capsys,
                                                                   checkpoint):
    from nirdml.embeddings import is_embeddings_file
    from nirdml.export import is_export_file
    from nirdml.reports.html import is_report_file

    emb = tmp_path / "e.npz"
    for _ in range(2):  # the second run replaces the first run's file
        assert main(["embed", "--checkpoint", str(checkpoint), "--out", str(emb)]) == 0
    assert is_embeddings_file(emb)
    assert not is_embeddings_file(_npz(tmp_path / "u.npz", *_clusters()))  # np.savez's
    (tmp_path / "u.npz").write_bytes(b"mine")
    assert main(["embed", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "u.npz"),
                 "--overwrite"]) == 0
    assert is_embeddings_file(tmp_path / "u.npz")
    for fmt, name in (("torchscript", "m.pt"), ("onnx", "m.onnx")):
        for extra in ([], ["--overwrite"]):
            assert main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out",
                         str(tmp_path / name), "--no-check", *extra]) == 0
        assert is_export_file(tmp_path / name, fmt)
        assert not is_export_file(tmp_path / name, "onnx" if fmt == "torchscript" else
                                  "torchscript")
    run = _run_folder(tmp_path)
    for _ in range(2):
        assert main(["report", "--run", str(run), "--no-grid"]) == 0
    assert is_report_file(run / "report.html")
    assert '<meta name="generator" content="nirdml ' in (run / "report.html").read_text()
    capsys.readouterr()


def test_analysis_folders_of_nirdml_are_reused(tmp_path, capsys):
    from nirdml.owned import MARKER, marker_kind

    x, y = _clusters()
    path = _npz(tmp_path / "e.npz", x, y)
    run = _run_folder(tmp_path)
    default = run / "analysis"  # where the report looks, inside the run folder
    for _ in range(2):
        assert main(["analyze", "--embeddings", path, "--out", str(default), "--no-plots"]) == 0
    assert marker_kind(default) == "analysis"
    assert sorted(p.name for p in default.iterdir()) == [MARKER, "analysis.json"]
    legacy = tmp_path / "old"  # written before the marker: analysis.json and figures only
    legacy.mkdir()
    (legacy / "analysis.json").write_text("{}")
    (legacy / "spectrum.png").write_bytes(b"png")
    assert main(["analyze", "--embeddings", path, "--out", str(legacy), "--no-plots"]) == 0
    assert json.loads((legacy / "analysis.json").read_text())["num_samples"] == len(y)
    assert marker_kind(legacy) == "analysis"
    other = tmp_path / "idx"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"kind": "index"}))
    refused(capsys, ["analyze", "--embeddings", path, "--out", str(other)], "index output")
    capsys.readouterr()


# ---------------------------------------------------------------- 5. fuzzing the readers
def _flip_bits(data: bytes, rng, flips: int) -> bytes:
    buf = bytearray(data)
    for _ in range(flips):
        i = int(rng.integers(len(buf)))
        buf[i] ^= 1 << int(rng.integers(8))
    return bytes(buf)


def _npz_bytes(arrays: dict, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _odd_array(rng, n: int):
    """An array of a kind the reader must refuse or take: wrong dtype, shape, values."""
    kinds = [
        lambda: rng.normal(size=(n, 4)).astype(np.float32),
        lambda: rng.integers(0, 3, size=(n, 4)),
        lambda: rng.normal(size=(n,)),
        lambda: rng.normal(size=(n, 2, 2)),
        lambda: np.asarray(1.5),
        lambda: np.zeros((0, 4), np.float32),
        lambda: np.zeros((n, 0), np.float32),
        lambda: np.array(["a"] * n),
        lambda: np.array([b"x"] * n),
        lambda: np.ones(n, dtype=bool),
        lambda: (rng.normal(size=(n, 4)) + 1j).astype(np.complex64),
        lambda: np.full((n, 4), np.nan, np.float32),
        lambda: np.full((n, 4), np.inf, np.float16),
        lambda: np.full((n, 4), 3e38, np.float32),
        lambda: np.full((n, 4), 1e-45, np.float32),
        lambda: rng.integers(0, 3, size=n).astype(np.uint64),
        lambda: rng.integers(0, 3, size=n + 1),
        lambda: rng.integers(0, 3, size=(n, 1)),
        lambda: np.zeros(n, dtype=[("a", "f4"), ("b", "i4")]),
        lambda: np.arange(n, dtype=np.float64) + 0.5,
    ]
    return kinds[int(rng.integers(len(kinds)))]()


def _check_loaded_embeddings(path: Path, failures: list, case: str) -> None:
    from nirdml.embeddings import Embeddings
    from nirdml.evaluation import evaluate

    try:
        emb = Embeddings.load(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = evaluate(emb.embeddings, emb.labels, metrics=["recall@1", "nmi"],
                           query_mask=emb.is_query, gallery_mask=emb.is_gallery)
        for key in ("recall@1", "nmi"):
            assert math.isnan(res[key]) or 0 <= res[key] <= 1, (case, res)
    except NirdmlError:
        pass
    except Exception as exc:  # noqa: BLE001 - the point: no other exception type
        failures.append(f"{case}: {type(exc).__name__}: {exc}")


def test_fuzz_embeddings_npz_reader(tmp_path):
    """Damaged, truncated and odd .npz files: a nirdml error or a sane result, nothing else."""
    from nirdml.embeddings import Embeddings

    rng = np.random.default_rng(20240611)
    n = 24
    x, y = _clusters(n=n, d=4, c=3)
    good = {"embeddings": x, "labels": y, "is_query": np.arange(n) % 2 == 0,
            "paths": np.array([f"img{i}.png" for i in range(n)])}
    saved = tmp_path / "saved.npz"
    Embeddings(x, y, paths=list(good["paths"])).save(saved)
    bases = [_npz_bytes(good), _npz_bytes(good, compressed=True), saved.read_bytes()]
    failures: list[str] = []
    path = tmp_path / "case.npz"
    for case in range(600):
        kind = case % 7
        base = bases[int(rng.integers(len(bases)))]
        if kind == 0:
            data = base[: int(rng.integers(len(base)))]
        elif kind == 1:
            data = _flip_bits(base, rng, int(rng.integers(1, 9)))
        elif kind == 2:  # damage inside the arrays' headers and data, past the zip header
            data = bytearray(base)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(30, len(data)))] = int(rng.integers(256))
            data = bytes(data)
        elif kind == 3:
            data = rng.bytes(int(rng.integers(0, 400))) if case % 2 else b""
        else:  # well-formed archives of odd arrays, missing or extra keys
            arrays = dict(good)
            for key in list(arrays):
                roll = rng.random()
                if roll < 0.25:
                    arrays[key] = _odd_array(rng, n)
                elif roll < 0.35:
                    del arrays[key]
            if rng.random() < 0.2:
                arrays["is_gallery"] = _odd_array(rng, n)
            if rng.random() < 0.1:
                arrays["extra"] = np.zeros(3)
            data = _npz_bytes(arrays, compressed=bool(rng.random() < 0.3))
        path.write_bytes(data)
        _check_loaded_embeddings(path, failures, f"case {case} (kind {kind})")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embeddings=np.array([object()] * n), labels=y)
    _check_loaded_embeddings(pickled, failures, "object array")
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:  # a header claiming 8 TiB
        header, labels = io.BytesIO(), io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 2)})
        np.lib.format.write_array(labels, y)
        archive.writestr("embeddings.npy", header.getvalue() + b"\0" * 64)
        archive.writestr("labels.npy", labels.getvalue())
    _check_loaded_embeddings(tmp_path / "huge.npz", failures, "huge header")
    assert not failures, "\n".join(failures[:20])


def _config_text() -> str:
    from nirdml.training.config import CONFIG_DIR

    return (CONFIG_DIR / "digits.yaml").read_text()


ODD_VALUES = [None, True, 0, -1, 10**400, 1.5, float("nan"), float("inf"), "", "x" * 300,
              [1, [2, [3]]], {"a": {"b": 1}}, [], {}, "1e-4", -0.0, "null", [None]]


def _random_nested(rng, depth: int):
    if depth == 0 or rng.random() < 0.3:
        return ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
    if rng.random() < 0.5:
        return [_random_nested(rng, depth - 1) for _ in range(int(rng.integers(0, 3)))]
    return {f"k{i}": _random_nested(rng, depth - 1) for i in range(int(rng.integers(0, 3)))}


def _yaml_cases(rng, base_text: str, base_dict: dict, count: int):
    """``count`` damaged YAML documents made from a valid one: bytes or text."""
    import yaml

    keys = [(section, key) for section, sub in base_dict.items() if isinstance(sub, dict)
            for key in sub]
    for case in range(count):
        kind = case % 9
        if kind == 0:
            yield base_text[: int(rng.integers(len(base_text)))]
        elif kind == 1:
            yield _flip_bits(base_text.encode(), rng, int(rng.integers(1, 6)))
        elif kind == 2:
            yield rng.bytes(int(rng.integers(0, 300)))
        elif kind in (3, 4):  # wrong types for known keys, unknown keys
            data = json.loads(json.dumps(base_dict))
            for _ in range(int(rng.integers(1, 4))):
                section, key = keys[int(rng.integers(len(keys)))] if keys else ("x", "y")
                target = data.setdefault(section, {})
                if not isinstance(target, dict):
                    continue
                if rng.random() < 0.2:
                    key = f"unknown_{case}"
                old = target.get(key)
                if rng.random() < 0.4 and isinstance(old, bool | int | float):  # same type
                    target[key] = (not old if isinstance(old, bool) else
                                   type(old)(old * float(rng.choice([0, 0.5, 2, -1]))))
                else:
                    target[key] = _random_nested(rng, 3)
            if rng.random() < 0.1:
                data[int(rng.integers(5))] = "int key"
            yield yaml.safe_dump(data, sort_keys=False)
        elif kind == 5:  # deeply nested
            depth = int(rng.choice([20, 40, 300]))  # deeper ones: DEEP, once each
            yield "a: " + "[" * depth + "]" * depth if rng.random() < 0.5 else \
                "a:\n" + "".join(" " * i + "- \n" for i in range(min(depth, 2000)))
        elif kind == 6:  # huge or exploding
            if rng.random() < 0.5:
                yield "loss:\n  options:\n    " + _billion_laughs().replace("\n", "\n    ")
            else:
                yield "seed: " + "9" * int(rng.integers(400, 20000))
        elif kind == 7:  # YAML tags that would run code with an unsafe loader
            yield rng.choice(["!!python/object/apply:os.system ['echo pwned > /tmp/nirdml_x']",
                              "a: !!python/name:os.system", "!!binary aGVsbG8=",
                              "a: !!set {1, 2}", "? [1, 2]\n: x", "a: !!timestamp 2001-12-14"])
        else:
            yield rng.choice(["", "~", "[]", "42", "'text'", "-", ":", "---\n---\n", "\x00",
                              "\ufeffseed: 1", "seed: 1\nseed: 2"])


#: nesting past Python's recursion limit (PyYAML's parser recurses): once each, they are slow
DEEP = ["a: " + "[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "- \n" for i in range(3000))]


def _billion_laughs() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _outcome(call, failures: list, case: str):
    try:
        return call()
    except NirdmlError:
        return None
    except Exception as exc:  # noqa: BLE001 - the point: no other exception type
        failures.append(f"{case}: {type(exc).__name__}: {str(exc)[:200]}")
        return None


def test_fuzz_config_yaml_reader(tmp_path):
    """Damaged configs: load_config / Config.from_yaml / read_yaml end in a nirdml error or a
    valid Config -- never another exception, a hang, or executed code."""
    import yaml

    from nirdml.training.config import Config, load_config, read_yaml

    rng = np.random.default_rng(7)
    text = _config_text()
    base = yaml.safe_load(text)
    failures: list[str] = []
    path = tmp_path / "c.yaml"
    cases = [*_yaml_cases(rng, text, base, 300), *DEEP, _billion_laughs(),
             "loss:\n  options: " + _billion_laughs().replace("\n", "\n    ")]
    loaded = 0
    for i, doc in enumerate(cases):
        path.write_bytes(doc if isinstance(doc, bytes) else doc.encode("utf-8"))
        cfg = _outcome(lambda: load_config(path), failures, f"load_config case {i}")
        assert cfg is None or isinstance(cfg, Config)
        loaded += cfg is not None
        if i % 3 == 0:
            _outcome(lambda: Config.from_yaml(path), failures, f"from_yaml case {i}")
        _outcome(lambda: read_yaml(path, "config file"), failures, f"read_yaml case {i}")
    assert loaded > 0  # some damage leaves a valid config: that is read as one
    assert not Path("/tmp/nirdml_x").exists()
    assert not failures, "\n".join(failures[:20])


def test_yaml_is_read_with_a_safe_loader(tmp_path):
    from nirdml.training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("seed: !!python/object/apply:builtins.exec ['raise SystemExit(9)']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_fuzz_search_space_reader(tmp_path):
    """Damaged search spaces: load_space (and validate_space on what it returns) end in a
    nirdml error or a valid space."""
    import yaml

    from nirdml.selection.search_space import Param, load_space, validate_space
    from nirdml.training.config import load_config

    cfg = load_config("digits")
    text = ("optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
            "loss.nir.weight: {type: float, low: 0.0, high: 2.0, step: 0.5}\n"
            "data.batch_size: {type: int, low: 16, high: 64, step: 16}\n"
            "model.embedding_dim: {type: categorical, choices: [16, 32]}\n"
            "loss.options.alpha: {type: float, low: 16, high: 48}\n")
    base = yaml.safe_load(text)
    assert validate_space(load_space(_write(tmp_path / "ok.yaml", text)), cfg) is None
    rng = np.random.default_rng(11)
    failures: list[str] = []
    path = tmp_path / "space.yaml"
    fields = ["type", "low", "high", "log", "step", "choices", "other"]
    cases = list(_yaml_cases(rng, text, {"space": base}, 160))
    for case in range(160):  # field-level damage of the entries
        data = json.loads(json.dumps(base))
        for _ in range(int(rng.integers(1, 4))):
            key = list(data)[int(rng.integers(len(data)))]
            if rng.random() < 0.2:
                data[key] = _random_nested(rng, 2)
            elif isinstance(data[key], dict):
                data[key][fields[int(rng.integers(len(fields)))]] = _random_nested(rng, 2)
        if rng.random() < 0.1:
            data[f"no.such.key{case}"] = {"type": "int", "low": 1, "high": 2}
        cases.append(yaml.safe_dump(data))
    cases += [*DEEP, _billion_laughs(),
              "optim.lr: {type: float, low: 1, high: " + "9" * 400 + "}"]
    valid = 0
    for i, doc in enumerate(cases):
        path.write_bytes(doc if isinstance(doc, bytes) else doc.encode("utf-8"))
        space = _outcome(lambda: load_space(path), failures, f"load_space case {i}")
        if space is not None:
            assert all(isinstance(p, Param) for p in space.values())
            _outcome(lambda s=space: validate_space(s, cfg), failures, f"validate_space case {i}")
            valid += 1
    assert valid > 0
    assert not failures, "\n".join(failures[:20])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
