"""Re-ranking: post-processing of a query's gallery neighbours, one registered function each.

Every re-ranker takes L2-normalised ``queries`` ``(Q, D)`` and ``gallery`` ``(N, D)``, the
gallery position of each query (``self_pos``, -1 when the query is not a gallery item; a query
never retrieves itself) and a ``depth``, and returns ``(ids, scores)`` ``(Q, depth)``: gallery
positions, best first, and the score they were ranked by (higher is better). ``"none"`` is the
plain cosine ranking. The methods:

* ``alpha_qe`` -- alpha-weighted query expansion (Radenovic et al., TPAMI 2018): the query is
  replaced by the normalised sum of itself and its top ``n`` neighbours weighted by
  ``max(cos, 0) ** alpha``, and searched again.
* ``dba`` -- database-side augmentation (Arandjelovic & Zisserman 2012, with the same alpha
  weights): every gallery item is replaced by the weighted sum of itself and its top ``n``
  gallery neighbours; a query that is a gallery item is its augmented row, any other query
  stays as it is.
* ``k_reciprocal`` -- k-reciprocal encoding (Zhong et al., CVPR 2017) over the joint set of
  gallery items and outside queries: the Jaccard distance of the expanded k-reciprocal sets
  (``k1``, local expansion over ``k2`` neighbours), mixed with the cosine distance
  ``(1 - cos) / 2`` as ``(1 - lambda) * jaccard + lambda * cosine``. It re-orders the
  ``shortlist`` best cosine neighbours of each query (at least ``depth``), as deployed
  re-rankers do; items past the shortlist never move up.

The neighbour searches here are exact float32 inner products (faiss ``IndexFlatIP`` when it
is installed, else torch); ties are left in the backend's order, unlike ``evaluate``'s plain
ranking (``knn`` module), which a re-ranked score does not need. Written by hand: no well-kept
library offers these as functions over an embedding matrix (open-metric-learning's versions
are bound to its own pipeline; pytorch-metric-learning has none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nirdml.errors import ConfigError

_BLOCK = 4096  # query rows per exact search block


# ---------------------------------------------------------------------------------- search
def searcher(gallery: np.ndarray) -> Callable[[np.ndarray, int], tuple]:
    """``search(queries, k) -> (scores, ids)``: exact inner products over ``gallery`` (faiss
    ``IndexFlatIP`` when installed, else torch)."""
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    try:
        import faiss

        index = faiss.IndexFlatIP(g.shape[1])
        index.add(g)
        return index.search
    except ImportError:
        import torch

        gt = torch.from_numpy(g)

        def search(block, k):
            s, i = torch.topk(torch.from_numpy(block) @ gt.T, k, dim=1)
            return s.numpy(), i.numpy()

        return search


def knn(queries: np.ndarray, gallery: np.ndarray, k: int,
        self_pos: np.ndarray | None = None, search=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery positions by inner product ``(ids, scores)``, each query's own
    position (``self_pos`` >= 0) left out; ``k`` is cut to the gallery items a query can get.
    ``search``: a :func:`searcher` of ``gallery`` made before (else one is made here)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    own = np.full(q.shape[0], -1, np.int64) if self_pos is None else np.asarray(self_pos)
    extra = int((own >= 0).any())
    k = int(min(k, gallery.shape[0] - extra))
    want = k + extra
    search = search or searcher(gallery)
    ids = np.empty((q.shape[0], k), np.int64)
    scores = np.empty((q.shape[0], k), np.float32)
    for start in range(0, q.shape[0], _BLOCK):
        stop = min(start + _BLOCK, q.shape[0])
        s, i = search(q[start:stop], want)
        i = i.astype(np.int64)
        if extra:
            mine = i == own[start:stop, None]
            # drop the query's own item, else the last column (one item too many was asked)
            drop = np.where(mine.any(axis=1), mine.argmax(axis=1), want - 1)
            keep = np.ones_like(mine)
            keep[np.arange(stop - start), drop] = False
            i, s = i[keep].reshape(-1, k), s[keep].reshape(-1, k)
        ids[start:stop], scores[start:stop] = i, s
    return ids, scores


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _expand(x: np.ndarray, neighbours: np.ndarray, ids: np.ndarray, scores: np.ndarray,
            alpha: float) -> np.ndarray:
    """``x`` plus the ``max(s, 0) ** alpha``-weighted sum of its neighbours' rows, normalised."""
    w = np.maximum(scores, 0.0) ** alpha
    return _normalise(x + np.einsum("qn,qnd->qd", w, neighbours[ids]))


# ---------------------------------------------------------------------------------- methods
def plain(queries, gallery, self_pos, depth):
    """The cosine ranking itself (the baseline every method is compared with)."""
    return knn(queries, gallery, depth, self_pos)


def alpha_qe(queries, gallery, self_pos, depth, n: int = 2, alpha: float = 3.0):
    """Alpha-weighted query expansion over the top ``n`` neighbours (module docstring)."""
    ids, s = knn(queries, gallery, n, self_pos)
    return knn(_expand(queries, gallery, ids, s, alpha), gallery, depth, self_pos)


def dba(queries, gallery, self_pos, depth, n: int = 2, alpha: float = 3.0):
    """Database-side augmentation over the top ``n`` gallery neighbours (module docstring)."""
    ids, s = knn(gallery, gallery, n, np.arange(gallery.shape[0]))
    augmented = _expand(gallery, gallery, ids, s, alpha)
    own = np.asarray(self_pos)
    q = np.where((own >= 0)[:, None], augmented[np.maximum(own, 0)], queries)
    return knn(q, augmented, depth, self_pos)


def _reciprocal(nn: np.ndarray, width: int) -> list[np.ndarray]:
    """For each point, its neighbours among the first ``width`` that have it among theirs."""
    n = nn.shape[0]
    top = nn[:, :width]
    pairs = np.arange(n, dtype=np.int64)[:, None] * n + top
    back = top * n + np.arange(n, dtype=np.int64)[:, None]
    mutual = np.isin(back, pairs)
    return [top[p][mutual[p]] for p in range(n)]


def k_reciprocal(queries, gallery, self_pos, depth, k1: int = 20, k2: int = 6,
                 lambda_: float = 0.3, shortlist: int = 100):
    """k-reciprocal re-ranking of the ``shortlist`` best neighbours (module docstring)."""
    own = np.asarray(self_pos)
    outside = np.flatnonzero(own < 0)
    joint = np.concatenate([gallery, queries[outside]]) if outside.size else gallery
    where = own.copy()  # each query's row in the joint set
    where[outside] = gallery.shape[0] + np.arange(outside.size)
    m = joint.shape[0]
    k1, k2 = int(min(k1, m - 1)), int(min(k2, m))
    nn, _ = knn(joint, joint, k1 + 1)  # the point itself first (it is its best match)
    full, half = _reciprocal(nn, k1 + 1), _reciprocal(nn, max(1, round(k1 / 2)) + 1)
    rows, cols, vals = [], [], []
    for p in range(m):
        members = set(full[p].tolist())
        expanded = set(members)
        for c in full[p]:
            cand = half[c]
            if len(cand) and len(members.intersection(cand.tolist())) > 2 / 3 * len(cand):
                expanded.update(cand.tolist())
        ex = np.fromiter(expanded, np.int64)
        d = (1.0 - joint[ex] @ joint[p]) / 2.0
        w = np.exp(-d)
        rows.append(np.full(ex.size, p)), cols.append(ex), vals.append(w / w.sum())
    from scipy import sparse

    v = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(m, m))
    if k2 > 1:  # local query expansion: the mean over the k2 nearest (the point included)
        qe = sparse.csr_matrix((np.full(m * k2, 1.0 / k2), (np.repeat(np.arange(m), k2),
                                                            nn[:, :k2].reshape(-1))),
                               shape=(m, m))
        v = (qe @ v).tocsr()
    short = max(int(shortlist), int(depth))
    cand, cos = knn(queries, gallery, short, own)
    out_ids = np.empty((queries.shape[0], cand.shape[1]), np.int64)
    out_s = np.empty((queries.shape[0], cand.shape[1]), np.float32)
    for q in range(queries.shape[0]):
        vq = np.zeros(m)
        row = v[where[q]]
        vq[row.indices] = row.data
        vc = v[cand[q]]  # the candidates are gallery items: their joint rows are their ids
        mins = np.minimum(vc.data, vq[vc.indices])
        inter = np.add.reduceat(mins, vc.indptr[:-1]) if mins.size else np.zeros(cand.shape[1])
        inter[np.diff(vc.indptr) == 0] = 0.0
        jaccard = 1.0 - inter / np.maximum(2.0 - inter, 1e-12)
        final = (1.0 - lambda_) * jaccard + lambda_ * (1.0 - cos[q]) / 2.0
        order = np.argsort(final, kind="stable")
        out_ids[q], out_s[q] = cand[q][order], -final[order]
    return out_ids[:, :depth], out_s[:, :depth]


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Reranker:
    """A re-ranking method: its function, default parameters and the grid ``select`` searches
    on validation classes."""

    name: str
    fn: Callable[..., tuple[np.ndarray, np.ndarray]]
    defaults: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple] = field(default_factory=dict)


RERANKERS: dict[str, Reranker] = {r.name: r for r in (
    Reranker("none", plain),
    Reranker("alpha_qe", alpha_qe, {"n": 2, "alpha": 3.0},
             {"n": (1, 2, 3, 5, 10, 20), "alpha": (0.0, 1.0, 3.0, 5.0)}),
    Reranker("dba", dba, {"n": 2, "alpha": 3.0},
             {"n": (1, 2, 3, 5, 10, 20), "alpha": (0.0, 1.0, 3.0, 5.0)}),
    Reranker("k_reciprocal", k_reciprocal,
             {"k1": 20, "k2": 6, "lambda_": 0.3, "shortlist": 100},
             {"k1": (10, 20, 30), "k2": (1, 3, 6), "lambda_": (0.1, 0.3, 0.6)}),
)}

_TYPES = {"n": int, "k1": int, "k2": int, "shortlist": int, "alpha": float, "lambda_": float}


def parse_rerank(text: str | None) -> tuple[str, dict[str, Any]]:
    """``"alpha_qe"`` or ``"alpha_qe:n=3,alpha=1"`` -> (name, parameters over the defaults);
    a one-line ConfigError names an unknown method or parameter, or a bad value."""
    name, _, rest = (text or "none").partition(":")
    name = name.strip().lower()
    if name not in RERANKERS:
        raise ConfigError(f"unknown re-ranking {name!r}; choose one of: "
                          f"{', '.join(RERANKERS)}")
    params = dict(RERANKERS[name].defaults)
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key == "lambda":
            key = "lambda_"
        if not eq or key not in params:
            raise ConfigError(f"re-ranking {name!r} takes {', '.join(params) or 'no'} "
                              f"parameters (as {name}:KEY=VALUE,...), got {item!r}")
        try:
            params[key] = _TYPES[key](value)
        except ValueError:
            raise ConfigError(f"re-ranking {name}: {key} must be a {_TYPES[key].__name__}, "
                              f"got {value!r}") from None
    check_params(name, params)
    return name, params


def check_params(name: str, params: dict[str, Any]) -> None:
    """ConfigError unless ``params`` are in range for method ``name``."""
    for key, value in params.items():
        low = 0.0 if key in ("alpha",) else 1
        bad = (not np.isfinite(value) or value < low) if key != "lambda_" else \
            not 0.0 <= value <= 1.0
        if bad:
            allowed = "in [0, 1]" if key == "lambda_" else f">= {low}"
            raise ConfigError(f"re-ranking {name}: {key} must be {allowed}, got {value!r}")


def rerank(name: str, queries: np.ndarray, gallery: np.ndarray, depth: int,
           self_pos: np.ndarray | None = None, **params) -> tuple[np.ndarray, np.ndarray]:
    """Top-``depth`` gallery ``(ids, scores)`` of each query after re-ranking ``name`` with
    ``params`` (over its defaults); inputs must be L2-normalised float32."""
    method = RERANKERS[parse_rerank(name)[0]]
    merged = {**method.defaults, **params}
    check_params(method.name, merged)
    own = np.full(queries.shape[0], -1, np.int64) if self_pos is None else \
        np.asarray(self_pos, np.int64)
    return method.fn(queries, gallery, own, int(depth), **merged)





# ---------------------------------------------------------------------------------- served
def parse_served(spec: str | None) -> tuple[str, dict[str, Any]]:
    """:func:`parse_rerank` for a served index: ConfigError for ``k_reciprocal``."""
    name, params = parse_rerank(spec)
    if name == "k_reciprocal":
        raise ConfigError("k_reciprocal re-ranking re-encodes the whole gallery with every "
                          "query batch: it is for evaluate only; use alpha_qe or dba here")
    return name, params


class IndexReranker:
    """Re-ranking of outside queries against a fixed gallery (a served index), its gallery-side
    work done once: ``alpha_qe`` expands each query over the gallery, ``dba`` searches the
    augmented gallery (built here, once). ``k_reciprocal`` re-encodes the joint set of queries
    and gallery for every query batch (a whole-gallery neighbour search each time), so it is
    for evaluation only and refused here. ``search`` equals :func:`rerank` with no query in
    the gallery."""

    def __init__(self, spec: str, gallery: np.ndarray):
        self.name, self.params = parse_served(spec)
        self.gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        self._gallery_search = searcher(self.gallery)
        self.searched, self._search = self.gallery, self._gallery_search
        if self.name == "dba":
            n, alpha = self.params["n"], self.params["alpha"]
            ids, s = knn(self.gallery, self.gallery, n, np.arange(self.gallery.shape[0]),
                         self._gallery_search)
            self.searched = _expand(self.gallery, self.gallery, ids, s, alpha)
            self._search = searcher(self.searched)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.name == "alpha_qe":
            ids, s = knn(q, self.gallery, self.params["n"], search=self._gallery_search)
            q = _expand(q, self.gallery, ids, s, self.params["alpha"])
        return knn(q, self.searched, k, search=self._search)
__all__ = ["RERANKERS", "IndexReranker", "Reranker", "check_params", "knn", "parse_rerank",
           "parse_served", "rerank", "searcher"]
