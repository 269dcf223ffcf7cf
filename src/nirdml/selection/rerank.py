"""Re-ranking selection: every point of each method's parameter grid scored on validation
embeddings, the best kept only where it beats the plain ranking (``nirdml tune --rerank``).

A re-ranking method's parameters are post-processing, not training: one set of embeddings of the
validation classes is searched once per grid point (``nirdml.evaluation.rerank.RERANKERS``,
each method's ``grid``), so the search is exhaustive rather than sampled. The protocol is the
one the parameters will serve: ``all`` (every item queries all others, the DML protocol of
``evaluate``) or ``split`` (half of each class queries the other half: queries from outside
the gallery, as for ``search`` and ``serve``); embeddings with their own query/gallery split
(In-Shop) keep it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nirdml.errors import ConfigError

PROTOCOLS = ("all", "split")


def grid_specs(name: str) -> list[str]:
    """Every ``name:k=v,...`` of the method's grid (its defaults where the grid is silent)."""
    from nirdml.evaluation.rerank import RERANKERS

    method = RERANKERS[name]
    keys = list(method.grid)
    if not keys:
        return [name]
    return [name + ":" + ",".join(f"{k}={v}" for k, v in zip(keys, values))
            for values in itertools.product(*(method.grid[k] for k in keys))]


def split_masks(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The outside-query protocol: in each class every second item (in order) is a query, the
    others the gallery, so no query is a gallery item (as for a served index)."""
    labels = np.asarray(labels)
    rank = np.zeros(labels.size, np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(members.size)
    return rank % 2 == 1, rank % 2 == 0


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """The named methods (all but ``none`` when empty); a one-line error for an unknown one."""
    from nirdml.evaluation.rerank import RERANKERS

    known = [m for m in RERANKERS if m != "none"]
    if not methods:
        return known
    bad = [m for m in methods if m not in known]
    if bad:
        raise ConfigError(f"unknown re-ranking method(s) {', '.join(map(repr, bad))}; choose "
                          f"from: {', '.join(known)}")
    return list(dict.fromkeys(methods))


def check_metric(metric: str) -> str:
    """``metric`` as evaluate reports it, if it is one ranking metric (re-ranking changes the
    neighbour lists, not the clustering); a one-line error otherwise."""
    from nirdml.evaluation.core import parse_metrics

    name = str(metric).strip().lower()
    spec = parse_metrics([name])
    if spec.clustering or len(spec.ranking) != 1:
        raise ConfigError(f"re-ranking is chosen by one ranking metric such as map@r or "
                          f"recall@1, not {metric!r}")
    return name


def select_rerank(embeddings: np.ndarray, labels: np.ndarray,
                  methods: Sequence[str] | None = None, metric: str = "map@r",
                  protocol: str = "all", query_mask: np.ndarray | None = None,
                  gallery_mask: np.ndarray | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score the plain ranking and every grid point of ``methods`` by ``metric``.

    Returns ``{"metric", "protocol", "none": score, "methods": {name: {"spec", "score",
    "grid": [[spec, score], ...]}}, "best": spec, "best_score": score}``; ``best`` is ``"none"``
    unless some method scores strictly higher than the plain ranking.
    """
    from nirdml.evaluation import evaluate

    methods, metric = check_methods(methods), check_metric(metric)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose 'all' or 'split'")
    if protocol == "split" and query_mask is None:
        query_mask, gallery_mask = split_masks(labels)

    def score(spec: str) -> float:
        res = evaluate(embeddings, labels, [metric], query_mask=query_mask,
                       gallery_mask=gallery_mask, rerank=spec)
        return float(res[metric])

    plain = score("none")
    out: dict[str, Any] = {"metric": metric, "protocol": protocol, "none": plain,
                           "methods": {}, "best": "none", "best_score": plain}
    if log:
        log(f"none: {metric} {plain:.4f}")
    for name in methods:
        grid = [[spec, score(spec)] for spec in grid_specs(name)]
        spec, best = max(grid, key=lambda row: row[1])
        out["methods"][name] = {"spec": spec, "score": best, "grid": grid}
        if log:
            log(f"{name}: best {spec} {metric} {best:.4f} ({best - plain:+.4f} over none, "
                f"{len(grid)} grid points)")
        if best > out["best_score"]:
            out["best"], out["best_score"] = spec, best
    return out


__all__ = ["PROTOCOLS", "check_methods", "check_metric", "grid_specs", "select_rerank",
           "split_masks"]
