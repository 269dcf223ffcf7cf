"""Clustering metrics: seeded k-means (faiss or torch) and the registry of NMI, AMI, pair F1.

Each metric is one ``@clustering_metric`` entry below: its name and a function of (class labels,
cluster ids) -> float; ``evaluate`` computes the requested ones, in entry order, from one
k-means clustering. A new clustering metric is a new entry here.

NMI uses the arithmetic-mean normalisation (scikit-learn's default and PyTorch Metric Learning's),
with the same limit cases: 1.0 when both partitions have a single cluster, 0.0 when the mutual
information is 0. The pair-counting F1 treats "same cluster" as a prediction of "same class" for
each of the N(N-1)/2 pairs; it is computed from the sparse contingency table in O(N log N), never
by enumerating pairs, and is 1.0 when neither partition puts any two samples together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusteringMetric:
    """A registered clustering metric (see ``clustering_metric``)."""

    name: str
    score: Callable[[np.ndarray, np.ndarray], float]
    headline: bool = False
    epoch: bool = False
    per_k = False  # not a family name@K (a plain class attribute, as for ranking metrics)


#: name -> entry, in the order of the returned keys
CLUSTERING_METRICS: dict[str, ClusteringMetric] = {}


def clustering_metric(name: str, *, headline: bool = False, epoch: bool = False):
    """Register the decorated ``score(labels_true, labels_pred) -> float`` as metric ``name``.

    ``headline``: shown in the summary after training; ``epoch``: also on each epoch's line.
    """

    def register(score: Callable[[np.ndarray, np.ndarray], float]):
        CLUSTERING_METRICS[name] = ClusteringMetric(name, score, headline, epoch)
        return score

    return register


def kmeans_faiss(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Cluster ids (int64) from ``faiss.Kmeans`` (L2, ``niter`` Lloyd steps, fixed seed)."""
    import faiss

    from nirdml.evaluation.knn import faiss_blas_blocks

    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), verbose=False)
    km.cp.min_points_per_centroid = 1  # silence faiss's "please provide more points" warning
    km.cp.max_points_per_centroid = max(256, -(-x.shape[0] // max(int(k), 1)))  # no subsampling
    with faiss_blas_blocks(faiss, 4096, 16384):
        km.train(x)
        _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def kmeans_torch(
    x: np.ndarray, k: int, seed: int = 0, niter: int = 20, device=None, block: int = 8192,
    on_iteration: Callable[[], None] | None = None,
) -> np.ndarray:
    """Cluster ids (int64) from a seeded Lloyd's k-means in torch (the faiss-free fallback).

    Centroids start at ``k`` distinct random samples; an emptied cluster is re-seeded with a
    random sample. Results differ from faiss's (another initialisation), not in quality.
    ``on_iteration()`` is called after each of the ``niter`` steps (a progress bar's update).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    k = int(k)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    centroids = xt[torch.from_numpy(rng.choice(n, size=k, replace=False)).to(device)].clone()

    def assign() -> torch.Tensor:
        out = torch.empty(n, dtype=torch.long, device=device)
        half_sq = 0.5 * (centroids * centroids).sum(dim=1)
        for s in range(0, n, block):
            scores = xt[s : s + block] @ centroids.T - half_sq  # argmax == nearest in L2
            out[s : s + block] = scores.argmax(dim=1)
        return out

    with torch.no_grad():
        for _ in range(int(niter)):
            labels = assign()
            sums = torch.zeros_like(centroids).index_add_(0, labels, xt)
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero()[:, 0]
            nonempty = counts > 0
            centroids[nonempty] = sums[nonempty] / counts[nonempty, None].to(sums.dtype)
            if empty.numel():
                pick = torch.from_numpy(rng.choice(n, size=empty.numel(), replace=False))
                centroids[empty] = xt[pick.to(device)]
            if on_iteration is not None:
                on_iteration()
        labels = assign()
    return labels.cpu().numpy().astype(np.int64)


def contingency(labels_true, labels_pred):
    """Sparse contingency table ``(a, b, rows, cols, cells)``.

    ``a``: class sizes, ``b``: cluster sizes, and for each non-empty cell its class row, cluster
    column and count -- O(N log N) time and O(N) memory whatever the numbers of classes/clusters.
    """
    _, t = np.unique(np.asarray(labels_true).ravel(), return_inverse=True)
    _, p = np.unique(np.asarray(labels_pred).ravel(), return_inverse=True)
    t = t.ravel().astype(np.int64)
    p = p.ravel().astype(np.int64)
    width = int(p.max()) + 1 if p.size else 1
    keys, cells = np.unique(t * width + p, return_counts=True)
    return np.bincount(t), np.bincount(p), keys // width, keys % width, cells


def _entropy(counts: np.ndarray, n: int) -> float:
    f = counts[counts > 0].astype(np.float64) / n
    return float(-(f * np.log(f)).sum())


@clustering_metric("nmi", headline=True, epoch=True)
def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic mean of the two entropies)."""
    a, b, rows, cols, cells = contingency(labels_true, labels_pred)
    if a.size == b.size == 1:
        return 1.0
    n = int(a.sum())
    nij = cells.astype(np.float64)
    log_n = np.log(n)
    terms = nij / n * (np.log(nij) + log_n - np.log(a[rows].astype(np.float64))
                       - np.log(b[cols].astype(np.float64)))
    mi = max(float(terms.sum()), 0.0)
    if mi == 0.0:
        return 0.0
    norm = 0.5 * (_entropy(a, n) + _entropy(b, n))
    return float(mi / max(norm, np.finfo(np.float64).eps))


@clustering_metric("ami")
def ami(labels_true, labels_pred) -> float:
    """Adjusted mutual information (scikit-learn's, arithmetic normalisation)."""
    from sklearn.metrics import adjusted_mutual_info_score

    return float(adjusted_mutual_info_score(np.asarray(labels_true), np.asarray(labels_pred)))


@clustering_metric("f1")
def pair_f1(labels_true, labels_pred) -> float:
    """Pair-counting F1 = 2 TP / (pairs in same cluster + pairs in same class)."""
    a, b, _, _, cells = contingency(labels_true, labels_pred)

    def pairs(x: np.ndarray) -> int:
        x = x.astype(np.int64)
        return int((x * (x - 1) // 2).sum())

    tp, pred_pairs, true_pairs = pairs(cells), pairs(b), pairs(a)
    if pred_pairs + true_pairs == 0:
        return 1.0
    return 2.0 * tp / (pred_pairs + true_pairs)


def clustering_scores(labels: np.ndarray, assignments: np.ndarray, which) -> dict[str, float]:
    """The requested (``which``) ``CLUSTERING_METRICS`` of a clustering of labelled samples."""
    return {name: metric.score(labels, assignments)
            for name, metric in CLUSTERING_METRICS.items() if name in which}
