"""Ranking metrics: the registry of retrieval metrics, each summed block by block over queries.

Each metric is one ``@ranking_metric`` entry below: its name (``"recall"`` for the family
``recall@K``), the neighbour-table width it reads (its ``"k"``, ``"R"`` or a fixed depth) and a
function giving its sum over a block of queries. ``parse_metrics``, ``evaluate`` and
``RankingAccumulator`` only iterate over ``RANKING_METRICS`` (in entry order, which is the order
of the returned keys); a new metric is a new entry here.

For a query q with label y, ``rel[j]`` is 1 when its (j+1)-th neighbour (itself excluded) has
label y. ``R`` = number of gallery items labelled y other than q; ``C`` = the class size that
``map@1000`` divides by (gallery items labelled y, q included when q is in the gallery). Queries
with ``R == 0`` ("lone" queries) are excluded before these functions are called. Definitions
(each averaged over queries, a fraction in [0, 1]):

* ``recall@k``: 1 if any of the first k neighbours is relevant (the DML "Recall@k");
* ``precision@k``: (relevant among the first k) / k;
* ``map@r``: (1/R) * sum over relevant ranks j <= R of precision@j (Musgrave et al. 2020);
* ``r_precision``: (relevant among the first R) / R (Musgrave et al. 2020);
* ``map@1000``: (1/C) * sum over relevant ranks j <= 1000 of precision@j -- the NIR release's
  mAP@1000, which divides by the full class size (no ``min(1000, .)``), so a perfect ranking
  scores R / (R + 1) when queries are part of the gallery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

MAP_AT = 1000


class Block:
    """One block of queries: ``rel`` (b, W) bool, ``r`` (b,) relevant counts, ``c`` (b,) class
    sizes, and the prefix statistics shared by the metrics declared ``cumulative``.

    ``cum``, ``ranks`` and ``precision`` are computed once per block, over ``depth`` columns: the
    largest width among the requested cumulative metrics, at most W.
    """

    def __init__(self, rel: np.ndarray, r: np.ndarray, c: np.ndarray, depth: int = 0):
        self.rel = rel
        self.r = np.asarray(r, dtype=np.int64)
        self.c = c
        self.depth = depth

    @cached_property
    def cum(self) -> np.ndarray:
        """(b, depth) int64: relevant neighbours among the first j + 1."""
        return np.cumsum(self.rel[:, : self.depth], axis=1, dtype=np.int64)

    @cached_property
    def ranks(self) -> np.ndarray:
        """(depth,) float64: the ranks 1 .. depth."""
        return np.arange(1, self.depth + 1, dtype=np.float64)

    @cached_property
    def precision(self) -> np.ndarray:
        """(b, depth) float64: precision@j at the relevant ranks j, 0 elsewhere."""
        return np.where(self.rel[:, : self.depth], self.cum / self.ranks, 0.0)


@dataclass(frozen=True)
class RankingMetric:
    """A registered ranking metric (see ``ranking_metric``)."""

    name: str
    width: str | int
    block_sum: Callable[..., float]
    cumulative: bool = False
    headline: bool = False
    epoch: bool = False

    @property
    def per_k(self) -> bool:
        """Whether this is a family of metrics ``name@K``."""
        return self.width == "k"

    def key(self, k: int | None) -> str:
        """The result key: ``name@K`` for a family, else ``name``."""
        return f"{self.name}@{k}" if self.per_k else self.name

    def needs(self, k: int | None, r: np.ndarray) -> int:
        """Neighbours it reads for queries with relevant counts ``r`` (``k``: its K)."""
        if self.width == "k":
            return int(k)
        if self.width == "R":
            return int(r.max())
        return int(self.width)


#: name -> entry, in the order of the returned keys
RANKING_METRICS: dict[str, RankingMetric] = {}


def ranking_metric(name: str, width: str | int, *, cumulative: bool = False,
                   headline: bool = False, epoch: bool = False):
    """Register the decorated ``block_sum`` as the ranking metric ``name``.

    ``width``: the neighbours it reads -- ``"k"`` (a family ``name@K``; ``block_sum(block, k)``),
    ``"R"`` (each query's relevant count) or a fixed number; other metrics get
    ``block_sum(block)``. ``block_sum`` returns the metric summed over the block's queries (a
    ``Block``); the result is that sum over all blocks / the number of queries.
    ``cumulative``: it reads ``block.cum`` / ``ranks`` / ``precision``. ``headline``: shown in
    the summary after training; ``epoch``: also on each epoch's console line (families: K = 1).
    """

    def register(block_sum: Callable[..., float]) -> Callable[..., float]:
        RANKING_METRICS[name] = RankingMetric(name, width, block_sum, cumulative, headline,
                                              epoch)
        return block_sum

    return register


@ranking_metric("recall", width="k", headline=True, epoch=True)
def recall_at_k(block: Block, k: int) -> float:
    return float(block.rel[:, :k].any(axis=1).sum())


@ranking_metric("precision", width="k")
def precision_at_k(block: Block, k: int) -> float:
    return float(block.rel[:, :k].sum()) / k


@ranking_metric("map@r", width="R", cumulative=True, headline=True, epoch=True)
def map_at_r(block: Block) -> float:
    within_r = block.ranks[None, :] <= block.r[:, None]
    ap = np.where(within_r, block.precision, 0.0).sum(axis=1) / block.r
    return float(ap.sum())


@ranking_metric("r_precision", width="R", cumulative=True, headline=True)
def r_precision(block: Block) -> float:
    r = block.r
    hits = np.take_along_axis(block.cum, (np.minimum(r, block.depth) - 1)[:, None], axis=1)[:, 0]
    return float(np.sum(hits / r))


@ranking_metric("map@1000", width=MAP_AT, cumulative=True, headline=True)
def map_at_1000(block: Block) -> float:
    ap = block.precision[:, :MAP_AT].sum(axis=1) / np.asarray(block.c, dtype=np.float64)
    return float(ap.sum())


class RankingAccumulator:
    """Sums per-query ranking metrics over blocks; ``result()`` returns the means.

    ``requested``: ``(name, k)`` pairs of ``RANKING_METRICS`` entries (``k`` None unless the
    entry is a family ``name@K``).
    """

    def __init__(self, requested: Iterable[tuple[str, int | None]] = ()):
        self.metrics = [(RANKING_METRICS[name], k) for name, k in requested]
        self.count = 0
        self.sums: dict[str, float] = {m.key(k): 0.0 for m, k in self.metrics}

    def update(self, rel: np.ndarray, r: np.ndarray, c: np.ndarray) -> None:
        """Add a block: ``rel`` (b, W) bool, ``r`` (b,) relevant counts, ``c`` (b,) class sizes."""
        b, width = rel.shape
        if b == 0:
            return
        self.count += b
        block = Block(rel, r, c)
        needs = [m.needs(k, block.r) for m, k in self.metrics if m.cumulative]
        block.depth = min(max(needs, default=0), width)
        for m, k in self.metrics:
            self.sums[m.key(k)] += m.block_sum(block, k) if m.per_k else m.block_sum(block)

    def result(self) -> dict[str, float]:
        """Means over all queries seen (NaN for every metric when there were none)."""
        if self.count == 0:
            return {name: float("nan") for name in self.sums}
        return {name: total / self.count for name, total in self.sums.items()}
