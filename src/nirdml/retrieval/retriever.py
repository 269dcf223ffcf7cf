"""``Retriever``: a :class:`~nirdml.inference.TrainedRun` (embeds query images) over a
:class:`~nirdml.retrieval.index.GalleryIndex` (faiss index, labels, paths, meta).

:meth:`Retriever.load` attaches the index's checkpoint only if its fingerprint is the one the
index was built with: embeddings of another model are not comparable, so a mismatch is an error,
never a silent wrong answer. Queries get the checkpoint's preprocessing record; a checkpoint
older than it gets the record TrainedRun derives when the index is built, and the one the index
stored (``image_kind``, ``in_chans``, ``preprocess``) when it is loaded: no dataset needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.errors import CheckpointError, ConfigError, InputError
from nirdml.inference import TrainedRun
from nirdml.models.fingerprint import model_fingerprint
from nirdml.retrieval.faiss_index import IndexSpec
from nirdml.retrieval.gallery import Gallery, embed_gallery
from nirdml.retrieval.index import GalleryIndex, IndexOrigin, SearchResults


class Retriever:
    """Embeds query images with a trained run and searches a gallery index: build one with
    :meth:`from_checkpoint`, :meth:`save` it, reopen it with :meth:`load`, and ``search``."""

    def __init__(self, index: GalleryIndex | None = None, run: TrainedRun | None = None, *,
                 batch_size: int | None = None, num_workers: int | None = None):
        self.index, self.run = index, run
        self.batch_size, self.num_workers = batch_size, num_workers  # None: the run's own
        self._prep = None  # the Preprocessing queries get, chosen on first use
        self._prep_from_index = False  # a loaded index of a checkpoint without the record

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, gallery: str | os.PathLike | Gallery,
                        index: str | IndexSpec = "flat", *, device: str = "auto",
                        batch_size: int | None = None, num_workers: int | None = None,
                        data_root: str | None = None, on_error: str | None = None,
                        seed: int = 0) -> Retriever:
        """Load ``checkpoint``, embed ``gallery`` (``split:test``, a folder, an ``.npz`` or a
        :class:`Gallery`) and index it (``index``: ``flat``, ``ivf``, ``ivfpq`` or a spec)."""
        run = TrainedRun.open(checkpoint, device, data_root)
        r = cls(None, run, batch_size=batch_size, num_workers=num_workers)
        if not isinstance(gallery, Gallery):  # folders get run.query_preprocessing, as queries
            gallery = embed_gallery(run, gallery, on_error or run.config.data.on_error,
                                    batch_size, num_workers)
        if gallery.embeddings.shape[1] != run.model.embedding_dim:
            raise InputError(f"gallery embeddings are {gallery.embeddings.shape[1]}-d, the "
                             f"model's are {run.model.embedding_dim}-d")
        origin = IndexOrigin(str(Path(checkpoint).resolve()), model_fingerprint(run.model),
                             config=run.config.to_dict())
        origin.record(r.preprocessing)
        r.index = GalleryIndex.build(gallery.embeddings, gallery.labels, gallery.paths,
                                     class_names=gallery.class_names, source=gallery.source,
                                     spec=index, seed=seed, origin=origin)
        return r

    @classmethod
    def load(cls, index_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
             device: str = "auto", load_model: bool = True) -> Retriever:
        """Open an index directory; with ``load_model`` also its checkpoint (or ``checkpoint``),
        whose fingerprint must match the one the index was built with."""
        r = cls(GalleryIndex.load(index_dir))
        if load_model:
            r.attach_checkpoint(checkpoint or r.checkpoint, device,
                                overridden=checkpoint is not None)
        return r

    def attach_checkpoint(self, checkpoint, device: str = "auto", overridden: bool = True) -> None:
        """Load the model of ``checkpoint``; CheckpointError unless it is the index's model."""
        if not checkpoint:
            raise CheckpointError("the index does not record its checkpoint; pass --checkpoint")
        try:
            run = TrainedRun.open(checkpoint, device)
            model = run.model
        except CheckpointError as exc:
            if overridden:
                raise
            raise CheckpointError(f"{exc} (the index was built from it; pass --checkpoint if "
                                  f"the file moved)") from exc
        fingerprint, index = model_fingerprint(model), self._require_index()
        index.require_model(fingerprint, model.embedding_dim, checkpoint)
        origin = index.origin
        self.run, self._prep, self.batch_size, self.num_workers = run, None, None, None
        self._prep_from_index = run.state.get("preprocessing") is None
        origin.fingerprint, origin.config = fingerprint, run.config.to_dict()
        if not self._prep_from_index:  # the checkpoint's record is what queries get
            origin.record(self.preprocessing)

    # ---- the two parts -------------------------------------------------------------------
    def _require_index(self) -> GalleryIndex:
        if self.index is None:
            raise ConfigError("this Retriever has no gallery index yet")
        return self.index

    def _require_run(self) -> TrainedRun:
        if self.run is None:
            raise ConfigError("this Retriever was loaded without its model; embedding images "
                              "needs the checkpoint (Retriever.load(..., load_model=True))")
        return self.run

    def __len__(self) -> int:
        return len(self._require_index())

    dim = property(lambda self: self._require_index().dim)
    labels = property(lambda self: self._require_index().labels)
    paths = property(lambda self: self._require_index().paths)
    class_names = property(lambda self: self._require_index().class_names)
    source = property(lambda self: self._require_index().source)
    spec = property(lambda self: self._require_index().spec)
    checkpoint = property(lambda self: self._require_index().origin.checkpoint)
    fingerprint = property(lambda self: self._require_index().origin.fingerprint)
    model = property(lambda self: None if self.run is None else self.run.model)
    config = property(lambda self: None if self.run is None else self.run.config)
    device = property(lambda self: self._require_run().device)
    image_kind = property(lambda self: self._require_index().origin.image_kind)
    in_chans = property(lambda self: self._require_index().origin.in_chans)
    invert = property(lambda self: bool(self._require_index().origin.preprocess["invert"]))
    input_size = property(lambda self: self._require_index().origin.preprocess["input_size"])

    # ---- query preprocessing -------------------------------------------------------------
    @property
    def preprocessing(self):
        """The :class:`~nirdml.data.preprocessing.Preprocessing` query images get (see the
        module docstring)."""
        if self._prep is None:
            if self.run is not None and not self._prep_from_index:
                self._prep = self.run.query_preprocessing
            else:  # what the index stored
                kind = None if self.run is None else self.run.state.get("image_kind")
                self._prep = self._require_index().origin.preprocessing(kind)
        return self._prep

    def transform(self):
        """PIL image -> model input, as the query preprocessing prescribes."""
        return self.preprocessing.transform()

    # ---- embedding and search ------------------------------------------------------------
    def embed_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images ``(B, C, H, W)`` in batches; returns float32 ``(B, D)``."""
        return self._require_run().embed_tensors(images, self.batch_size)

    def embed_images(self, images) -> np.ndarray:
        """Embed image files (paths) or PIL images; an undecodable file raises InputError."""
        return self._require_run().embed_images(images, self.batch_size, self.preprocessing)

    def search(self, queries: Any, k: int = 10, rerank: str | None = None) -> SearchResults:
        """Top-``k`` gallery items for each query: image paths / PIL images (one or a list),
        a ``(B, C, H, W)`` tensor of preprocessed images, or ``(Q, D)`` embeddings; ``rerank``
        as :meth:`GalleryIndex.search` takes it."""
        from PIL import Image

        if isinstance(queries, str | os.PathLike | Image.Image):
            queries = [queries]
        if not isinstance(queries, torch.Tensor | np.ndarray):
            queries = list(queries)
            names = [os.fspath(q) if isinstance(q, str | os.PathLike) else None for q in queries]
            return self.search_embeddings(self.embed_images(queries), k, names, rerank)
        if queries.ndim == 2:
            emb = queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries
        elif queries.ndim in (3, 4):
            emb = self.embed_tensors(torch.as_tensor(queries))
        else:
            raise InputError(f"queries must be (Q, D) embeddings or (B, C, H, W) images, "
                             f"got shape {tuple(queries.shape)}")
        return self.search_embeddings(np.asarray(emb), k, rerank=rerank)

    def search_embeddings(self, embeddings: np.ndarray, k: int = 10,
                          names: list[str | None] | None = None,
                          rerank: str | None = None) -> SearchResults:
        """Top-``k`` gallery items for each row of ``embeddings`` ``(Q, D)``."""
        return self._require_index().search(embeddings, k, names, rerank)

    # ---- persistence ---------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return self._require_index().meta()

    def save(self, index_dir: str | os.PathLike, option: str = "index directory") -> Path:
        """Write the index directory (see :mod:`nirdml.retrieval.index`): a new or empty folder,
        or an index nirdml wrote; ``option`` names it in the ConfigError for any other."""
        return self._require_index().save(index_dir, option=option)


__all__ = ["Retriever"]
