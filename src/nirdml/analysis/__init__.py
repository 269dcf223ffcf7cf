"""Structure diagnostics of an embedding space (spectral decay, density, cluster-size variance,
uniformity), diagnostic figures, and :func:`analyze` for embeddings files and checkpoints.

The diagnostics (:mod:`nirdml.analysis.diagnostics`) are pure NumPy; the figures
(:mod:`nirdml.analysis.plots`) import matplotlib and are loaded only when used.
"""

from __future__ import annotations

from nirdml.analysis.diagnostics import (
    cluster_size_variance,
    density_ratio,
    intra_class_stats,
    normalize_embeddings,
    sample_pair_distances,
    singular_values,
    spectral_decay,
    structure_report,
    uniformity_g2,
)
from nirdml.analysis.pipeline import analyze, format_table, load_embeddings_npz

__all__ = [
    "analyze",
    "cluster_size_variance",
    "density_ratio",
    "format_table",
    "intra_class_stats",
    "load_embeddings_npz",
    "normalize_embeddings",
    "sample_pair_distances",
    "singular_values",
    "spectral_decay",
    "structure_report",
    "uniformity_g2",
]
