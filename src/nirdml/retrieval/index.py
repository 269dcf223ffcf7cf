"""``GalleryIndex``: a gallery's embeddings in a faiss index, with labels, paths and its meta.

An index directory holds three files::

    INDEX_DIR/index.faiss   the faiss index (row i = gallery item i)
    INDEX_DIR/labels.npy    int64 gallery labels
    INDEX_DIR/meta.json     paths, class names, index parameters, the gallery source, and what
                            made the embeddings (:class:`IndexOrigin`: the checkpoint path, the
                            model fingerprint -- sha256 of its weights + embedding dim --, the
                            image preprocessing and the run's config)

``meta.json`` is written last (every file atomically), so a directory without it is an
unfinished index. The index knows nothing about models or images: the origin is stored and read
back as it is; :class:`~nirdml.retrieval.retriever.Retriever` checks it against a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.embeddings import l2_normalize
from nirdml.errors import CheckpointError, ConfigError, InputError
from nirdml.files import atomic_write_bytes
from nirdml.retrieval.faiss_index import (
    IndexSpec,
    build_index,
    index_info,
    search_index,
)

INDEX_FILE, META_FILE, LABELS_FILE = "index.faiss", "meta.json", "labels.npy"
META_VERSION = 1
_HINT = "build one with: nirdml index build --checkpoint CKPT --gallery GALLERY --out DIR"


# ---------------------------------------------------------------------------------- results
@dataclass
class SearchResults:
    """Top-k neighbours of each query: ``ids``, ``scores`` (cosine), ``labels`` ``(Q, k)``.

    ``paths[q][j]`` is the gallery file of hit ``j`` of query ``q`` (``None`` when the gallery
    has no files); ``queries[q]`` names the query (its path) when known.
    """

    ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    paths: list[list[str | None]]
    queries: list[str | None] = field(default_factory=list)
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def hits(self, q: int) -> list[dict[str, Any]]:
        """The results of query ``q`` as a list of dicts (rank 1 first)."""
        out = []
        for j in range(self.k):
            label = int(self.labels[q, j])
            hit = {"rank": j + 1, "id": int(self.ids[q, j]), "score": float(self.scores[q, j]),
                   "label": label, "path": self.paths[q][j]}
            if self.class_names is not None:
                hit["class"] = self.class_names[label]
            out.append(hit)
        return out

    def to_dict(self) -> dict[str, Any]:
        names = self.queries or [None] * len(self)
        return {"k": self.k, "queries": [{"query": names[q], "results": self.hits(q)}
                                         for q in range(len(self))]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------------------------- origin
def _no_preprocess() -> dict[str, Any]:
    return {"invert": False, "input_size": None}


@dataclass
class IndexOrigin:
    """What made the embeddings, saved in ``meta.json``: the checkpoint path, the model
    fingerprint, the image kind and channels, ``preprocess`` (``invert``, ``input_size``) and
    the run's config (a dict)."""

    checkpoint: str | None = None
    fingerprint: str | None = None
    image_kind: str | None = None
    in_chans: int | None = None
    preprocess: dict[str, Any] = field(default_factory=_no_preprocess)
    config: dict[str, Any] | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> IndexOrigin:
        prep = meta.get("preprocess") or {}
        return cls(meta.get("checkpoint"), meta.get("fingerprint"), meta.get("image_kind"),
                   meta.get("in_chans"), {"invert": bool(prep.get("invert", False)),
                                          "input_size": prep.get("input_size")},
                   meta.get("config"))

    def record(self, prep) -> None:
        """Store what a :class:`~nirdml.data.preprocessing.Preprocessing` record says about
        the images: its image kind, channels, ``invert`` and ``input_size``."""
        size = None if prep.input_size is None else [int(v) for v in prep.input_size]
        self.image_kind, self.in_chans = prep.image_kind, prep.in_chans
        self.preprocess = {"invert": bool(prep.invert), "input_size": size}

    def preprocessing(self, image_kind: str | None = None):
        """The stored preprocessing as a record without input statistics (``image_kind`` when
        the index has none; the image size is the stored config's)."""
        from nirdml.data.preprocessing import Preprocessing

        image_size = ((self.config or {}).get("data") or {}).get("image_size")
        return Preprocessing.plain(self.image_kind or image_kind, self.in_chans, image_size,
                                   **self.preprocess)


# ---------------------------------------------------------------------------------- index
class GalleryIndex:
    """A faiss index over L2-normalised gallery embeddings (row i = item i) with the items'
    ``labels``, optional ``paths`` and ``class_names``, the gallery ``source``, the index
    ``spec`` and the :class:`IndexOrigin` of the embeddings."""

    def __init__(self, index, labels: np.ndarray, paths: list[str] | None = None, *,
                 class_names: list[str] | None = None, source: dict[str, Any] | None = None,
                 spec: IndexSpec | None = None, origin: IndexOrigin | None = None):
        self.index = index
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = paths
        self.class_names = class_names
        self.source = source or {}
        self.spec = spec or IndexSpec(**index_info(index))
        self.origin = origin or IndexOrigin()

    @classmethod
    def build(cls, embeddings: np.ndarray, labels: np.ndarray, paths: list[str] | None = None, *,
              class_names: list[str] | None = None, source: dict[str, Any] | None = None,
              spec: IndexSpec | str = "flat", seed: int = 0,
              origin: IndexOrigin | None = None) -> GalleryIndex:
        """Index ``embeddings`` ``(N, D)`` (L2-normalised here) as ``spec`` (or an index type
        name) says; ``seed`` fixes the training of IVF types."""
        spec = spec if isinstance(spec, IndexSpec) else IndexSpec(type=spec)
        index, spec = build_index(l2_normalize(embeddings), spec, seed=seed)
        return cls(index, labels, paths, class_names=class_names, source=source, spec=spec,
                   origin=origin)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def require_model(self, fingerprint: str, dim: int, checkpoint) -> None:
        """CheckpointError unless the model of ``checkpoint`` (its ``fingerprint`` and
        embedding ``dim``) made this index's embeddings: others are not comparable."""
        known = self.origin.fingerprint
        if known is not None and fingerprint != known:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} is not the model this index was built with "
                f"(fingerprint {fingerprint[:12]} != {known[:12]}); its embeddings are not "
                f"comparable with the index: rebuild the index with this checkpoint, or use "
                f"{self.origin.checkpoint!r}")
        if dim != self.dim:
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} embeds into {dim} "
                                  f"dimensions, the index holds {self.dim}")

    # ---- search --------------------------------------------------------------------------
    def search(self, embeddings: np.ndarray, k: int = 10,
               names: list[str | None] | None = None) -> SearchResults:
        """Top-``k`` gallery items for each row of ``embeddings`` ``(Q, D)`` (normalised here);
        ``names`` name the queries in the results."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InputError(f"query embeddings must have shape (Q, {self.dim}), "
                             f"got {tuple(emb.shape)}")
        n = len(self)
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if k > n:
            raise InputError(f"k={k} is larger than the gallery ({n} items); use k <= {n}")
        scores, ids = search_index(self.index, l2_normalize(emb), int(k))
        paths = [[None if self.paths is None else self.paths[i] for i in row] for row in ids]
        return SearchResults(ids, scores.astype(np.float32), self.labels[ids], paths,
                             list(names) if names is not None else [None] * emb.shape[0],
                             self.class_names)

    # ---- persistence ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The content of ``meta.json``."""
        o = self.origin
        return {
            "format_version": META_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "size": len(self),
            "dim": self.dim,
            "metric": "inner_product (cosine of L2-normalised embeddings)",
            "index": self.spec.to_dict(),
            "checkpoint": o.checkpoint,
            "fingerprint": o.fingerprint,
            "image_kind": o.image_kind,
            "in_chans": o.in_chans,
            "preprocess": o.preprocess,
            "gallery": self.source,
            "class_names": self.class_names,
            "paths": self.paths,
            "config": o.config,
        }

    def save(self, index_dir: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``labels.npy`` and (last) ``meta.json`` into ``index_dir``."""
        import faiss

        out = Path(index_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / META_FILE).unlink(missing_ok=True)  # the directory is unfinished until the end
            atomic_write_bytes(out / INDEX_FILE, faiss.serialize_index(self.index).tobytes())
            labels = io.BytesIO()
            np.save(labels, self.labels)
            atomic_write_bytes(out / LABELS_FILE, labels.getvalue())
            atomic_write_bytes(out / META_FILE, json.dumps(self.meta(), indent=1).encode())
        except OSError as exc:
            raise ConfigError(f"cannot write the index to {str(out)!r}: {exc}") from exc
        return out

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> GalleryIndex:
        """Open an index directory (ConfigError, naming the fix, when it is missing,
        unfinished, of another format, corrupt or inconsistent)."""
        folder = Path(index_dir)
        meta = _read_meta(folder)
        index, labels = _read_index(folder), _read_labels(folder)
        paths = meta.get("paths")
        sizes = {index.ntotal, labels.shape[0], meta.get("size")}
        if len(sizes) != 1 or (paths is not None and len(paths) != index.ntotal) \
                or index.d != meta.get("dim"):
            raise ConfigError(f"{str(folder)!r} is inconsistent (index {index.ntotal}x{index.d}, "
                              f"{labels.shape[0]} labels, meta size {meta.get('size')}, "
                              f"dim {meta.get('dim')}); rebuild it")
        spec = IndexSpec(**{k: v for k, v in (meta.get("index") or {}).items()
                            if k in IndexSpec.__dataclass_fields__})
        return cls(index, labels, paths, class_names=meta.get("class_names"),
                   source=meta.get("gallery"), spec=spec, origin=IndexOrigin.from_meta(meta))


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(f"index directory {str(folder)!r} does not exist; {_HINT}")
    missing = [f for f in (META_FILE, INDEX_FILE, LABELS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{str(folder)!r} is not a (complete) index directory: missing "
                          f"{', '.join(missing)}; {_HINT}")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(folder / META_FILE)!r} is unreadable: {exc}") from None
    if meta.get("format_version") != META_VERSION:
        raise ConfigError(f"{str(folder)!r} has index format {meta.get('format_version')}, "
                          f"this nirdml reads format {META_VERSION}; rebuild it")
    return meta


def _read_index(folder: Path):
    import faiss

    try:
        return faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as exc:
        raise ConfigError(f"{str(folder / INDEX_FILE)!r} is not a readable faiss index "
                          f"({str(exc).splitlines()[0] if str(exc) else 'corrupt'}); "
                          f"rebuild it") from None


def _read_labels(folder: Path) -> np.ndarray:
    try:
        return np.load(folder / LABELS_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(folder / LABELS_FILE)!r} is unreadable: {exc}") from None


__all__ = ["GalleryIndex", "IndexOrigin", "SearchResults"]
