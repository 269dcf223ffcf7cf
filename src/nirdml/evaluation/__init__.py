"""Evaluation of embeddings: Recall@k, MAP@R, R-Precision, mAP@1000, NMI/AMI and pair F1.

``evaluate(embeddings, labels, ...)`` is the entry point (``core``); neighbour search backends
and the tie-breaking rule live in ``knn``, the metrics (one registry entry each, with their
definitions) in ``metrics`` (ranking) and ``clustering``, ``.npz`` loading and table/JSON
output in ``report``. ``headline`` / ``HEADLINE_METRICS``: the metrics shown after training.
"""

from __future__ import annotations

from nirdml.evaluation.core import (
    DEFAULT_METRICS,
    DEFAULT_RECALL_KS,
    HEADLINE_METRICS,
    METRIC_NAMES,
    SOP_RECALL_KS,
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
    format_metrics_table,
    load_npz,
    metrics_to_jsonable,
    print_metrics_table,
    write_metrics_json,
)

__all__ = [
    "DEFAULT_METRICS",
    "DEFAULT_RECALL_KS",
    "HEADLINE_METRICS",
    "METRIC_NAMES",
    "SOP_RECALL_KS",
    "LoneQueryWarning",
    "evaluate",
    "evaluate_npz",
    "format_metrics_table",
    "headline",
    "is_headline",
    "load_npz",
    "metric_names",
    "metrics_to_jsonable",
    "normalize_embeddings",
    "parse_metrics",
    "print_metrics_table",
    "write_metrics_json",
]
