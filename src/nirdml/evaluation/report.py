"""Embedding files (``.npz``) in, metrics JSON out: ``load_npz`` / ``evaluate_npz`` read saved
embeddings, ``write_metrics_json`` keeps the metrics' fractions (NaN as null). The table in
percent that a person reads is :func:`nirdml.console.format_metrics_table`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from nirdml.evaluation.names import DEFAULT_RECALL_KS

NPZ_REQUIRED = ("embeddings", "labels")
NPZ_OPTIONAL = ("is_query", "is_gallery")


def load_npz(path: str | Path) -> dict[str, np.ndarray | None]:
    """``embeddings`` (N x D), ``labels`` (N) and optional ``is_query``/``is_gallery`` of an
    ``.npz`` (:meth:`nirdml.embeddings.Embeddings.load`), as a dict."""
    from nirdml.embeddings import Embeddings

    emb = Embeddings.load(path)
    return {"embeddings": emb.embeddings, "labels": emb.labels, "is_query": emb.is_query,
            "is_gallery": emb.is_gallery}


def evaluate_npz(path: str | Path, metrics=None, recall_ks=DEFAULT_RECALL_KS,
                 **kwargs) -> dict:
    """``evaluate`` on the arrays of an ``.npz`` file (see ``load_npz``); kwargs go through."""
    from nirdml.evaluation.core import evaluate

    data = load_npz(path)
    return evaluate(
        data["embeddings"],
        data["labels"],
        metrics=metrics,
        query_mask=data["is_query"],
        gallery_mask=data["is_gallery"],
        recall_ks=recall_ks,
        **kwargs,
    )


def metrics_to_jsonable(results: dict) -> dict:
    """The same numbers with NaN as ``None`` (JSON ``null``) and numpy scalars as Python ones."""
    out = {}
    for key, value in results.items():
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = int(value)
        else:
            value = float(value)
            out[key] = None if math.isnan(value) else value
    return out


def write_metrics_json(results: dict, path: str | Path) -> None:
    """Write the metrics dict as JSON (keys as ``evaluate`` returns them)."""
    from nirdml.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(metrics_to_jsonable(results), indent=2) + "\n")
