"""Ranking metrics computed block by block from a neighbour relevance table.

For a query q with label y, ``rel[j]`` is 1 when its (j+1)-th neighbour (itself excluded) has
label y. ``R`` = number of gallery items labelled y other than q; ``C`` = the class size that
``map@1000`` divides by (gallery items labelled y, q included when q is in the gallery). Queries
with ``R == 0`` ("lone" queries) are excluded before these functions are called. Definitions
(each averaged over queries, a fraction in [0, 1]):

* ``recall@k``: 1 if any of the first k neighbours is relevant (the DML "Recall@k");
* ``precision@k``: (relevant among the first k) / k;
* ``r_precision``: (relevant among the first R) / R (Musgrave et al. 2020);
* ``map@r``: (1/R) * sum over relevant ranks j <= R of precision@j (Musgrave et al. 2020);
* ``map@1000``: (1/C) * sum over relevant ranks j <= 1000 of precision@j -- the NIR release's
  mAP@1000, which divides by the full class size (no ``min(1000, .)``), so a perfect ranking
  scores R / (R + 1) when queries are part of the gallery.
"""

from __future__ import annotations

import numpy as np

MAP_AT = 1000


class RankingAccumulator:
    """Sums per-query ranking metrics over blocks; ``result()`` returns the means."""

    def __init__(
        self,
        recall_ks=(),
        precision_ks=(),
        map_r: bool = False,
        r_precision: bool = False,
        map_1000: bool = False,
    ):
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.precision_ks = tuple(int(k) for k in precision_ks)
        self.map_r = map_r
        self.r_precision = r_precision
        self.map_1000 = map_1000
        self.count = 0
        self.sums: dict[str, float] = {f"recall@{k}": 0.0 for k in self.recall_ks}
        self.sums.update({f"precision@{k}": 0.0 for k in self.precision_ks})
        for flag, name in ((map_r, "map@r"), (r_precision, "r_precision"), (map_1000, "map@1000")):
            if flag:
                self.sums[name] = 0.0

    def update(self, rel: np.ndarray, r: np.ndarray, c: np.ndarray) -> None:
        """Add a block: ``rel`` (b, W) bool, ``r`` (b,) relevant counts, ``c`` (b,) class sizes."""
        b, width = rel.shape
        if b == 0:
            return
        self.count += b
        for k in self.recall_ks:
            self.sums[f"recall@{k}"] += float(rel[:, :k].any(axis=1).sum())
        for k in self.precision_ks:
            self.sums[f"precision@{k}"] += float(rel[:, :k].sum()) / k
        if not (self.map_r or self.r_precision or self.map_1000):
            return
        r = np.asarray(r, dtype=np.int64)
        depth = 0
        if self.map_r or self.r_precision:
            depth = int(r.max())
        if self.map_1000:
            depth = max(depth, MAP_AT)
        depth = min(depth, width)
        rel_d = rel[:, :depth]
        cum = np.cumsum(rel_d, axis=1, dtype=np.int64)
        if self.r_precision:
            hits = np.take_along_axis(cum, (np.minimum(r, depth) - 1)[:, None], axis=1)[:, 0]
            self.sums["r_precision"] += float(np.sum(hits / r))
        if self.map_r or self.map_1000:
            ranks = np.arange(1, depth + 1, dtype=np.float64)
            prec = np.where(rel_d, cum / ranks, 0.0)  # precision@j at relevant ranks
            if self.map_r:
                within_r = ranks[None, :] <= r[:, None]
                ap = np.where(within_r, prec, 0.0).sum(axis=1) / r
                self.sums["map@r"] += float(ap.sum())
            if self.map_1000:
                ap = prec[:, :MAP_AT].sum(axis=1) / np.asarray(c, dtype=np.float64)
                self.sums["map@1000"] += float(ap.sum())

    def result(self) -> dict[str, float]:
        """Means over all queries seen (NaN for every metric when there were none)."""
        if self.count == 0:
            return {name: float("nan") for name in self.sums}
        return {name: total / self.count for name, total in self.sums.items()}
