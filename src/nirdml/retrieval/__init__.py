"""Gallery indexes and image search with a trained model.

- :class:`GalleryIndex` (``nirdml.retrieval.index``): a faiss index (exact ``flat``, ``ivf`` or
  ``ivfpq``) over L2-normalised gallery embeddings with their labels, paths and meta; ``build``,
  ``save``/``load`` of an index directory, ``search(embeddings, k)`` -> :class:`SearchResults`.
  It knows nothing about models or images.
- :func:`embed_gallery` (``nirdml.retrieval.gallery``): a dataset split, a folder of images or
  an embeddings ``.npz`` -> :class:`Gallery`, embedded with a
  :class:`~nirdml.inference.TrainedRun`.
- :class:`Retriever` (``nirdml.retrieval.retriever``): a TrainedRun (embeds query images) plus
  a GalleryIndex, checked to come from the same model (its fingerprint,
  :mod:`nirdml.models.fingerprint`); ``search(queries, k)`` takes image files, PIL images,
  image tensors or embeddings.

faiss is imported only when an index is built or read.
"""

from __future__ import annotations

from nirdml.retrieval.faiss_index import INDEX_TYPES, IndexSpec, build_index, search_index
from nirdml.retrieval.gallery import Gallery, embed_gallery, parse_gallery, read_embeddings_npz
from nirdml.retrieval.index import GalleryIndex, IndexOrigin, SearchResults
from nirdml.retrieval.retriever import Retriever

__all__ = [
    "Gallery",
    "GalleryIndex",
    "INDEX_TYPES",
    "IndexOrigin",
    "IndexSpec",
    "Retriever",
    "SearchResults",
    "build_index",
    "embed_gallery",
    "parse_gallery",
    "read_embeddings_npz",
    "search_index",
]
