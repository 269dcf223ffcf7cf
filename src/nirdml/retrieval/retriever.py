"""``Retriever``: a trained model plus a faiss index over a gallery, answering image queries.

An index directory holds three files::

    INDEX_DIR/index.faiss   the faiss index (row i = gallery item i)
    INDEX_DIR/labels.npy    int64 gallery labels
    INDEX_DIR/meta.json     paths, class names, index parameters, the checkpoint path, the model
                            fingerprint (sha256 of its weights + embedding dim) and its config

``meta.json`` is written last, so a directory without it is an unfinished index. Loading checks
the fingerprint of the checkpoint against the one the index was built with: embeddings of a
different model are not comparable, so a mismatch is an error, never a silent wrong answer.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.data.images import (
    ImageFileDataset,
    collate_skipping_bad,
    list_image_folder,
    load_image,
)
from nirdml.data.preprocessing import ImagePrep, Preprocessing
from nirdml.errors import CheckpointError, ConfigError, InputError, NirdmlError
from nirdml.retrieval.faiss_index import (
    IndexSpec,
    build_index,
    index_info,
    l2_normalize,
    search_index,
)
from nirdml.retrieval.fingerprint import model_fingerprint

INDEX_FILE, META_FILE, LABELS_FILE = "index.faiss", "meta.json", "labels.npy"
META_VERSION = 1
SPLITS = ("train", "val", "test")


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


# ---------------------------------------------------------------------------------- gallery
@dataclass
class Gallery:
    """Embedded gallery: unit-norm ``embeddings`` ``(N, D)``, int ``labels``, optional paths."""

    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str] | None = None
    class_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)


def parse_gallery(spec: str | os.PathLike) -> tuple[str, str]:
    """``split:NAME`` -> ("split", NAME); a folder -> ("folder", path); ``*.npz`` -> ("npz", ..)."""
    text = os.fspath(spec)
    if text.startswith("split:"):
        name = text.split(":", 1)[1]
        if name not in SPLITS:
            raise ConfigError(f"gallery {text!r}: split must be one of {', '.join(SPLITS)}")
        return "split", name
    if text.lower().endswith(".npz"):
        if not Path(text).is_file():
            raise InputError(f"gallery embeddings file {text!r} does not exist")
        return "npz", text
    if Path(text).is_dir():
        return "folder", text
    raise ConfigError(f"gallery {text!r} is neither split:train|val|test, an existing folder of "
                      f"images, nor an embeddings .npz file")


def read_embeddings_npz(path: str | os.PathLike, dim: int | None = None) -> Gallery:
    """Read ``embeddings`` (N, D), ``labels`` (N,) and optional ``paths`` (N,) from an npz."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read embeddings file {str(path)!r}: {exc}") from None
    for key in ("embeddings", "labels"):
        if key not in arrays:
            raise InputError(f"embeddings file {str(path)!r} has no {key!r} array "
                             f"(found: {', '.join(sorted(arrays)) or 'nothing'})")
    emb, labels = arrays["embeddings"], arrays["labels"]
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise InputError(f"{str(path)!r}: embeddings must be a float (N, D) array, "
                         f"got {emb.dtype} {emb.shape}")
    if labels.shape != (emb.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{str(path)!r}: labels must be {emb.shape[0]} integers, "
                         f"got {labels.dtype} {labels.shape}")
    if dim is not None and emb.shape[1] != dim:
        raise InputError(f"{str(path)!r} holds {emb.shape[1]}-d embeddings but the model "
                         f"embeds into {dim} dimensions: they come from another model")
    if not np.isfinite(emb).all():
        raise InputError(f"{str(path)!r}: embeddings contain NaN or inf")
    paths = None
    if "paths" in arrays:
        p = arrays["paths"]
        if p.shape != (emb.shape[0],):
            raise InputError(f"{str(path)!r}: paths must have {emb.shape[0]} entries")
        paths = [str(x) for x in p]
    return Gallery(l2_normalize(emb), labels.astype(np.int64), paths, None,
                   {"kind": "npz", "value": str(Path(path).resolve())})


def dataset_preprocessing(dataset, invert_files: bool = False) -> dict[str, Any]:
    """What the dataset does to its files beyond the eval transform: ``invert`` (Omniglot, from
    any source) and the ``input_size`` (H, W) its samples reach the model with (for checkpoints
    without a preprocessing record)."""
    prep: dict[str, Any] = {"invert": bool(invert_files or getattr(dataset, "invert", False)),
                            "input_size": None}
    if len(dataset):
        prep["input_size"] = [int(s) for s in dataset[0][0].shape[-2:]]
    return prep


def probe_preprocessing(cfg) -> dict[str, Any] | None:
    """:func:`dataset_preprocessing` of the test split of ``cfg``'s dataset (None if absent)."""
    from nirdml.training import builders

    try:
        splits = builders.build_splits(cfg)
        return dataset_preprocessing(splits.test, splits.invert_files)
    except (NirdmlError, OSError):
        return None


class UnusualQueryWarning(UserWarning):
    """A query image's statistics are far from the training images' (e.g. inverted)."""


# ---------------------------------------------------------------------------------- retriever
class Retriever:
    """Embeds query images with a trained model and searches a gallery index.

    Build one with :meth:`from_checkpoint`, save it with :meth:`save`, and reopen it with
    :meth:`load`; ``search(queries, k)`` returns :class:`SearchResults`.
    """

    def __init__(self, index, labels: np.ndarray, paths: list[str] | None = None, *,
                 class_names: list[str] | None = None, spec: IndexSpec | None = None,
                 model: torch.nn.Module | None = None, config=None,
                 checkpoint: str | None = None, fingerprint: str | None = None,
                 image_kind: str | None = None, in_chans: int | None = None,
                 source: dict[str, Any] | None = None, batch_size: int = 64,
                 num_workers: int = 0, invert: bool = False,
                 input_size: Sequence[int] | None = None):
        self.index = index
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = paths
        self.class_names = class_names
        self.spec = spec or (IndexSpec(**index_info(index)) if index is not None else IndexSpec())
        self.model = model
        self.config = config
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.image_kind = image_kind
        self.in_chans = in_chans
        self.source = source or {}
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.invert = invert
        self.input_size = None if input_size is None else [int(v) for v in input_size]
        self.preprocessing: Preprocessing | None = None  # the checkpoint's record, if any
        self._prep: ImagePrep | None = None

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, gallery: str | os.PathLike | Gallery,
                        index: str | IndexSpec = "flat", *, device: str = "auto",
                        batch_size: int | None = None, num_workers: int | None = None,
                        data_root: str | None = None, on_error: str | None = None,
                        seed: int = 0) -> Retriever:
        """Load ``checkpoint``, embed ``gallery`` (``split:test``, a folder, an ``.npz`` or a
        :class:`Gallery`) and index it (``index``: ``flat``, ``ivf``, ``ivfpq`` or a spec)."""
        from nirdml.training.inference import load_trained_model

        model, cfg, state = load_trained_model(checkpoint, device)
        if data_root is not None:
            cfg.data.root = data_root
        retriever = cls(
            None, np.zeros(0, np.int64), model=model, config=cfg,
            checkpoint=str(Path(checkpoint).resolve()), fingerprint=model_fingerprint(model),
            image_kind=state.get("image_kind"),
            in_chans=state.get("in_chans") or getattr(model, "in_chans", None),
            batch_size=batch_size or cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers if num_workers is None else num_workers)
        retriever._use_recorded_preprocessing(state)
        if not (isinstance(gallery, str | os.PathLike) and parse_gallery(gallery)[0] == "split"):
            retriever._learn_preprocessing()  # the split gallery does it itself
        if not isinstance(gallery, Gallery):
            gallery = retriever.embed_gallery(gallery, on_error=on_error or cfg.data.on_error)
        retriever._set_gallery(gallery, index if isinstance(index, IndexSpec)
                               else IndexSpec(type=index), seed)
        return retriever

    def _set_gallery(self, gallery: Gallery, spec: IndexSpec, seed: int = 0) -> None:
        emb = l2_normalize(gallery.embeddings)
        if self.model is not None and emb.shape[1] != self.model.embedding_dim:
            raise InputError(f"gallery embeddings are {emb.shape[1]}-d, the model's are "
                             f"{self.model.embedding_dim}-d")
        self.index, self.spec = build_index(emb, spec, seed=seed)
        self.labels = np.asarray(gallery.labels, dtype=np.int64)
        self.paths = gallery.paths
        self.class_names = gallery.class_names
        self.source = gallery.source

    def embed_gallery(self, spec: str | os.PathLike, on_error: str = "skip") -> Gallery:
        """Embed ``split:NAME`` of the checkpoint's dataset, a folder of images, or read an npz."""
        kind, value = parse_gallery(spec)
        if kind == "npz":
            return read_embeddings_npz(value, self._require_model().embedding_dim)
        if kind == "folder":
            return self._embed_folder(value, on_error)
        return self._embed_split(value)

    def _embed_split(self, split: str) -> Gallery:
        from nirdml.data import build_transforms
        from nirdml.training import builders

        model, cfg = self._require_model(), self.config
        splits = builders.build_splits(cfg)
        dataset = getattr(splits, split, None)
        if dataset is None:
            raise ConfigError(f"split {split!r} is empty for dataset {cfg.data.name!r} "
                              f"(data.val_fraction={cfg.data.val_fraction})")
        if split == "train":
            dataset.transform = build_transforms(splits.image_kind, train=False,
                                                 image_size=cfg.data.image_size)
        if self.preprocessing is None:  # an old checkpoint without its record
            self._set_preprocessing(dataset_preprocessing(dataset, splits.invert_files))
        emb = builders.embed_dataset(model, dataset, self.device, batch_size=self.batch_size,
                                     num_workers=self.num_workers)
        rows = np.arange(len(dataset))
        if emb.is_gallery is not None:  # In-Shop style: index the gallery part only
            rows = np.flatnonzero(np.asarray(emb.is_gallery, dtype=bool))
        paths = getattr(dataset, "paths", None)
        names = getattr(dataset, "class_names", None)
        return Gallery(emb.embeddings[rows], np.asarray(emb.labels)[rows],
                       None if paths is None else [str(paths[i]) for i in rows],
                       None if names is None else [str(c) for c in names],
                       {"kind": "split", "value": split, "dataset": cfg.data.name})

    def _embed_folder(self, folder: str, on_error: str) -> Gallery:
        paths, class_names, labels = list_image_folder(folder)
        emb, kept, bad = self._embed_files(paths, skip_bad=on_error != "fail")
        if not kept:
            raise InputError(f"none of the {len(paths)} images in {folder!r} could be decoded")
        source = {"kind": "folder", "value": str(Path(folder).resolve())}
        if bad:
            source["skipped"] = [paths[i] for i in bad]
        return Gallery(emb, np.asarray(labels, np.int64)[kept], [paths[i] for i in kept],
                       class_names, source)

    # ---- embedding -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self._require_model().parameters()).device

    @property
    def dim(self) -> int:
        return int(self._require_index().d)

    def __len__(self) -> int:
        return int(self._require_index().ntotal)

    def _require_index(self):
        if self.index is None:
            raise ConfigError("this Retriever has no gallery index yet")
        return self.index

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise ConfigError("this Retriever was loaded without its model; embedding images "
                              "needs the checkpoint (Retriever.load(..., load_model=True))")
        return self.model

    def _use_recorded_preprocessing(self, state: dict[str, Any]) -> None:
        """Take the checkpoint's preprocessing record (``nirdml.data.preprocessing``)."""
        record = state.get("preprocessing")
        if record is None:
            return
        self.preprocessing = Preprocessing.from_dict(record)
        self._set_preprocessing({"invert": self.preprocessing.invert,
                                 "input_size": self.preprocessing.input_size})

    def _learn_preprocessing(self) -> None:
        """Query images of ``gray_small`` models need the dataset's inversion and input size
        (only for checkpoints that do not record them)."""
        if self.image_kind != "gray_small" or self.preprocessing is not None:
            return
        prep = probe_preprocessing(self.config)
        if prep is None:
            warnings.warn(f"dataset {self.config.data.name!r} is not available, so query images "
                          f"get the eval transform only (no inversion, no resize to the "
                          f"training size)", RuntimeWarning, stacklevel=3)
            return
        self._set_preprocessing(prep)

    def _set_preprocessing(self, prep: dict[str, Any]) -> None:
        self.invert = bool(prep.get("invert", False))
        self.input_size = prep.get("input_size")
        self._prep = None

    def transform(self) -> ImagePrep:
        """PIL image -> model input: the eval transform of the checkpoint's ``image_kind``
        (plus the dataset's inversion and input size)."""
        if self._prep is None:
            if self.image_kind is None:
                raise CheckpointError("the checkpoint does not record its image_kind, so the "
                                      "right image transform is unknown; re-save it with a "
                                      "current nirdml")
            from nirdml.data import build_transforms

            image_size = None if self.config is None else self.config.data.image_size
            self._prep = ImagePrep(build_transforms(self.image_kind, train=False,
                                                    image_size=image_size),
                                   self.in_chans or 3, self.invert, self.input_size)
        return self._prep

    def _embed_files(self, paths: Sequence[str], skip_bad: bool
                     ) -> tuple[np.ndarray, list[int], list[int]]:
        dataset = ImageFileDataset(paths, self.transform(), skip_bad=skip_bad)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size,
                                             num_workers=self.num_workers,
                                             collate_fn=collate_skipping_bad)
        chunks, kept, bad = [], [], []
        for images, k, b in loader:
            bad.extend(b)
            if images is not None:
                chunks.append(self.embed_tensors(images))
                kept.extend(k)
        dim = self._require_model().embedding_dim
        emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return emb, kept, bad

    @torch.no_grad()
    def embed_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images ``(B, C, H, W)`` in batches; returns float32 ``(B, D)``."""
        model = self._require_model()
        if images.dim() == 3:
            images = images.unsqueeze(0)
        was_training = model.training
        model.eval()
        out = []
        try:
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start:start + self.batch_size].to(self.device, torch.float32)
                out.append(model(batch).float().cpu())
        finally:
            model.train(was_training)
        dim = model.embedding_dim
        return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Embed image files (paths) or PIL images; an undecodable file raises InputError."""
        from PIL import Image

        prep = self.transform()
        tensors = []
        for item in images:
            if isinstance(item, Image.Image):
                image = item
            elif isinstance(item, str | os.PathLike):
                image = load_image(item, self.in_chans or 3)
            else:
                raise InputError(f"a query must be an image path or a PIL image, got "
                                 f"{type(item).__name__}")
            tensors.append(prep(image))
            why = None if self.preprocessing is None else self.preprocessing.unusual(tensors[-1])
            if why is not None:
                name = os.fspath(item) if isinstance(item, str | os.PathLike) else "a PIL image"
                warnings.warn(f"query {name} looks unlike the images this model was trained on "
                              f"({why}); its results are unreliable", UnusualQueryWarning,
                              stacklevel=2)
        if not tensors:
            raise InputError("no query images given")
        return self.embed_tensors(torch.stack(tensors))

    # ---- search --------------------------------------------------------------------------
    def search(self, queries: Any, k: int = 10) -> SearchResults:
        """Top-``k`` gallery items for each query.

        ``queries``: image paths / PIL images (one or a list), a ``(B, C, H, W)`` tensor of
        preprocessed images, or a ``(Q, D)`` array/tensor of embeddings (L2-normalised here).
        """
        from PIL import Image

        names: list[str | None]
        if isinstance(queries, str | os.PathLike | Image.Image):
            queries = [queries]
        if isinstance(queries, torch.Tensor | np.ndarray):
            arr = queries
            if arr.ndim == 2:
                emb = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr)
            elif arr.ndim in (3, 4):
                emb = self.embed_tensors(torch.as_tensor(arr))
            else:
                raise InputError(f"queries must be (Q, D) embeddings or (B, C, H, W) images, "
                                 f"got shape {tuple(arr.shape)}")
            names = [None] * emb.shape[0]
        else:
            queries = list(queries)
            emb = self.embed_images(queries)
            names = [os.fspath(q) if isinstance(q, str | os.PathLike) else None for q in queries]
        return self.search_embeddings(emb, k, names)

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10,
                          names: list[str | None] | None = None) -> SearchResults:
        """Top-``k`` gallery items for each row of ``embeddings`` ``(Q, D)``."""
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise InputError(f"query embeddings must have shape (Q, {self.dim}), "
                             f"got {tuple(emb.shape)}")
        if not np.isfinite(emb).all():
            raise InputError("query embeddings contain NaN or inf")
        if emb.shape[0] and (np.linalg.norm(emb, axis=1) < 1e-12).any():
            raise InputError("a query embedding is all zeros: it has no direction to search")
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
        return {
            "format_version": META_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "size": len(self),
            "dim": self.dim,
            "metric": "inner_product (cosine of L2-normalised embeddings)",
            "index": self.spec.to_dict(),
            "checkpoint": self.checkpoint,
            "fingerprint": self.fingerprint,
            "image_kind": self.image_kind,
            "in_chans": self.in_chans,
            "preprocess": {"invert": self.invert, "input_size": self.input_size},
            "gallery": self.source,
            "class_names": self.class_names,
            "paths": self.paths,
            "config": None if self.config is None else self.config.to_dict(),
        }

    def save(self, index_dir: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``labels.npy`` and (last) ``meta.json`` into ``index_dir``."""
        import faiss

        out = Path(index_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / META_FILE).unlink(missing_ok=True)  # the directory is unfinished until the end
            _atomic_write(out / INDEX_FILE, faiss.serialize_index(self.index).tobytes())
            tmp = out / (LABELS_FILE + ".tmp.npy")
            np.save(tmp, self.labels)
            os.replace(tmp, out / LABELS_FILE)
            _atomic_write(out / META_FILE, json.dumps(self.meta(), indent=1).encode())
        except OSError as exc:
            raise ConfigError(f"cannot write the index to {str(out)!r}: {exc}") from exc
        return out

    @classmethod
    def load(cls, index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             device: str = "auto", load_model: bool = True) -> Retriever:
        """Open an index directory; with ``load_model`` also its checkpoint (or ``checkpoint``),
        whose fingerprint must match the one the index was built with."""
        import faiss

        folder = Path(index_dir)
        hint = "build one with: nirdml index build --checkpoint CKPT --gallery GALLERY --out DIR"
        if not folder.is_dir():
            raise ConfigError(f"index directory {str(folder)!r} does not exist; {hint}")
        missing = [f for f in (META_FILE, INDEX_FILE, LABELS_FILE) if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{str(folder)!r} is not a (complete) index directory: missing "
                              f"{', '.join(missing)}; {hint}")
        try:
            meta = json.loads((folder / META_FILE).read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(folder / META_FILE)!r} is unreadable: {exc}") from None
        if meta.get("format_version") != META_VERSION:
            raise ConfigError(f"{str(folder)!r} has index format {meta.get('format_version')}, "
                              f"this nirdml reads format {META_VERSION}; rebuild it")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as exc:
            raise ConfigError(f"{str(folder / INDEX_FILE)!r} is not a readable faiss index "
                              f"({str(exc).splitlines()[0] if str(exc) else 'corrupt'}); "
                              f"rebuild it") from None
        try:
            labels = np.load(folder / LABELS_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(folder / LABELS_FILE)!r} is unreadable: {exc}") from None
        paths = meta.get("paths")
        sizes = {index.ntotal, labels.shape[0], meta.get("size")}
        if len(sizes) != 1 or (paths is not None and len(paths) != index.ntotal) \
                or index.d != meta.get("dim"):
            raise ConfigError(f"{str(folder)!r} is inconsistent (index {index.ntotal}x{index.d}, "
                              f"{labels.shape[0]} labels, meta size {meta.get('size')}, "
                              f"dim {meta.get('dim')}); rebuild it")
        spec = IndexSpec(**{k: v for k, v in (meta.get("index") or {}).items()
                            if k in IndexSpec.__dataclass_fields__})
        retriever = cls(index, labels, paths, class_names=meta.get("class_names"), spec=spec,
                        checkpoint=meta.get("checkpoint"), fingerprint=meta.get("fingerprint"),
                        image_kind=meta.get("image_kind"), in_chans=meta.get("in_chans"),
                        source=meta.get("gallery"),
                        invert=bool((meta.get("preprocess") or {}).get("invert", False)),
                        input_size=(meta.get("preprocess") or {}).get("input_size"))
        if load_model:
            retriever.attach_checkpoint(checkpoint or meta.get("checkpoint"), device,
                                        overridden=checkpoint is not None)
        return retriever

    def attach_checkpoint(self, checkpoint, device: str = "auto", overridden: bool = True) -> None:
        """Load the model of ``checkpoint``; CheckpointError unless it is the index's model."""
        from nirdml.training.inference import load_trained_model

        if not checkpoint:
            raise CheckpointError("the index does not record its checkpoint; pass --checkpoint")
        try:
            model, cfg, state = load_trained_model(checkpoint, device)
        except CheckpointError as exc:
            if overridden:
                raise
            raise CheckpointError(f"{exc} (the index was built from it; pass --checkpoint if "
                                  f"the file moved)") from exc
        fingerprint = model_fingerprint(model)
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {str(checkpoint)!r} is not the model this index was built with "
                f"(fingerprint {fingerprint[:12]} != {self.fingerprint[:12]}); its embeddings "
                f"are not comparable with the index: rebuild the index with this checkpoint, or "
                f"use {self.checkpoint!r}")
        if model.embedding_dim != self.dim:
            raise CheckpointError(f"checkpoint {str(checkpoint)!r} embeds into "
                                  f"{model.embedding_dim} dimensions, the index holds {self.dim}")
        self.model, self.config, self.fingerprint = model, cfg, fingerprint
        self.image_kind = state.get("image_kind", self.image_kind)
        self.in_chans = state.get("in_chans") or self.in_chans
        self._use_recorded_preprocessing(state)
        self.batch_size = cfg.data.eval_batch_size
        self.num_workers = cfg.data.num_workers
        self._prep = None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


__all__ = ["Gallery", "Retriever", "SearchResults", "parse_gallery", "read_embeddings_npz"]
