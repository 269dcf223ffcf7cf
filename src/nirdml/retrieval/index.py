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

An index is written only into a folder nirdml owns (:mod:`nirdml.owned`, kind ``"index"``): a
new or empty folder, an index written before (replaced), or an index of an older nirdml (no
marker, recognised by its ``meta.json``); anything else is refused. ``meta.json`` stores the
gallery paths absolute (an index opened from another working directory finds its files; older
indexes keep the paths they stored) and the sha256 of ``index.faiss`` and ``labels.npy``: a
corrupt or replaced file is refused before faiss or numpy parse it. Every field of ``meta.json``
is type-checked on load, so a damaged index ends in a one-line ConfigError, never in another
exception or a wrong label.

An index that changes after it is built (``nirdml serve --writable``: :meth:`GalleryIndex.add`,
:meth:`GalleryIndex.remove`, then :meth:`GalleryIndex.commit`) keeps its item ids: a removed
item is a tombstone (``meta.json``'s ``deleted``) that searches skip. A commit writes the data
as a new generation (``index.N.faiss``, ``labels.N.npy``, named in ``meta.json``'s ``files``),
then replaces ``meta.json`` atomically -- the commit point --, then removes the previous
generation: a crash at any moment leaves a complete index, the old one or the new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.embeddings import l2_normalize
from nirdml.errors import CheckpointError, ConfigError, InputError
from nirdml.files import atomic_write_bytes
from nirdml.owned import check_folder, claim_folder
from nirdml.retrieval.faiss_index import (
    IndexSpec,
    build_index,
    index_info,
    search_index,
)

INDEX_FILE, META_FILE, LABELS_FILE = "index.faiss", "meta.json", "labels.npy"
#: the data files of a committed generation (the only names besides the three above it writes)
GENERATION_FILE = re.compile(r"^(index|labels)\.[0-9]{1,12}\.(faiss|npy)$")
META_VERSION = 1
OWNED_KIND = "index"  # the kind in the folder's nirdml marker
_MAX_DIM, _MAX_SIZE = 1 << 20, 1 << 40  # sanity bounds for meta.json's dim and size
_HINT = "build one with: nirdml index build --checkpoint CKPT --gallery GALLERY --out DIR"


# ---------------------------------------------------------------------------------- results
@dataclass
class SearchResults:
    """Top-k neighbours of each query: ``ids``, ``scores`` (cosine), ``labels`` ``(Q, k)``.

    ``paths[q][j]`` is the gallery file of hit ``j`` of query ``q`` (``None`` when the gallery
    has no files); ``queries[q]`` names the query (its path) when known. With a calibrated
    ``threshold`` (the index's match decision) every hit says ``same_item``: cosine > it.
    """

    ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    paths: list[list[str | None]]
    queries: list[str | None] = field(default_factory=list)
    class_names: list[str] | None = None
    threshold: float | None = None
    rerank: str = "none"

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
            if self.threshold is not None:
                hit["same_item"] = bool(hit["score"] > self.threshold)
            out.append(hit)
        return out

    def to_dict(self) -> dict[str, Any]:
        names = self.queries or [None] * len(self)
        out = {"k": self.k, "rerank": self.rerank, "match_threshold": self.threshold}
        out["queries"] = [{"query": names[q], "results": self.hits(q)} for q in range(len(self))]
        return out

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

        data = (self.config or {}).get("data")
        image_size = data.get("image_size") if isinstance(data, dict) else None
        return Preprocessing.plain(self.image_kind or image_kind, self.in_chans, image_size,
                                   **self.preprocess)


# ---------------------------------------------------------------------------------- index
class GalleryIndex:
    """A faiss index over L2-normalised gallery embeddings (row i = item i) with the items'
    ``labels``, optional ``paths`` and ``class_names``, the gallery ``source``, the index
    ``spec`` and the :class:`IndexOrigin` of the embeddings; ``match``: the calibrated
    "same item?" threshold (:meth:`calibrate`)."""

    def __init__(self, index, labels: np.ndarray, paths: list[str] | None = None, *,
                 class_names: list[str] | None = None, source: dict[str, Any] | None = None,
                 spec: IndexSpec | None = None, origin: IndexOrigin | None = None,
                 match: dict[str, Any] | None = None):
        self.index = index
        self.match = match  # the calibrated decision (MatchThreshold.to_dict() + "on"), if any
        self.deleted: set[int] = set()  # tombstones: removed item ids (searches skip them)
        self.generation = 0  # of the committed data files (0: index.faiss, labels.npy)
        self._rerankers: dict[str, Any] = {}
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

    # ---- match decision --------------------------------------------------------------------
    def calibrate(self, embeddings: np.ndarray, labels: np.ndarray, fmr: float,
                  on: str | None = None) -> dict[str, Any]:
        """Fit the cosine threshold for false-match rate ``fmr`` on labelled ``embeddings`` of
        other classes than a test set's (the validation classes; ``on`` names them) and keep it
        as this index's match decision; returns the record stored in ``meta.json``."""
        from nirdml.evaluation.verification import fit_threshold

        if np.asarray(embeddings).shape[1:] != (self.dim,):
            raise InputError(f"calibration embeddings must have shape (N, {self.dim}), got "
                             f"{tuple(np.asarray(embeddings).shape)}")
        self.match = {**fit_threshold(embeddings, labels, fmr).to_dict(), "on": on}
        return self.match

    @property
    def threshold(self) -> float | None:
        return None if self.match is None else float(self.match["threshold"])

    def vectors(self) -> np.ndarray:
        """The indexed (normalised) gallery embeddings ``(N, D)``; a flat index only."""
        if self.spec.type != "flat":
            raise ConfigError(f"re-ranking needs the gallery vectors, which a {self.spec.type} "
                              f"index does not keep exactly; build the index with --type flat")
        return self.index.reconstruct_n(0, len(self))

    # ---- search --------------------------------------------------------------------------
    def search(self, embeddings: np.ndarray, k: int = 10,
               names: list[str | None] | None = None, rerank: str | None = None) -> SearchResults:
        """Top-``k`` gallery items for each row of ``embeddings`` ``(Q, D)`` (normalised here);
        ``names`` name the queries in the results; ``rerank``: ``alpha_qe`` or ``dba`` (with
        parameters, ``nirdml.evaluation.rerank``; flat indexes), its gallery side built once."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InputError(f"query embeddings must have shape (Q, {self.dim}), "
                             f"got {tuple(emb.shape)}")
        n = self.num_live
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if k > n:
            raise InputError(f"k={k} is larger than the gallery ({n} items); use k <= {n}")
        spec = "none"
        if rerank is not None and rerank.partition(":")[0].strip().lower() != "none":
            from nirdml.evaluation.rerank import IndexReranker, parse_rerank

            name, params = parse_rerank(rerank)
            spec = name + ":" + ",".join(f"{key}={value}" for key, value in params.items())
            if spec not in self._rerankers:
                live = self.live_ids()
                self._rerankers[spec] = (IndexReranker(spec, self.vectors()[live]), live)
            reranker, live = self._rerankers[spec]
            ids, scores = reranker.search(l2_normalize(emb), int(k))
            ids = live[ids]
        else:
            want = min(int(k) + len(self.deleted), len(self))
            scores, ids = search_index(self.index, l2_normalize(emb), want)
            if self.deleted:  # skip the tombstones, keep the first k others in order
                alive = ~np.isin(ids, np.fromiter(self.deleted, np.int64))
                order = np.argsort(~alive, axis=1, kind="stable")[:, :k]
                ids = np.take_along_axis(ids, order, 1)
                scores = np.take_along_axis(scores, order, 1)
        paths = [[None if self.paths is None else self.paths[i] for i in row] for row in ids]
        return SearchResults(ids, scores.astype(np.float32), self.labels[ids], paths,
                             list(names) if names is not None else [None] * emb.shape[0],
                             self.class_names, self.threshold, spec)

    # ---- changes ---------------------------------------------------------------------------
    @property
    def num_live(self) -> int:
        """Items a search can return (all but the removed ones)."""
        return len(self) - len(self.deleted)

    def live_ids(self) -> np.ndarray:
        keep = np.ones(len(self), bool)
        keep[np.fromiter(self.deleted, np.int64, len(self.deleted))] = False
        return np.flatnonzero(keep)

    def add(self, embeddings: np.ndarray, labels: np.ndarray,
            paths: list[str] | None = None) -> np.ndarray:
        """Append items (a flat index; rows normalised here); returns their new ids. ``paths``
        are required when the index has paths, and refused when it has none."""
        if self.spec.type != "flat":
            raise ConfigError(f"items can be added to a flat index only (this one is "
                              f"{self.spec.type}); rebuild it with --type flat")
        emb = l2_normalize(embeddings)
        if emb.shape[1] != self.dim:
            raise InputError(f"new items must be {self.dim}-d, got {emb.shape[1]}-d")
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.shape[0] != emb.shape[0]:
            raise InputError(f"{emb.shape[0]} items but {labels.shape[0]} labels")
        if (paths is None) != (self.paths is None) or (paths is not None
                                                       and len(paths) != emb.shape[0]):
            raise InputError("new items need one path each exactly when the index has paths")
        first = len(self)
        self.index.add(emb)
        self.labels = np.concatenate([self.labels, labels])
        if paths is not None:
            self.paths = [*self.paths, *map(str, paths)]
        self._rerankers.clear()
        return np.arange(first, len(self))

    def label_of(self, name: str) -> int:
        """The label of class ``name``, a new one (appended to ``class_names``) if unknown;
        an index without class names takes integer labels (as text)."""
        if self.class_names is None:
            try:
                return int(name)
            except ValueError:
                raise InputError(f"this index has integer labels, not class names; got "
                                 f"{name!r}") from None
        names = [str(c) for c in self.class_names]
        if name not in names:
            self.class_names = [*self.class_names, name]
            return len(self.class_names) - 1
        return names.index(name)

    def remove(self, item: int) -> None:
        """Remove item ``item`` (a tombstone: ids stay stable); InputError if there is none."""
        if isinstance(item, bool) or not 0 <= int(item) < len(self) or int(item) in self.deleted:
            raise InputError(f"there is no item {item} in this index")
        self.deleted.add(int(item))
        self._rerankers.clear()

    def commit(self, index_dir: str | os.PathLike) -> Path:
        """Persist the changed index into its folder (an index nirdml wrote) as a new
        generation, crash-safe (module docstring)."""
        import faiss

        out = Path(index_dir)
        claim_folder(out, OWNED_KIND, "index directory", legacy=_is_legacy_index(out))
        old = _data_files(out)
        gen = self.generation + 1
        names = {"index": f"index.{gen}.faiss", "labels": f"labels.{gen}.npy"}
        try:
            index_bytes = faiss.serialize_index(self.index).tobytes()
            labels = io.BytesIO()
            np.save(labels, self.labels)
            atomic_write_bytes(out / names["index"], index_bytes)
            atomic_write_bytes(out / names["labels"], labels.getvalue())
            checksums = {INDEX_FILE: hashlib.sha256(index_bytes).hexdigest(),
                         LABELS_FILE: hashlib.sha256(labels.getvalue()).hexdigest()}
            meta = self.meta(checksums)
            meta["files"], meta["generation"] = names, gen
            atomic_write_bytes(out / META_FILE, json.dumps(meta, indent=1).encode())
        except OSError as exc:
            raise ConfigError(f"cannot write the index to {str(out)!r}: {exc}") from exc
        self.generation = gen
        _remove_stale(out, keep=set(names.values()), also=old)
        return out

    # ---- persistence ---------------------------------------------------------------------
    def meta(self, checksums: dict[str, str] | None = None) -> dict[str, Any]:
        """The content of ``meta.json`` (gallery paths absolute where they name files relative
        to the working directory; ``checksums``: sha256 of the index's other files)."""
        o = self.origin
        meta = {
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
            "paths": _absolute_paths(self.paths),
            "config": o.config,
            "match": self.match,
            "deleted": sorted(self.deleted),
        }
        if checksums is not None:
            meta["checksums"] = checksums
        return meta

    def save(self, index_dir: str | os.PathLike, option: str = "index directory") -> Path:
        """Write ``index.faiss``, ``labels.npy`` and (last) ``meta.json`` into ``index_dir``: a
        new or empty folder, or an index nirdml wrote (replaced); any other folder or a file is
        refused with a ConfigError naming ``option``, before anything is written."""
        import faiss

        out = Path(index_dir)
        claim_folder(out, OWNED_KIND, option, legacy=_is_legacy_index(out))
        try:
            (out / META_FILE).unlink(missing_ok=True)  # the directory is unfinished until the end
            index_bytes = faiss.serialize_index(self.index).tobytes()
            labels = io.BytesIO()
            np.save(labels, self.labels)
            labels_bytes = labels.getvalue()
            atomic_write_bytes(out / INDEX_FILE, index_bytes)
            atomic_write_bytes(out / LABELS_FILE, labels_bytes)
            checksums = {INDEX_FILE: hashlib.sha256(index_bytes).hexdigest(),
                         LABELS_FILE: hashlib.sha256(labels_bytes).hexdigest()}
            atomic_write_bytes(out / META_FILE,
                               json.dumps(self.meta(checksums), indent=1).encode())
        except OSError as exc:
            raise ConfigError(f"cannot write the index to {str(out)!r}: {exc}") from exc
        self.generation = 0
        _remove_stale(out, keep={INDEX_FILE, LABELS_FILE})
        return out

    @classmethod
    def load(cls, index_dir: str | os.PathLike) -> GalleryIndex:
        """Open an index directory (ConfigError, naming the fix, when it is missing,
        unfinished, of another format, corrupt or inconsistent)."""
        folder = Path(index_dir)
        meta = _read_meta(folder)
        files = _files(meta)
        verified = _verify_checksums(folder, meta.get("checksums"), files)
        labels = _read_labels(folder / files[LABELS_FILE], meta["size"])
        index = _read_index(folder / files[INDEX_FILE], meta, verified)
        paths = meta.get("paths")
        sizes = {index.ntotal, labels.shape[0], meta["size"]}
        if len(sizes) != 1 or (paths is not None and len(paths) != index.ntotal) \
                or index.d != meta["dim"]:
            raise ConfigError(f"{str(folder)!r} is inconsistent (index {index.ntotal}x{index.d}, "
                              f"{labels.shape[0]} labels, meta size {meta['size']}, "
                              f"dim {meta['dim']}); rebuild it")
        names = meta.get("class_names")
        if names is not None and labels.size and (labels.min() < 0
                                                  or labels.max() >= len(names)):
            raise ConfigError(f"{str(folder)!r} is inconsistent (labels "
                              f"{labels.min()}..{labels.max()} for {len(names)} class names); "
                              f"rebuild it")
        spec = IndexSpec(**{k: v for k, v in (meta.get("index") or {}).items()
                            if k in IndexSpec.__dataclass_fields__})
        deleted = meta.get("deleted") or []
        if any(not 0 <= d < index.ntotal for d in deleted):
            raise ConfigError(f"{str(folder)!r} is inconsistent (a removed item id is not in "
                              f"the index); rebuild it")
        out = cls(index, labels, paths, class_names=names, source=meta.get("gallery"),
                  spec=spec, origin=IndexOrigin.from_meta(meta), match=meta.get("match"))
        out.deleted, out.generation = set(deleted), int(meta.get("generation") or 0)
        return out


# ---------------------------------------------------------------------------------- folders
def _absolute_paths(paths: list[str] | None) -> list[str] | None:
    """``paths`` with every relative one that names an existing file (from the working
    directory) made absolute; others (e.g. names from an ``.npz``) are kept as they are."""
    if paths is None:
        return None
    return [p if os.path.isabs(p) or not os.path.lexists(p) else os.path.abspath(p)
            for p in map(str, paths)]


def _files(meta: dict[str, Any]) -> dict[str, str]:
    """The data file of each role (keyed by the generation-0 names) ``meta.json`` names."""
    named = meta.get("files") or {}
    return {INDEX_FILE: named.get("index", INDEX_FILE),
            LABELS_FILE: named.get("labels", LABELS_FILE)}


def _data_files(folder: Path) -> set[str]:
    """The data files of the index ``folder`` holds now (none when it holds none)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        return set(_files(meta).values()) if isinstance(meta, dict) and \
            _is_files(meta.get("files", {})) else set()
    except (OSError, ValueError, RecursionError, AttributeError):
        return set()


def _remove_stale(folder: Path, keep: set[str], also: Iterable[str] = ()) -> None:
    """Remove the data files of earlier generations (names nirdml writes, in a folder it
    owns), and the generation-0 files in ``also``, but never one in ``keep``."""
    stale = {p.name for p in folder.iterdir() if GENERATION_FILE.match(p.name)}
    stale |= {name for name in also if name in (INDEX_FILE, LABELS_FILE)}
    for name in stale - keep:
        (folder / name).unlink(missing_ok=True)


def _is_legacy_index(folder: Path) -> bool:
    """Whether ``folder`` holds an index of an older nirdml: no marker, but a ``meta.json``
    that is recognisably an index's (its format version, dim, size and metric)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("format_version"), int)
            and isinstance(meta.get("dim"), int) and isinstance(meta.get("size"), int)
            and str(meta.get("metric", "")).startswith("inner_product"))


def check_index_folder(folder: str | os.PathLike, option: str = "index directory") -> bool:
    """ConfigError unless an index may be written to ``folder`` (nothing is written): True
    when it holds an index already (to be replaced), False when it is new or empty."""
    folder = Path(folder)
    return check_folder(folder, OWNED_KIND, option, legacy=_is_legacy_index(folder))


def _read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(f"index directory {str(folder)!r} does not exist; {_HINT}")
    if not (folder / META_FILE).is_file():
        raise ConfigError(f"{str(folder)!r} is not a (complete) index directory: missing "
                          f"{META_FILE}; {_HINT}")
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{str(folder / META_FILE)!r} is unreadable ({text}); "
                          f"rebuild the index") from None
    if meta.get("format_version") != META_VERSION:
        raise ConfigError(f"{str(folder)!r} has index format {meta.get('format_version')!r}, "
                          f"this nirdml reads format {META_VERSION}; rebuild it")
    _check_meta_types(meta, folder / META_FILE)
    missing = [f for f in _files(meta).values() if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{str(folder)!r} is not a (complete) index directory: missing "
                          f"{', '.join(missing)}; {_HINT}")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | float) or _is_int(value)


def _optional(check):
    return lambda value: value is None or check(value)


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def _is_input_size(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(_is_int(v) and 0 < v <= _MAX_DIM for v in value))


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, str) if k == "type" else v is None or _is_int(v)
        for k, v in value.items() if k in IndexSpec.__dataclass_fields__)


def _is_preprocess(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("invert", False), bool) \
        and _optional(_is_input_size)(value.get("input_size"))


def _is_match(value: Any) -> bool:
    numbers = ("target_fmr", "threshold", "fmr", "fnmr")
    return isinstance(value, dict) and all(
        isinstance(value.get(f), int | float) and not isinstance(value.get(f), bool)
        and math.isfinite(value[f]) for f in numbers) and 0 < value["target_fmr"] < 1


def _is_files(value: Any) -> bool:
    return isinstance(value, dict) and set(value) <= {"index", "labels"} and all(
        isinstance(v, str) and GENERATION_FILE.match(v) and v.startswith(k)
        for k, v in value.items())


def _is_checksums(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(f), str)
                                           for f in (INDEX_FILE, LABELS_FILE))


# field of meta.json -> (check, what it must be); every field may be absent but size and dim
_META_FIELDS = {
    "size": (lambda v: _is_int(v) and 0 <= v <= _MAX_SIZE, "a non-negative integer"),
    "dim": (lambda v: _is_int(v) and 0 < v <= _MAX_DIM, "a positive integer"),
    "index": (_optional(_is_spec), "an object of index parameters"),
    "checkpoint": (_optional(lambda v: isinstance(v, str)), "a path or null"),
    "fingerprint": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "image_kind": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "in_chans": (_optional(lambda v: _is_int(v) and v > 0), "a positive integer or null"),
    "preprocess": (_optional(_is_preprocess), "an object (invert, input_size)"),
    "gallery": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "class_names": (_optional(_list_of(_is_scalar)), "a list of names or null"),
    "paths": (_optional(_list_of(lambda v: isinstance(v, str))), "a list of paths or null"),
    "config": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "match": (_optional(_is_match), "an object (target_fmr, threshold, fmr, fnmr) or null"),
    "deleted": (_optional(_list_of(lambda v: _is_int(v) and v >= 0)),
                "a list of item ids or null"),
    "files": (_optional(_is_files), "an object naming index.N.faiss and labels.N.npy"),
    "generation": (_optional(lambda v: _is_int(v) and v >= 0), "a non-negative integer"),
    "checksums": (_optional(_is_checksums), f"an object with {INDEX_FILE} and {LABELS_FILE}"),
}


def _check_meta_types(meta: dict[str, Any], path: Path) -> None:
    """ConfigError naming the first field of ``meta`` of the wrong type."""
    for key, (check, what) in _META_FIELDS.items():
        if (key in meta or key in ("size", "dim")) and not check(meta.get(key)):
            shown = json.dumps(meta.get(key))
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ConfigError(f"{str(path)!r}: field {key!r} must be {what}, got {shown}; the "
                              f"index is damaged: rebuild it")


def _verify_checksums(folder: Path, checksums: dict[str, str] | None,
                      files: dict[str, str]) -> bool:
    """Compare the index's files (``files``: role -> file name) with the sha256 meta.json
    recorded (ConfigError on a mismatch); False when it has none (an older nirdml's index)."""
    if checksums is None:
        return False
    for role in (INDEX_FILE, LABELS_FILE):
        name = files[role]
        try:
            with open(folder / name, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as exc:
            raise ConfigError(f"{str(folder / name)!r} cannot be read "
                              f"({exc.strerror or exc}); rebuild the index") from None
        if digest != checksums[role]:
            raise ConfigError(f"{str(folder / name)!r} does not match the checksum in "
                              f"{META_FILE} (corrupt or replaced); rebuild the index")
    return True


def _check_legacy_flat(path: Path, meta: dict[str, Any]) -> None:
    """ConfigError unless the unverified faiss file of a flat index is exactly what faiss wrote
    for ``meta``'s size and dim: a damaged size field could make faiss allocate gigabytes."""
    import faiss

    n, d = meta["size"], meta["dim"]
    empty = faiss.serialize_index(faiss.IndexFlatIP(d)).tobytes()
    code_bytes = 4 * d * n  # float32 vectors; faiss records their count in floats
    header = empty[:8] + struct.pack("<q", n) + empty[16:-8] + struct.pack("<Q", d * n)
    try:
        with open(path, "rb") as fh:
            start = fh.read(len(header))
        total = path.stat().st_size
    except OSError as exc:
        raise ConfigError(f"{str(path)!r} cannot be read ({exc.strerror or exc}); rebuild the "
                          f"index") from None
    if start != header or total != len(header) + code_bytes:
        raise ConfigError(f"{str(path)!r} is not the flat faiss index of {n} x {d} its "
                          f"{META_FILE} describes (corrupt); rebuild the index")


def _read_index(path: Path, meta: dict[str, Any], verified: bool):
    import faiss

    if not verified and (meta.get("index") or {}).get("type", "flat") == "flat":
        _check_legacy_flat(path, meta)
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError, OSError) as exc:
        raise ConfigError(f"{str(path)!r} is not a readable faiss index "
                          f"({str(exc).splitlines()[0] if str(exc) else 'corrupt'}); "
                          f"rebuild it") from None


def _read_labels(path: Path, size: int) -> np.ndarray:
    """The int64 labels of ``labels.npy`` (``path``): a 1-d integer array of ``size``
    entries, its header checked before any data is read."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else \
                fmt.read_array_header_2_0
            shape, _, dtype = read_header(fh)
            if dtype.kind not in "iu" or len(shape) != 1 or shape[0] != size:
                raise ValueError(f"expected {size} integer labels, found {dtype} of shape "
                                 f"{shape}")
            if path.stat().st_size - fh.tell() != size * dtype.itemsize:
                raise ValueError("its length does not match its header")
            labels = np.fromfile(fh, dtype=dtype, count=size)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many types
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{str(path)!r} is unreadable ({text}); rebuild the index") from None
    return labels.astype(np.int64)


__all__ = ["GalleryIndex", "IndexOrigin", "SearchResults", "check_index_folder"]
