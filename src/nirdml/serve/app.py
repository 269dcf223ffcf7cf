"""The search service: a Starlette app over a :class:`~nirdml.retrieval.Retriever`.

Endpoints (JSON unless said otherwise; every error is ``{"error": "..."}`` with a 4xx status,
and the server keeps serving):

* ``GET /healthz`` -- items, dimension, model fingerprint, match decision, batching counters.
* ``GET /`` -- a page: drop or pick an image, see its top-k neighbours with scores and classes
  (``/?item=ID`` searches with gallery item ``ID``'s image, as if it had been dropped).
* ``POST /search?k=K&rerank=SPEC`` -- body: the image file's bytes (any image type), or JSON
  ``{"embeddings": [[...], ...]}`` (``(Q, D)``). Returns the hits (rank, id, score, label,
  class, path and, with a calibrated index, ``same_item``) as ``nirdml search --json`` does.
* ``GET /items/{id}/thumbnail`` -- a PNG of a gallery item, read only from the files the index
  lists, and only under the gallery's folders (or the index's own ``items/``).
* ``POST /items?class=NAME`` and ``DELETE /items/{id}`` -- with ``writable``: add an uploaded
  image (stored under ``INDEX_DIR/items/``) or remove an item; every change is committed
  before the reply (:meth:`~nirdml.retrieval.index.GalleryIndex.commit`: crash-safe).

Uploads are read up to ``max_upload_bytes`` (413 past it, before decoding) and decoded under
``max_pixels`` (:func:`~nirdml.data.images.decode_image`). The model and the index are used
from one thread only (``executor``), so requests never race on them; concurrent image queries
are embedded in one forward pass and searched in one index call
(:class:`~nirdml.serve.batching.QueryBatcher`). Uploads are decoded in their own threads
(``decoder``), beside the model's.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.errors import NirdmlError

THUMBNAIL_SIZE = 160


class HTTPProblem(Exception):
    """An error a client caused: its status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    """The state behind the endpoints: the retriever, its index folder, the limits."""

    def __init__(self, retriever, index_dir: str | os.PathLike, *, writable: bool = False,
                 rerank: str | None = None, max_upload_bytes: int = 8 << 20,
                 max_pixels: int = 40_000_000, max_batch: int = 32,
                 batch_wait_s: float = 0.02, max_k: int = 100):
        from nirdml.evaluation.rerank import parse_served
        from nirdml.serve.batching import QueryBatcher

        parse_served(rerank)
        self.retriever, self.index_dir = retriever, Path(index_dir)
        self.index = retriever.index
        self.writable, self.rerank = writable, rerank
        self.max_upload_bytes, self.max_pixels, self.max_k = max_upload_bytes, max_pixels, max_k
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nirdml-model")
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nirdml-decode")
        self.batcher = QueryBatcher(self.search_images, self.executor, max_batch, batch_wait_s)
        self.roots = self._gallery_roots()
        self._thumbs: dict[int, bytes] = {}

    # ---- helpers -------------------------------------------------------------------------
    def _gallery_roots(self) -> list[Path]:
        """The folders thumbnails may come from: the index's own ``items/`` and the gallery
        folder recorded when the index was built (a folder gallery's folder, a dataset split's
        dataset root). Nothing is inferred from the listed paths: a ``meta.json`` edited to list
        files elsewhere gets no thumbnails for them."""
        roots = [(self.index_dir / "items").resolve()]
        source = self.index.source or {}
        recorded = {"folder": source.get("value"), "split": source.get("root")}.get(
            source.get("kind"))
        if isinstance(recorded, str) and os.path.isabs(recorded):
            roots.append(Path(recorded).resolve())
        return roots

    async def run(self, fn, *args):
        """``fn(*args)`` in the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def decode(self, data: bytes):
        """The uploaded image ``data``, decoded in a decoder thread (4xx on a bad upload)."""
        from nirdml.data.images import decode_image

        in_chans = self.retriever.preprocessing.in_chans
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.decoder, decode_image, data, in_chans, self.max_pixels)
        except NirdmlError as exc:
            status = 413 if "too large" in str(exc) else 400 if "empty" in str(exc) else 415
            raise HTTPProblem(status, str(exc)) from None

    def parse_k(self, text: str | None) -> int:
        try:
            k = int(text) if text is not None else 10
        except ValueError:
            k = 0
        if not 1 <= k <= self.max_k:
            raise HTTPProblem(400, f"k must be an integer in 1..{self.max_k}, got {text!r}")
        return min(k, self.index.num_live)

    def search(self, emb: np.ndarray, k: int, rerank: str | None) -> dict[str, Any]:
        """The JSON document of the top-``k`` hits of each row of ``emb``."""
        doc = self.index.search(emb, k, rerank=rerank).to_dict()
        for query in doc["queries"]:
            for hit in query["results"]:
                hit["thumbnail"] = f"/items/{hit['id']}/thumbnail"
        return doc

    def search_images(self, jobs: list[tuple[Any, int, str | None]]) -> list[Any]:
        """One document per ``(image, k, rerank)`` job: the images embedded in one forward pass,
        the queries of each re-ranking searched in one index call (top-``max k``, cut to each
        job's ``k``: a top-k list is the prefix of a longer one). A group that fails gives its
        jobs the exception (``QueryBatcher`` raises it to those requests only)."""
        emb = self.retriever.embed_images([image for image, _, _ in jobs])
        docs: list[Any] = [None] * len(jobs)
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, rerank) in enumerate(jobs):
            groups.setdefault(rerank, []).append(i)
        for rerank, rows in groups.items():
            try:
                doc = self.search(emb[rows], max(jobs[i][1] for i in rows), rerank)
            except NirdmlError as exc:
                for i in rows:
                    docs[i] = HTTPProblem(400, str(exc))
                continue
            for i, query in zip(rows, doc.pop("queries"), strict=True):
                k = jobs[i][1]
                docs[i] = {**doc, "k": k, "queries": [{**query,
                                                         "results": query["results"][:k]}]}
        return docs

    def thumbnail(self, item: int) -> bytes:
        from PIL import Image

        from nirdml.data.images import load_image

        if item in self._thumbs:
            return self._thumbs[item]
        paths = self.index.paths
        if paths is None or not 0 <= item < len(self.index) or item in self.index.deleted:
            raise HTTPProblem(404, f"there is no gallery image for item {item}")
        path = Path(paths[item]).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise HTTPProblem(404, f"item {item}'s file is outside the gallery folder recorded "
                                   f"with the index (rebuild the index to record one)")
        try:
            image = load_image(path, 3)
        except NirdmlError:
            raise HTTPProblem(404, f"item {item}'s file cannot be read") from None
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "PNG")
        if len(self._thumbs) < 4096:
            self._thumbs[item] = out.getvalue()
        return out.getvalue()

    def add(self, data: bytes, image, name: str) -> dict[str, Any]:
        """Embed and add one image of class ``name``, store its file, commit."""
        from PIL import Image

        from nirdml.files import atomic_write_bytes

        emb = self.retriever.embed_images([image])
        label = self.index.label_of(name)
        store = self.index_dir / "items"
        store.mkdir(exist_ok=True)
        with Image.open(io.BytesIO(data)) as header:  # decoded before: the type is known
            suffix = {"JPEG": "jpg"}.get(header.format, (header.format or "img").lower())
        path = store / f"{len(self.index)}.{suffix}"
        atomic_write_bytes(path, data)
        ids = self.index.add(emb, [label], None if self.index.paths is None else [str(path)])
        self.index.commit(self.index_dir)
        return {"id": int(ids[0]), "label": label, "class": name, "items": self.index.num_live}

    def remove(self, item: int) -> dict[str, Any]:
        try:
            self.index.remove(item)
        except NirdmlError as exc:
            raise HTTPProblem(404, str(exc)) from None
        self.index.commit(self.index_dir)
        self._thumbs.pop(item, None)
        return {"removed": item, "items": self.index.num_live}

    def health(self) -> dict[str, Any]:
        m = self.index.match
        return {"status": "ok", "items": self.index.num_live, "dim": self.index.dim,
                "fingerprint": self.index.origin.fingerprint, "writable": self.writable,
                "rerank": self.rerank or "none", "classes": self.index.class_names is not None,
                "match_threshold": None if m is None else m["threshold"],
                "batches": self.batcher.batches, "max_batch": self.batcher.max_batch}


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, f"the upload is {int(declared):,} bytes, the limit is "
                               f"{limit:,}; send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, f"the upload is over the limit of {limit:,} bytes; send a "
                                   f"smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: SearchService):
    """The Starlette application of ``service``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    page = resources.files("nirdml.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def problem(request: Request, exc: HTTPProblem):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def failure(request: Request, exc: Exception):
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        status = 400 if isinstance(exc, NirdmlError) else 500
        return JSONResponse({"error": text}, status_code=status)

    async def index_page(request: Request):
        return HTMLResponse(page)

    async def healthz(request: Request):
        return JSONResponse(service.health())

    async def search(request: Request):
        start = time.perf_counter()
        k = service.parse_k(request.query_params.get("k"))
        rerank = request.query_params.get("rerank", service.rerank)
        if rerank is not None:
            from nirdml.evaluation.rerank import parse_served

            try:
                parse_served(rerank)
            except NirdmlError as exc:
                raise HTTPProblem(400, str(exc)) from None
        body = await read_body(request, service.max_upload_bytes)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                emb = np.asarray(json.loads(body)["embeddings"], dtype=np.float32)
            except (ValueError, KeyError, TypeError):
                raise HTTPProblem(400, 'a JSON query must be {"embeddings": [[...], ...]} '
                                       'with one row of numbers per query') from None
            if emb.ndim != 2 or emb.shape[1] != service.index.dim or not emb.size:
                raise HTTPProblem(400, f"embeddings must have shape (Q, {service.index.dim}), "
                                       f"got {tuple(emb.shape)}")
            try:
                doc = await service.run(service.search, emb, k, rerank)
            except NirdmlError as exc:
                raise HTTPProblem(400, str(exc)) from None
        else:  # an image: embedded and searched in a batch with the other waiting uploads
            doc = await service.batcher.submit((await service.decode(body), k, rerank))
        doc["milliseconds"] = round(1000 * (time.perf_counter() - start), 2)
        return JSONResponse(doc)

    def item_id(request: Request) -> int:
        text = request.path_params["item"]
        if not text.isdigit():
            raise HTTPProblem(404, f"there is no item {text!r}")
        return int(text)

    async def thumbnail(request: Request):
        png = await service.run(service.thumbnail, item_id(request))
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    def require_writable():
        if not service.writable:
            raise HTTPProblem(403, "this index is read-only; start the server with --writable "
                                   "to add or remove items")

    async def add_item(request: Request):
        require_writable()
        name = request.query_params.get("class")
        if not name:
            raise HTTPProblem(400, "name the new item's class: POST /items?class=NAME")
        body = await read_body(request, service.max_upload_bytes)
        image = await service.decode(body)
        try:
            return JSONResponse(await service.run(service.add, body, image, name),
                                status_code=201)
        except NirdmlError as exc:
            raise HTTPProblem(400, str(exc)) from None

    async def delete_item(request: Request):
        require_writable()
        return JSONResponse(await service.run(service.remove, item_id(request)))

    routes = [
        Route("/", index_page),
        Route("/healthz", healthz),
        Route("/search", search, methods=["POST"]),
        Route("/items", add_item, methods=["POST"]),
        Route("/items/{item}", delete_item, methods=["DELETE"]),
        Route("/items/{item}/thumbnail", thumbnail),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPProblem: problem,
                                                       Exception: failure})
    app.state.service = service
    return app


__all__ = ["HTTPProblem", "SearchService", "create_app", "read_body"]
