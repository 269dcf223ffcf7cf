"""The metric-name defaults of ``evaluate`` and ``nirdml evaluate``, in one place.

Imports nothing (no numpy, no torch), so the command line can show them in ``--help`` without
loading the evaluation code; :mod:`nirdml.evaluation.core` uses the same values.
"""

from __future__ import annotations

#: the K of ``recall`` / ``precision`` when none is given (CUB, Cars, In-Shop papers)
DEFAULT_RECALL_KS = (1, 2, 4, 8)
#: the K reported for Stanford Online Products
SOP_RECALL_KS = (1, 10, 100, 1000)
#: the metrics ``evaluate`` computes when none are named
DEFAULT_METRICS = ("recall", "map@r", "r_precision", "map@1000", "nmi", "f1")

__all__ = ["DEFAULT_METRICS", "DEFAULT_RECALL_KS", "SOP_RECALL_KS"]
