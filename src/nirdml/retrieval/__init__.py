"""Gallery indexes and image search with a trained model.

- :class:`GalleryIndex` (``nirdml.retrieval.index``): a faiss index (exact ``flat``, ``ivf`` or
  ``ivfpq``) over L2-normalised gallery embeddings with their labels, paths and meta; ``build``,
  ``save``/``load`` of an index directory, ``search(embeddings, k)`` -> :class:`SearchResults`.
  It knows nothing about models or images.
- :func:`embed_gallery` (``nirdml.retrieval.gallery``): a dataset split, a folder of images or
  an embeddings ``.npz`` -> :class:`Gallery`, embedded with a :class:`~nirdml.run.TrainedRun`.
- :class:`Retriever` (``nirdml.retrieval.retriever``): a TrainedRun (embeds query images) plus
  a GalleryIndex, checked to come from the same model (its fingerprint);
  ``search(queries, k)`` takes image files, PIL images, image tensors or embeddings.

The HTML run report and the model export live in :mod:`nirdml.reports` and
:mod:`nirdml.export`; ``build_report`` and ``export_model`` stay importable from here.
Heavy modules (faiss, onnx, matplotlib) are imported only when used.
"""

from __future__ import annotations

from nirdml.data.images import IMAGE_EXTENSIONS, list_image_folder, load_image
from nirdml.retrieval.faiss_index import INDEX_TYPES, IndexSpec, build_index, search_index
from nirdml.retrieval.fingerprint import model_fingerprint, state_dict_fingerprint
from nirdml.retrieval.gallery import Gallery, embed_gallery, parse_gallery, read_embeddings_npz
from nirdml.retrieval.index import GalleryIndex, IndexOrigin, SearchResults
from nirdml.retrieval.retriever import Retriever
from nirdml.run import UnusualQueryWarning


def export_model(*args, **kwargs):
    """Moved to :func:`nirdml.export.export_model` (kept here for old imports)."""
    from nirdml.export import export_model as _export

    return _export(*args, **kwargs)


def build_report(*args, **kwargs):
    """Moved to :func:`nirdml.reports.build_report` (kept here for old imports)."""
    from nirdml.reports import build_report as _build

    return _build(*args, **kwargs)


__all__ = [
    "Gallery",
    "GalleryIndex",
    "IMAGE_EXTENSIONS",
    "INDEX_TYPES",
    "IndexOrigin",
    "IndexSpec",
    "Retriever",
    "SearchResults",
    "UnusualQueryWarning",
    "build_index",
    "build_report",
    "embed_gallery",
    "export_model",
    "list_image_folder",
    "load_image",
    "model_fingerprint",
    "parse_gallery",
    "read_embeddings_npz",
    "search_index",
    "state_dict_fingerprint",
]
