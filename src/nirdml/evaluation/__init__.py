"""Evaluation of embeddings: Recall@k, MAP@R, R-Precision, mAP@1000, NMI/AMI and pair F1.

``evaluate(embeddings, labels, ...)`` is the entry point (``core``); neighbour search backends
and the tie-breaking rule live in ``knn``, the metrics (one registry entry each, with their
definitions) in ``metrics`` (ranking) and ``clustering``, ``.npz`` loading and JSON output in
``report``, the metric-name defaults in the import-light ``names``. ``headline`` /
``HEADLINE_METRICS``: the metrics shown after training. The metric table a person reads is
``nirdml.console.format_metrics_table``.

The defaults of ``names`` are imported here directly; everything else on first access, so
``nirdml.evaluation.names`` can be imported (by the command line) without numpy or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.evaluation.names import DEFAULT_METRICS, DEFAULT_RECALL_KS, SOP_RECALL_KS
from nirdml.lazy import lazy_attributes

if TYPE_CHECKING:
    from nirdml.evaluation.core import (
        HEADLINE_METRICS,
        METRIC_NAMES,
        LoneQueryWarning,
        evaluate,
        headline,
        is_headline,
        metric_names,
        normalize_embeddings,
        parse_metrics,
    )
    from nirdml.evaluation.report import (
        evaluate_npz,
        load_npz,
        metrics_to_jsonable,
        write_metrics_json,
    )

_LAZY = {
    **dict.fromkeys(("HEADLINE_METRICS", "METRIC_NAMES", "LoneQueryWarning", "evaluate",
                     "headline", "is_headline", "metric_names", "normalize_embeddings",
                     "parse_metrics"), "nirdml.evaluation.core"),
    **dict.fromkeys(("evaluate_npz", "load_npz", "metrics_to_jsonable", "write_metrics_json"),
                    "nirdml.evaluation.report"),
}

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_RECALL_KS",
    "HEADLINE_METRICS",
    "METRIC_NAMES",
    "SOP_RECALL_KS",
    "LoneQueryWarning",
    "evaluate",
    "evaluate_npz",
    "headline",
    "is_headline",
    "load_npz",
    "metric_names",
    "metrics_to_jsonable",
    "normalize_embeddings",
    "parse_metrics",
    "write_metrics_json",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
