"""Embedding files (``.npz``) in, metric tables and JSON out: ``load_npz`` / ``evaluate_npz``
read saved embeddings, ``format_metrics_table`` prints a result in percent and
``write_metrics_json`` keeps its fractions (NaN as null)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

NPZ_REQUIRED = ("embeddings", "labels")
NPZ_OPTIONAL = ("is_query", "is_gallery")


def load_npz(path: str | Path) -> dict[str, np.ndarray | None]:
    """``embeddings`` (N x D), ``labels`` (N) and optional ``is_query``/``is_gallery`` of an
    ``.npz`` (:meth:`nirdml.embeddings.Embeddings.load`), as a dict."""
    from nirdml.embeddings import Embeddings

    emb = Embeddings.load(path)
    return {"embeddings": emb.embeddings, "labels": emb.labels, "is_query": emb.is_query,
            "is_gallery": emb.is_gallery}


def evaluate_npz(path: str | Path, metrics=None, recall_ks=(1, 2, 4, 8), **kwargs) -> dict:
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


def format_metrics_table(results: dict, title: str | None = None) -> str:
    """A text table of metrics in percent (counts as integers); JSON keeps fractions."""
    width = max([len(k) for k in results] + [6])
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  {'%':>7}")
    lines.append("-" * (width + 9))
    for key, value in results.items():
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            lines.append(f"{key:<{width}}  {int(value):>7d}")
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            lines.append(f"{key:<{width}}  {'nan':>7}")
        else:
            lines.append(f"{key:<{width}}  {100 * float(value):>7.2f}")
    return "\n".join(lines)


def print_metrics_table(results: dict, file: TextIO | None = None, title: str | None = None):
    """Print ``format_metrics_table(results)`` (to stdout by default)."""
    print(format_metrics_table(results, title=title), file=file or sys.stdout)


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
