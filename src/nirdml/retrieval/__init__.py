"""Using a trained model: a gallery index with image search, model export and run reports.

- :class:`Retriever` embeds a gallery (a dataset split, a folder of images or an embeddings
  ``.npz``), indexes it with faiss (exact ``flat``, ``ivf`` or ``ivfpq``), saves/loads it with
  the model's fingerprint, and answers ``search(queries, k)`` with :class:`SearchResults`.
- :func:`export_model` writes the embedding network as ONNX or TorchScript.
- :func:`build_report` writes a self-contained HTML report of a training run.

Heavy modules (faiss, onnx, matplotlib) are imported only when used.
"""

from __future__ import annotations

from nirdml.data.images import IMAGE_EXTENSIONS, list_image_folder, load_image
from nirdml.retrieval.faiss_index import INDEX_TYPES, IndexSpec, build_index, search_index
from nirdml.retrieval.fingerprint import model_fingerprint, state_dict_fingerprint
from nirdml.retrieval.retriever import (
    Gallery,
    Retriever,
    SearchResults,
    parse_gallery,
    read_embeddings_npz,
)


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
    "IMAGE_EXTENSIONS",
    "INDEX_TYPES",
    "IndexSpec",
    "Retriever",
    "SearchResults",
    "build_index",
    "build_report",
    "export_model",
    "list_image_folder",
    "load_image",
    "model_fingerprint",
    "parse_gallery",
    "read_embeddings_npz",
    "search_index",
    "state_dict_fingerprint",
]
