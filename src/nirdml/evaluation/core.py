"""``evaluate``: retrieval and clustering metrics of an embedding set on cosine similarity.

It parses the requested metric names against the registries (``metrics.RANKING_METRICS``,
``clustering.CLUSTERING_METRICS``), searches each query's neighbours block by block (``knn``),
accumulates the ranking metrics, clusters the samples for the clustering ones and returns one
dict; ``headline`` picks the metrics a person reads after training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nirdml.console import progress_bar
from nirdml.embeddings import check_labels, check_not_degenerate, check_selection, l2_normalize
from nirdml.errors import ConfigError, InputError
from nirdml.evaluation.clustering import CLUSTERING_METRICS, clustering_scores
from nirdml.evaluation.knn import check_precision, knn_blocks, resolve_backend
from nirdml.evaluation.metrics import RANKING_METRICS, RankingAccumulator
from nirdml.evaluation.names import DEFAULT_METRICS, DEFAULT_RECALL_KS


def metric_names() -> tuple[str, ...]:
    """Every metric name ``evaluate`` accepts: ``name`` and ``name@K`` for each family, then the
    other ranking metrics and the clustering ones, in registry order."""
    names: list[str] = []
    for m in RANKING_METRICS.values():
        names += [m.name, f"{m.name}@K"] if m.per_k else [m.name]
    return (*names, *CLUSTERING_METRICS)


METRIC_NAMES = metric_names()


def _headline_keys(brief: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(key prefixes of the headline families, exact names of the other headline metrics)."""
    entries = [*RANKING_METRICS.values(), *CLUSTERING_METRICS.values()]
    shown = [m for m in entries if (m.epoch if brief else m.headline)]
    families = tuple(f"{m.name}@1" if brief else f"{m.name}@" for m in shown if m.per_k)
    return families, tuple(m.name for m in shown if not m.per_k)


def is_headline(key: str, brief: bool = False) -> bool:
    """Whether the result ``key`` is a headline metric: one a person reads after training
    (``HEADLINE_METRICS``), or with ``brief`` one of the shorter list on each epoch's console
    line, where a family shows K = 1 (matched as a key prefix, as that line always did: also
    K = 10, 100, 1000 when those are evaluated)."""
    families, names = _headline_keys(brief)
    return key in names or key.startswith(families)


def headline(results: dict, brief: bool = False) -> dict:
    """The headline metrics of an ``evaluate`` result (other keys dropped), in its order."""
    return {k: v for k, v in results.items() if is_headline(k, brief)}


#: the metrics a person reads after training (``recall@K`` stands for every K)
HEADLINE_METRICS = tuple(m for m in METRIC_NAMES if is_headline(m))


class LoneQueryWarning(UserWarning):
    """Every query's class is missing from the gallery, so retrieval metrics are NaN."""


@dataclass
class MetricSpec:
    """Which metrics to compute (parsed from the ``metrics`` argument)."""

    #: ``(name, k)`` of each ranking metric (``k`` None unless a family), in output order
    ranking: list[tuple[str, int | None]] = field(default_factory=list)
    #: the clustering metrics, in output order
    clustering: list[str] = field(default_factory=list)

    def keys(self) -> list[str]:
        """The metric keys ``evaluate`` returns, in order."""
        ranking = [RANKING_METRICS[name].key(k) for name, k in self.ranking]
        return ranking + self.clustering


def _parse_k(name: str, text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(f"metric {name!r}: k must be a positive integer")
    return k


def _check_ks(recall_ks: Sequence[int]) -> list[int]:
    ks = []
    for k in recall_ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"recall_ks must be positive integers; got {list(recall_ks)!r}")
        ks.append(int(k))
    return ks


def parse_metrics(
    metrics: str | Iterable[str] | None, recall_ks: Sequence[int] = DEFAULT_RECALL_KS
) -> MetricSpec:
    """Parse metric names (see ``metric_names()``): a family's bare name (``"recall"``) uses
    ``recall_ks``, ``name@K`` picks K."""
    ks = _check_ks(recall_ks)
    if metrics is None:
        metrics = DEFAULT_METRICS
    elif isinstance(metrics, str):
        metrics = [m for m in metrics.replace(",", " ").split() if m]
    families = {m.name for m in RANKING_METRICS.values() if m.per_k}
    chosen: dict[str, set] = {}
    for raw in metrics:
        name = str(raw).strip().lower()
        family, at, k_text = name.partition("@")
        if name in families:
            chosen.setdefault(name, set()).update(ks)
        elif name in RANKING_METRICS or name in CLUSTERING_METRICS:
            chosen.setdefault(name, set()).add(None)
        elif at and family in families:
            chosen.setdefault(family, set()).add(_parse_k(name, k_text))
        else:
            raise ConfigError(
                f"unknown metric {raw!r}; choose from {', '.join(metric_names())} "
                "(K a positive integer)"
            )
    spec = MetricSpec(
        ranking=[(name, k) for name in RANKING_METRICS for k in sorted(chosen.get(name, ()))],
        clustering=[name for name in CLUSTERING_METRICS if name in chosen],
    )
    if not (spec.ranking or spec.clustering):
        raise ConfigError("no metric requested")
    return spec


def normalize_embeddings(embeddings) -> np.ndarray:
    """Validate a ``(N, D)`` array/tensor and return it L2-normalised as C-contiguous float32
    (``nirdml.embeddings.l2_normalize``: NaN/inf or all-zero rows are an InputError)."""
    return l2_normalize(embeddings)


def _relevant_counts(
    q_labels: np.ndarray, g_labels: np.ndarray, q_in_gallery: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: R (same-label gallery items other than itself) and C (map@1000's class size)."""
    uniq, counts = np.unique(g_labels, return_counts=True)
    pos = np.searchsorted(uniq, q_labels)
    pos = np.minimum(pos, uniq.size - 1)
    found = uniq[pos] == q_labels
    c = np.where(found, counts[pos], 0).astype(np.int64)
    r = c - q_in_gallery.astype(np.int64)
    return r, c


def _query_gallery(y: np.ndarray, q_mask: np.ndarray, g_mask: np.ndarray):
    """``(q_index, g_index, self_pos, r, c)``: query and gallery sample indices, each query's
    gallery position (-1 when it is not in the gallery) and its R and C (``_relevant_counts``)."""
    q_index = np.flatnonzero(q_mask)
    g_index = np.flatnonzero(g_mask)
    g_pos = np.full(y.shape[0], -1, dtype=np.int64)
    g_pos[g_index] = np.arange(g_index.size)
    self_pos = g_pos[q_index]
    r, c = _relevant_counts(y[q_index], y[g_index], self_pos >= 0)
    return q_index, g_index, self_pos, r, c


def _ranking(spec, x, y, q_index, g_index, self_pos, r, c, backend, block_size, device,
             max_bytes, progress: str | None = None,
             rerank: tuple[str, dict] | None = None,
             precision: str = "auto") -> dict[str, float]:
    """Search the neighbours of the non-lone queries block by block and average the metrics
    (``rerank``: a re-ranking method's name and parameters, applied to the full query set)."""
    keep = r > 0
    acc = RankingAccumulator(spec.ranking)
    if not keep.any():
        warnings.warn(
            f"all {q_index.size} queries are lone (no other sample of their class in the "
            "gallery); retrieval metrics are NaN",
            LoneQueryWarning,
            stacklevel=3,
        )
        return acc.result()
    k = max([1] + [RANKING_METRICS[name].needs(kk, r[keep]) for name, kk in spec.ranking])
    available = g_index.size - int((self_pos[keep] >= 0).any())
    too_big = [kk for _, kk in spec.ranking if kk is not None and kk > available]
    if too_big:
        warnings.warn(
            f"k = {too_big} exceeds the {available} neighbours a query can have; "
            "recall uses all of them and precision still divides by k",
            RuntimeWarning,
            stacklevel=3,
        )
    n = x.shape[0]
    qs = q_index[keep]
    r_keep, c_keep = r[keep], c[keep]
    g_labels, q_labels = y[g_index], y[qs]
    if rerank is not None and rerank[0] != "none":
        from nirdml.evaluation.rerank import rerank as rerank_fn

        table, _ = rerank_fn(rerank[0], x[qs], x[g_index], k, self_pos[keep], **rerank[1])
        acc.update(g_labels[table] == q_labels[:, None], r_keep, c_keep)
        return acc.result()
    bar = progress_bar(qs.size, f"{progress}: neighbours", "query") if progress else None
    for start, stop, table in knn_blocks(
        x if qs.size == n else x[qs],
        x if g_index.size == n else x[g_index],
        self_pos[keep],
        k,
        backend=backend,
        block_size=block_size,
        device=device,
        max_memory_bytes=max_bytes,
        query_labels=q_labels,
        gallery_labels=g_labels,
        precision=precision,
    ):
        rel = (g_labels[table] == q_labels[start:stop, None]) & (table >= 0)
        acc.update(rel, r_keep[start:stop], c_keep[start:stop])
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return acc.result()


def _check_sizes(max_memory_mb, block_size) -> None:
    """ConfigError unless ``max_memory_mb`` is None or a finite number > 0 and ``block_size``
    None or an integer >= 1."""
    if max_memory_mb is not None:
        ok = not isinstance(max_memory_mb, bool) and isinstance(
            max_memory_mb, (int, float, np.integer, np.floating))
        if not (ok and np.isfinite(max_memory_mb) and max_memory_mb > 0):
            raise ConfigError(f"max_memory_mb must be a number > 0 (MiB for the query blocks) "
                              f"or None; got {max_memory_mb!r}")
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ConfigError(f"block_size must be an integer >= 1 or None; got {block_size!r}")


def _cluster(xs, n_classes, backend, seed, iters, cluster_fn, device,
             on_iteration: Callable[[], None] | None = None) -> np.ndarray:
    """Cluster ids of ``xs`` from ``cluster_fn`` or the backend's seeded k-means
    (``on_iteration`` is called after each of the torch k-means's Lloyd steps)."""
    if cluster_fn is not None:
        assign = np.asarray(cluster_fn(xs, n_classes, seed)).reshape(-1)
        if assign.shape[0] != xs.shape[0]:
            raise InputError(f"cluster_fn returned {assign.shape[0]} ids for {xs.shape[0]} samples")
        return assign
    if backend == "faiss":
        from nirdml.evaluation.clustering import kmeans_faiss

        return kmeans_faiss(xs, n_classes, seed=seed, niter=iters)
    from nirdml.evaluation.clustering import kmeans_torch

    return kmeans_torch(xs, n_classes, seed=seed, niter=iters, device=device,
                        on_iteration=on_iteration)


def _clustering(spec, x, y, members, backend, seed, iters, cluster_fn, device,
                progress: str | None = None) -> dict[str, float]:
    """Cluster the ``members`` (bool mask) into as many clusters as they have classes and score
    the clustering with the requested metrics.

    With ``progress`` one bar counts the steps: each Lloyd step of the torch k-means (one step
    for faiss's k-means, which runs in one call, or for ``cluster_fn``), then each metric."""
    members = np.flatnonzero(members)
    if members.size == x.shape[0]:
        xs, ys = x, y
    else:
        xs, ys = x[members], y[members]
    n_classes = int(np.unique(ys).size)
    stepwise = cluster_fn is None and backend == "torch"
    bar = None
    if progress:
        total = (int(iters) if stepwise else 1) + len(spec.clustering)
        bar = progress_bar(total, f"{progress}: k-means, {n_classes} clusters", "step")
    step = bar.update if bar is not None else None
    try:
        assign = _cluster(xs, n_classes, backend, seed, iters, cluster_fn, device,
                          on_iteration=step if stepwise else None)
        if bar is not None and not stepwise:
            bar.update(1)
        scores = {}
        for name in spec.clustering:
            scores.update(clustering_scores(ys, assign, [name]))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {name: scores[name] for name in spec.clustering}


def evaluate(
    embeddings,
    labels,
    metrics: str | Iterable[str] | None = None,
    query_mask=None,
    gallery_mask=None,
    recall_ks: Sequence[int] = DEFAULT_RECALL_KS,
    *,
    backend: str = "auto",
    kmeans_seed: int = 0,
    kmeans_iters: int = 20,
    cluster_fn: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    device=None,
    block_size: int | None = None,
    max_memory_mb: float | None = None,
    progress: str | None = None,
    rerank: str | None = None,
    fnmr_at_fmr: Sequence[float] = (),
    precision: str = "auto",
) -> dict:
    """Retrieval and clustering metrics of ``embeddings`` (N x D, numpy or torch) on cosine.

    Every sample is a query against all others unless ``query_mask`` / ``gallery_mask`` (bool
    or 0/1 numbers, length N; ``nirdml.embeddings.check_selection``: a mask that selects
    nothing is an InputError) pick the query and gallery sets (In-Shop style); a sample in both
    never retrieves itself. Queries whose class has no other gallery member are left out and
    counted as ``lone_queries``; ``num_queries`` counts the queries the retrieval metrics
    average over.

    ``metrics``: names from ``metric_names()`` (default ``DEFAULT_METRICS``); a family's name
    (``"recall"``, ``"precision"``) expands to ``recall_ks``, ``"recall@K"`` picks any K. Returned:
    the requested metrics in registry order -- ``recall@K``, ``precision@K``, ``map@r``,
    ``r_precision``, ``map@1000``, ``nmi``, ``ami``, ``f1`` (floats, fractions in [0, 1], NaN when
    no query is left) -- then ``lone_queries`` and ``num_queries`` (ints). Definitions: the
    ``metrics`` and ``clustering`` registries; neighbour order and ties: ``knn`` module doc.

    Clustering runs k-means (``kmeans_iters`` steps, seed ``kmeans_seed``; faiss, or torch for
    ``backend="torch"``) with K = number of classes on every sample in the query or gallery set,
    unless ``cluster_fn(x, K, seed) -> ids`` is given. ``backend``: ``"auto"`` (faiss when
    installed), ``"faiss"`` or ``"torch"`` (``device`` picks its device, default CUDA when
    available). ``block_size`` / ``max_memory_mb`` bound the query blocks (default: from the
    memory available, at most 512 MiB). ``progress``: a name (e.g. ``"test"``) shows progress
    bars for the neighbour search and the clustering on a terminal (None, the default: none).
    ``precision``: ``"auto"`` searches neighbours in two passes (bfloat16 candidates, float32
    re-scoring; ``nirdml.evaluation.twopass``) where the hardware multiplies bfloat16 natively
    and it pays, ``"float32"`` in one float32 pass; the metrics are the same.

    Degenerate data is an :class:`~nirdml.errors.InputError` (a
    ``nirdml.embeddings.DegenerateEmbeddingsError``) before any search: a single class among
    the query and gallery samples, or collapsed embeddings (``nirdml.embeddings`` module doc:
    every L2-normalised row within ``COLLAPSE_TOLERANCE`` of the first) -- no metric means
    anything there, yet a single class scores 100% and collapsed rows score by tie order.

    ``rerank``: a re-ranking method (``nirdml.evaluation.rerank``: ``"alpha_qe"``,
    ``"alpha_qe:n=3,alpha=1"``, ``"dba"``, ``"k_reciprocal"``) applied to the neighbour lists
    before the ranking metrics (clustering is unchanged). ``fnmr_at_fmr``: target false-match
    rates; each adds ``fnmr@fmr=F`` and ``threshold@fmr=F`` (``nirdml.evaluation.verification``)
    over the query-gallery pairs.
    """
    spec = parse_metrics(metrics, recall_ks)
    rerank_spec = None
    if rerank is not None:
        from nirdml.evaluation.rerank import parse_rerank

        rerank_spec = parse_rerank(rerank)
    if fnmr_at_fmr:
        from nirdml.evaluation.verification import check_rates

        fnmr_at_fmr = check_rates(fnmr_at_fmr)
    _check_sizes(max_memory_mb, block_size)
    if device is not None:
        from nirdml.devices import resolve_device

        device = resolve_device(device, "device")
    backend = resolve_backend(backend, device)
    check_precision(precision)
    x = normalize_embeddings(embeddings)
    n = x.shape[0]
    y = check_labels(labels, n)
    q_mask = check_selection(query_mask, n, "query_mask")
    g_mask = check_selection(gallery_mask, n, "gallery_mask")
    members = q_mask | g_mask
    check_not_degenerate(x if members.all() else x[members], y[members])
    max_bytes = None if max_memory_mb is None else int(max_memory_mb * 2**20)
    q_index, g_index, self_pos, r, c = _query_gallery(y, q_mask, g_mask)

    results: dict = {}
    if spec.ranking:
        results.update(_ranking(spec, x, y, q_index, g_index, self_pos, r, c, backend,
                                block_size, device, max_bytes, progress, rerank_spec,
                                precision))
    if spec.clustering:
        results.update(_clustering(spec, x, y, q_mask | g_mask, backend, kmeans_seed,
                                   kmeans_iters, cluster_fn, device, progress))
    ordered = {key: results[key] for key in spec.keys()}
    if fnmr_at_fmr:
        from nirdml.evaluation.verification import fnmr_at_fmr as verify

        pairs = verify(x[q_index], y[q_index], x[g_index], y[g_index], fnmr_at_fmr,
                       same_set=bool((q_mask == g_mask).all()), self_pos=self_pos)
        for rate, found in pairs.items():
            ordered[f"fnmr@fmr={rate:g}"] = found.fnmr
            ordered[f"threshold@fmr={rate:g}"] = found.threshold
    ordered["lone_queries"] = int((r <= 0).sum())
    ordered["num_queries"] = int((r > 0).sum())
    return ordered
