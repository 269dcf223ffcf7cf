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
    if name == "k_reciprocal" and params["k2"] > params["k1"] + 1:
        raise ConfigError(f"re-ranking k_reciprocal: k2 (the local expansion) must be at most "
                          f"k1 + 1 (the neighbours each point keeps), got k2={params['k2']}, "
                          f"k1={params['k1']}")


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
    """:func:`parse_rerank` for a served index (every method; kept as the served entry point)."""
    return parse_rerank(spec)


class _OneQueryReciprocal:
    """k-reciprocal re-ranking of one outside query against a fixed gallery, exactly as
    :func:`k_reciprocal` re-ranks it over the joint set ``gallery + [query]``, with the
    gallery's neighbour lists searched once (``prepare``). Adding the query to the joint set
    changes only the lists it enters (a gallery item whose ``k1``-th neighbour it beats): the
    reciprocal sets, encodings and local expansions are recomputed from those lists, for the
    points the query's Jaccard distances read."""

    def __init__(self, gallery: np.ndarray, k1: int, k2: int, lambda_: float, shortlist: int,
                 search):
        self.g = gallery
        n = gallery.shape[0]
        if n <= k1:
            raise ConfigError(f"k_reciprocal:k1={k1} needs a gallery of more than k1 items; "
                              f"this one has {n}: lower k1")
        self.k1, self.k2 = int(k1), int(min(k2, n + 1))
        self.half = max(1, round(self.k1 / 2)) + 1
        self.lambda_, self.shortlist, self.search = lambda_, int(shortlist), search
        # the gallery's own lists: itself first, then its k1 nearest gallery items
        s, i = search(self.g, self.k1 + 1)  # as k_reciprocal searches the joint set
        self.nn, self.nn_s = i.astype(np.int64), s
        # Python lists and the membership sets of both widths, for the per-query loops
        self.rows = self.nn.tolist()
        self.sets = {w: [set(r[:w]) for r in self.rows] for w in (self.k1 + 1, self.half)}

    def rank(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        n, k1 = self.g.shape[0], self.k1
        me = n  # the query's row in the joint set
        scores = self.g @ q
        # lists the query enters: it beats their last (k1-th) neighbour
        entered = np.flatnonzero(scores > self.nn_s[:, k1])
        lists: dict[int, list[int]] = {}
        for j in entered.tolist():
            at = int(np.searchsorted(-self.nn_s[j, 1:], -scores[j], side="right")) + 1
            lists[j] = [*self.rows[j][:at], me, *self.rows[j][at:k1]]
        want = min(max(k1, self.shortlist, depth), n)
        part = np.argpartition(-scores, want - 1)[:want] if want < n else np.arange(n)
        top = part[np.argsort(-scores[part], kind="stable")]
        lists[me] = [me, *top[:k1].tolist()]
        changed_sets: dict[tuple[int, int], set[int]] = {}

        def vec(p: int) -> np.ndarray:
            return q if p == me else self.g[p]

        def neighbours(p: int, width: int) -> list[int]:
            return lists[p][:width] if p in lists else self.rows[p][:width]

        def holds(c: int, p: int, width: int) -> bool:
            """Whether ``p`` is among the first ``width`` of ``c``'s list."""
            if c not in lists:
                return p in self.sets[width][c]
            key = (c, width)
            if key not in changed_sets:
                changed_sets[key] = set(lists[c][:width])
            return p in changed_sets[key]

        recip_memo: dict[tuple[int, int], list[int]] = {}

        def reciprocal(p: int, width: int) -> list[int]:
            key = (p, width)
            if key not in recip_memo:
                recip_memo[key] = [c for c in neighbours(p, width) if holds(c, p, width)]
            return recip_memo[key]

        enc_memo: dict[int, dict[int, float]] = {}

        def encode(p: int) -> dict[int, float]:
            if p not in enc_memo:
                members = set(reciprocal(p, k1 + 1))
                expanded = set(members)
                for c in reciprocal(p, k1 + 1):
                    cand = reciprocal(c, self.half)
                    if cand and len(members.intersection(cand)) > 2 / 3 * len(cand):
                        expanded.update(cand)
                ex = np.fromiter(expanded, np.int64)
                d = (1.0 - np.stack([vec(int(x)) for x in ex]) @ vec(p)) / 2.0
                w = np.exp(-d)
                enc_memo[p] = dict(zip(ex.tolist(), (w / w.sum()).tolist()))
            return enc_memo[p]

        def expanded_encoding(p: int) -> dict[int, float]:
            if self.k2 <= 1:
                return encode(p)
            out: dict[int, float] = {}
            for x in neighbours(p, self.k2):
                for key, value in encode(x).items():
                    out[key] = out.get(key, 0.0) + value / self.k2
            return out

        short = max(self.shortlist, depth)
        cand, cos = top[:short], scores[top[:short]]
        vq = expanded_encoding(me)
        final = np.empty(cand.size)
        for i, c in enumerate(cand.tolist()):
            vc = expanded_encoding(c)
            inter = sum(min(value, vq[key]) for key, value in vc.items() if key in vq)
            final[i] = (1.0 - self.lambda_) * (1.0 - inter / max(2.0 - inter, 1e-12)) \
                + self.lambda_ * (1.0 - cos[i]) / 2.0
        order = np.argsort(final, kind="stable")[:depth]
        return cand[order], (-final[order]).astype(np.float32)


class IndexReranker:
    """Re-ranking of outside queries against a fixed gallery (a served index), its gallery-side
    work done once: ``alpha_qe`` expands each query over the gallery, ``dba`` searches the
    augmented gallery (built here, once), ``k_reciprocal`` keeps the gallery's neighbour lists
    and re-ranks each query over ``gallery + [query]`` (:class:`_OneQueryReciprocal`: each
    query on its own, as a served query is). ``search`` equals :func:`rerank` with each query
    alone and not in the gallery."""

    def __init__(self, spec: str, gallery: np.ndarray):
        self.name, self.params = parse_served(spec)
        self.gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        self._gallery_search = searcher(self.gallery)
        self.searched, self._search = self.gallery, self._gallery_search
        self._reciprocal = None
        if self.name == "dba":
            n, alpha = self.params["n"], self.params["alpha"]
            ids, s = knn(self.gallery, self.gallery, n, np.arange(self.gallery.shape[0]),
                         self._gallery_search)
            self.searched = _expand(self.gallery, self.gallery, ids, s, alpha)
            self._search = searcher(self.searched)
        if self.name == "k_reciprocal":
            self._reciprocal = _OneQueryReciprocal(self.gallery, search=self._gallery_search,
                                                   **self.params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self._reciprocal is not None:
            k = int(min(k, self.gallery.shape[0]))
            ids = np.empty((q.shape[0], k), np.int64)
            scores = np.empty((q.shape[0], k), np.float32)
            for row in range(q.shape[0]):
                ids[row], scores[row] = self._reciprocal.rank(q[row], k)
            return ids, scores
        if self.name == "alpha_qe":
            ids, s = knn(q, self.gallery, self.params["n"], search=self._gallery_search)
            q = _expand(q, self.gallery, ids, s, self.params["alpha"])
        return knn(q, self.searched, k, search=self._search)


__all__ = ["RERANKERS", "IndexReranker", "Reranker", "check_params", "knn", "parse_rerank",
           "parse_served", "rerank", "searcher"]
