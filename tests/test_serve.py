"""``nirdml serve`` as users meet it: the real server process on a free local port, over HTTP."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from nirdml.retrieval import GalleryIndex, Retriever  # noqa: E402
from test_retrieval import make_checkpoint, write_image_folder  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, path, data=None, method=None, ctype="application/octet-stream", timeout=30):
    """(status, parsed JSON or raw bytes) of one request."""
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": ctype} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            status, body, kind = res.status, res.read(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, body, kind = err.code, err.read(), err.headers.get("content-type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body


def start(index_dir, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nirdml", "serve", "--index", str(index_dir),
                             "--port", str(port), "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()[-2000:]}")
        try:
            if call(base, "/healthz", timeout=2)[0] == 200:
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer /healthz within 90 s")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(base / "model.pt")
    gallery = write_image_folder(base / "gallery")
    index_dir = base / "index"
    r = Retriever.from_checkpoint(ckpt, gallery, device="cpu")
    held = r.embed_images(sorted(str(p) for p in gallery.rglob("*.png")))
    r.index.calibrate(held, np.arange(held.shape[0]) % 3, 0.2, on="test")
    r.save(index_dir)
    ro_dir = base / "read_only"
    r.save(ro_dir)
    writable, w_base = start(index_dir, "--writable", "--max-upload-mb", "0.05",
                             "--max-pixels", "1000000", "--batch-wait-ms", "50")
    read_only, r_base = start(ro_dir)
    yield {"w": w_base, "r": r_base, "index": index_dir, "gallery": gallery, "retriever": r,
           "procs": (writable, read_only)}
    for proc in (writable, read_only):
        proc.terminate()
        proc.wait(timeout=20)


def image_bytes(path) -> bytes:
    return path.read_bytes()


def test_search_health_page_and_thumbnails(servers):
    base, r = servers["w"], servers["retriever"]
    status, health = call(base, "/healthz")
    assert status == 200 and health["items"] == 12 and health["dim"] == 16
    assert health["match_threshold"] == r.index.match["threshold"]
    status, page = call(base, "/")
    assert status == 200 and b"nirdml search" in page
    path = r.index.paths[5]
    status, doc = call(base, "/search?k=4", image_bytes(Path(path)), "POST", "image/png")
    assert status == 200
    expect = r.search([path], k=4)
    hits = doc["queries"][0]["results"]
    assert [h["id"] for h in hits] == expect.ids[0].tolist()
    assert [h["score"] for h in hits] == pytest.approx(expect.scores[0].tolist(), abs=1e-5)
    assert hits[0]["id"] == 5 and hits[0]["class"] == "green"
    assert [h["same_item"] for h in hits] == [h["score"] > health["match_threshold"]
                                              for h in hits]
    # JSON embeddings, and a re-ranked search, equal the library's answers
    emb = r.embed_images([path])
    status, doc = call(base, "/search?k=3&rerank=dba:n=2", json.dumps(
        {"embeddings": emb.tolist()}).encode(), "POST", "application/json")
    assert status == 200 and doc["rerank"] == "dba:n=2,alpha=3.0"
    assert [h["id"] for h in doc["queries"][0]["results"]] == \
        r.index.search(emb, 3, rerank="dba:n=2").ids[0].tolist()
    status, doc = call(base, "/search?k=3&rerank=k_reciprocal:k1=3,k2=2", json.dumps(
        {"embeddings": emb.tolist()}).encode(), "POST", "application/json")
    assert status == 200 and doc["rerank"].startswith("k_reciprocal:k1=3,k2=2")
    assert [h["id"] for h in doc["queries"][0]["results"]] == \
        r.index.search(emb, 3, rerank="k_reciprocal:k1=3,k2=2").ids[0].tolist()
    status, png = call(base, hits[1]["thumbnail"])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"


def bomb_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (2000, 2000)).save(out, "PNG")  # 4 million pixels in ~1 KB
    return out.getvalue()


@pytest.mark.parametrize("path,data,ctype,status,message", [
    ("/search", b"", "image/png", 400, "empty"),
    ("/search", b"this is not an image", "image/png", 415, "not a decodable image"),
    ("/search", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png", 415, "not a decodable image"),
    ("/search", b"x" * 60_000, "image/png", 413, "limit"),
    ("/search", "bomb", "image/png", 413, "2000 x 2000 pixels"),
    ("/search?k=0", "bomb", "image/png", 400, "k must be an integer"),
    ("/search?rerank=k_reciprocal:k1=3,k2=9", b"", "image/png", 400, "at most k1 + 1"),
    ("/search", b"{not json", "application/json", 400, "a JSON query must be"),
    ("/search", b'{"embeddings": [[1, 2]]}', "application/json", 400, "shape (Q, 16)"),
    ("/items", b"", "image/png", 400, "name the new item's class"),
    ("/items/999/thumbnail", None, None, 404, "no gallery image for item 999"),
    ("/items/abc/thumbnail", None, None, 404, "no item"),
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(
        servers, path, data, ctype, status, message):
    data = bomb_png() if data == "bomb" else data
    got, doc = call(servers["w"], path, data, "POST" if data is not None else None,
                    ctype or "image/png")
    assert got == status and message in doc["error"], doc
    assert call(servers["w"], "/healthz")[0] == 200
    assert all(proc.poll() is None for proc in servers["procs"])


def test_writable_server_adds_and_removes_items_and_persists_them(servers):
    base, gallery = servers["w"], servers["gallery"]
    new = image_bytes(gallery / "red" / "red_1.png")
    assert call(servers["r"], "/items?class=red", new, "POST")[0] == 403
    assert call(servers["r"], "/items/0", method="DELETE")[0] == 403
    status, added = call(base, "/items?class=purple", new, "POST", "image/png")
    assert status == 201 and added["id"] == 12 and added["items"] == 13
    on_disk = GalleryIndex.load(servers["index"])
    assert len(on_disk) == 13 and on_disk.class_names[on_disk.labels[12]] == "purple"
    assert on_disk.paths[12].startswith(str(servers["index"] / "items"))
    status, doc = call(base, "/search?k=2", new, "POST", "image/png")
    ids = [h["id"] for h in doc["queries"][0]["results"]]
    assert 12 in ids and call(base, "/items/12/thumbnail")[0] == 200
    assert call(base, "/items/12", method="DELETE") == (200, {"removed": 12, "items": 12})
    status, doc = call(base, "/search?k=12", new, "POST", "image/png")
    assert 12 not in [h["id"] for h in doc["queries"][0]["results"]]
    assert call(base, "/items/12", method="DELETE")[0] == 404
    assert call(base, "/items/12/thumbnail")[0] == 404
    assert GalleryIndex.load(servers["index"]).deleted == {12}


def test_concurrent_clients_are_batched_and_get_their_own_answers(servers):
    base, r = servers["w"], servers["retriever"]
    paths = r.index.paths[:8]
    before = call(base, "/healthz")[1]["batches"]

    def one(path):
        status, doc = call(base, "/search?k=1", image_bytes(Path(path)), "POST",
                           "image/png")
        return status, doc["queries"][0]["results"][0]["id"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, paths * 3))
    assert got == [(200, i) for i in list(range(8)) * 3]  # each finds itself
    batches = call(base, "/healthz")[1]["batches"] - before
    assert batches < 24, batches  # several uploads shared a forward pass


def test_one_batch_of_mixed_k_and_rerank_answers_each_job_as_its_own_search(servers):
    from nirdml.data.images import decode_image
    from nirdml.errors import InputError
    from nirdml.serve.app import HTTPProblem, SearchService

    r = servers["retriever"]
    service = SearchService(r, servers["index"])
    plain_search = service.search

    def search(emb, k, rerank):  # one group fails: only its job gets the error
        if rerank == "alpha_qe:n=3":
            raise InputError("this group fails")
        return plain_search(emb, k, rerank)

    service.search = search
    paths = r.index.paths[:6]
    images = [decode_image(Path(p).read_bytes(), 3, 10**6) for p in paths]
    specs = [(3, None), (5, "dba:n=2"), (1, None), (4, "alpha_qe:n=2"), (2, "dba:n=2"),
             (2, "alpha_qe:n=3")]
    docs = service.search_images([(im, k, rr) for im, (k, rr) in zip(images, specs)])
    for path, (k, rr), doc in zip(paths[:5], specs, docs):
        expect = r.index.search(r.embed_images([path]), k, rerank=rr)
        hits = doc["queries"][0]["results"]
        assert doc["k"] == k and [h["id"] for h in hits] == expect.ids[0].tolist()
        assert [h["score"] for h in hits] == pytest.approx(expect.scores[0].tolist(), abs=1e-5)
    assert isinstance(docs[5], HTTPProblem) and docs[5].status == 400
    assert str(docs[5]) == "this group fails"


def test_the_page_renders_neighbours_in_headless_chromium(servers, tmp_path):
    from PIL import Image

    from test_report import chromium

    url = servers["w"] + "/?item=3&k=6"
    dom = chromium(["--virtual-time-budget=8000", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-results="6"' in body and 'data-js-errors="0"' in body, body
    assert dom.stdout.count('class="hit') == 6 and 'data-id="3"' in dom.stdout
    shot = tmp_path / "serve.png"
    res = chromium(["--virtual-time-budget=8000", f"--screenshot={shot}",
                    "--window-size=1100,700", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB"))
    # the neighbours' thumbnails are on screen: the gallery's red, green and blue squares
    red = ((rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum()
    blue = ((rgb[..., 2] > 150) & (rgb[..., 0] < 90) & (rgb[..., 1] < 100)).sum()
    green = ((rgb[..., 1] > 140) & (rgb[..., 0] < 90) & (rgb[..., 2] < 100)).sum()
    assert max(red, green, blue) > 5000, (red, green, blue)


def test_the_batcher_waits_for_company_only_under_load():
    import asyncio

    from nirdml.serve.batching import QueryBatcher

    seen = []

    def handle(jobs):
        seen.append(list(jobs))
        return [ValueError(j) if j == "bad" else j * 2 for j in jobs]

    async def scenario():
        pool = ThreadPoolExecutor(1)
        batcher = QueryBatcher(handle, pool, max_batch=4, max_wait_s=3.0)
        start = time.perf_counter()
        assert await batcher.submit(1) == 2  # alone at low load: no 3 s wait
        assert time.perf_counter() - start < 2.0
        # a burst: what is queued runs at once (up to 4), then, under load, the next batch
        # waits up to 3 s for company before it runs with the 2 left
        out = await asyncio.gather(*(batcher.submit(j) for j in [3, 4, 5, 6, 7, "bad"]),
                                   return_exceptions=True)
        await batcher.close()
        pool.shutdown()
        return out

    out = asyncio.run(scenario())
    assert out[:5] == [6, 8, 10, 12, 14] and isinstance(out[5], ValueError)
    assert seen[0] == [1] and [len(b) for b in seen[1:]] == [4, 2]


def test_thumbnails_come_only_from_the_gallery_folder_recorded_at_build_time(servers, tmp_path):
    """A meta.json edited to list a file elsewhere (here: an image beside the gallery, in a
    folder the listed paths' common prefix would have admitted) gets a 404 for it, in-process."""
    from PIL import Image

    from nirdml.serve.app import HTTPProblem, SearchService

    r = servers["retriever"]
    outside = servers["gallery"].parent / "elsewhere.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(outside)
    service = SearchService(r, servers["index"])
    try:
        assert service.thumbnail(0)[:8] == b"\x89PNG\r\n\x1a\n"  # a gallery file: served
        real = r.index.paths[1]
        r.index.paths[1] = str(outside)
        try:
            with pytest.raises(HTTPProblem, match="outside the gallery folder recorded"):
                service.thumbnail(1)
        finally:
            r.index.paths[1] = real
    finally:
        service.executor.shutdown()
        service.decoder.shutdown()


def test_a_split_gallery_records_its_folder_and_serves_thumbnails_from_it(tmp_path):
    from PIL import Image

    from nirdml.serve.app import SearchService
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    lines = ["label,path,split"]
    for i in range(24):
        split, label = ("test", f"t{i % 2}") if i >= 16 else ("train", f"c{i % 4}")
        Image.new("L", (8, 8), 10 * i).save(data / "img" / f"{i}.png")
        lines.append(f"{label},img/{i}.png,{split}")
    (data / "data.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config("digits", [
        "data.name=csv", f"data.root={data / 'data.csv'}", "data.val_fraction=0",
        "data.batch_size=8", "data.samples_per_class=2", "data.image_size=8",
        "train.epochs=1", "train.progress=false", "train.tensorboard=false",
        "model.embedding_dim=8", "train.select_on=last"])
    Trainer(cfg, tmp_path / "run").fit()
    r = Retriever.from_checkpoint(tmp_path / "run/checkpoints/best.pt", "split:test",
                                  device="cpu")
    assert r.index.source["kind"] == "split"
    assert Path(r.index.source["root"]) == (data / "img").resolve()
    service = SearchService(r, tmp_path / "index")
    try:
        assert service.thumbnail(0)[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        service.executor.shutdown()
        service.decoder.shutdown()
