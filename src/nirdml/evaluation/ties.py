"""The canonical neighbour order: near-ties resolved exactly, degenerate data in bounded work.

Backends return neighbours by float32 score; this module turns their rows into the canonical
order of the ``knn`` module docstring: runs of neighbours whose float32 scores lie within
``score_tolerance`` of each other are re-scored in float64 (products of float32 numbers are
exact there) and ordered by (score, index); rows whose last retrieved score is not clearly
below the k-th are searched again wider (``settle_rows``). Degenerate (collapsed) embeddings get
bounded work and a ``DegenerateTiesWarning`` (module constants ``DEGENERATE_TIES``,
``MAX_EXACT_RUN``).
"""

from __future__ import annotations

import warnings

import numpy as np


def score_tolerance(dim: int) -> float:
    """Scores closer than this in float32 are compared again in float64 (see module doc).

    A float32 dot product of two unit vectors in any summation order is within
    ``D * 2**-24 / (1 - D * 2**-24)`` of the exact value; two backends can thus disagree by at
    most twice that. The tolerance is that, plus 25% slack.
    """
    d = max(int(dim), 1)
    gamma = d * 2.0**-24 / (1.0 - d * 2.0**-24)
    return 2.5 * gamma


def exact_scores(
    queries: np.ndarray, q_rows: np.ndarray, gallery: np.ndarray, g_rows: np.ndarray,
    chunk: int = 8192,
) -> np.ndarray:
    """float64 inner products ``queries[q_rows[i]] . gallery[g_rows[i]]`` (deterministic).

    Each product of two float32 numbers is exact in float64; the sum is evaluated the same way
    for every pair, so equal embeddings always get equal scores.
    """
    out = np.empty(q_rows.shape[0], dtype=np.float64)
    for s in range(0, q_rows.shape[0], chunk):
        q = queries[q_rows[s : s + chunk]].astype(np.float64)
        g = gallery[g_rows[s : s + chunk]].astype(np.float64)
        out[s : s + chunk] = np.sum(q * g, axis=1)
    return out


def _drop_self(s32: np.ndarray, idx: np.ndarray, self_pos: np.ndarray):
    """Remove each row's own index (at most one per row), shifting the rest left.

    When every row finds itself first (the usual all-vs-all case) this is a slice dropping the
    first column; otherwise rows keep their width and are padded with -1.
    """
    if not (self_pos >= 0).any():
        return s32, idx
    hit = idx == self_pos[:, None]
    if hit[:, 0].all():
        return s32[:, 1:], idx[:, 1:]
    has = hit.any(axis=1)
    if not has.any():
        return s32, idx
    cols = np.arange(idx.shape[1])
    where = np.where(has, hit.argmax(axis=1), idx.shape[1])
    src = cols[None, :] + (cols[None, :] >= where[:, None])
    last = src >= idx.shape[1]
    src = np.minimum(src, idx.shape[1] - 1)
    s32 = np.take_along_axis(s32, src, axis=1)
    idx = np.where(last, -1, np.take_along_axis(idx, src, axis=1))
    return s32, idx


#: a query with more near-tied neighbours than ``max(4 k, k + DEGENERATE_TIES)`` is degenerate
DEGENERATE_TIES = 2048
#: chains of near-tied neighbours longer than this are ordered without float64 re-scoring
MAX_EXACT_RUN = 256


class DegenerateTiesWarning(UserWarning):
    """Embeddings (nearly) collapsed: some queries' ties were broken by index."""


def _ensure_sorted(s32: np.ndarray, idx: np.ndarray):
    """Rows in decreasing score order (backends return them so; this is only a safety net)."""
    bad = (np.diff(s32, axis=1) > 0).any(axis=1)
    if bad.any():
        order = np.argsort(-s32[bad], axis=1, kind="stable")
        s32[bad] = np.take_along_axis(s32[bad], order, axis=1)
        idx[bad] = np.take_along_axis(idx[bad], order, axis=1)
    return s32, idx


def _fix_near_ties(
    queries: np.ndarray,
    rows: np.ndarray,
    gallery: np.ndarray,
    s32: np.ndarray,
    idx: np.ndarray,
    tol: float,
    rel: np.ndarray | None,
) -> None:
    """Reorder (in place) every run of near-tied neighbours by (-float64 score, index).

    ``s32``/``idx``: rows sorted by decreasing float32 score, -1 (invalid) entries last. A run is
    a maximal chain of neighbours whose consecutive float32 scores differ by at most ``tol``;
    with ``rel`` (relevance per entry) runs that are all relevant or all irrelevant are skipped.
    Work is proportional to the number of entries in runs.
    """
    valid = idx >= 0
    close = (s32[:, :-1] - s32[:, 1:] <= tol) & valid[:, 1:] & valid[:, :-1]
    if not close.any():
        return
    flagged = np.zeros(idx.shape, dtype=bool)
    flagged[:, :-1] |= close
    flagged[:, 1:] |= close
    r, c = np.nonzero(flagged)  # row-major: the members of a run are consecutive
    starts = np.ones(r.size, dtype=bool)
    inner = c > 0
    starts[inner] = ~close[r[inner], c[inner] - 1]
    run = np.cumsum(starts) - 1
    if rel is not None:
        hits = np.bincount(run, weights=rel[r, c])
        size = np.bincount(run)
        mixed = ((hits > 0) & (hits < size))[run]
        r, c, run = r[mixed], c[mixed], run[mixed]
        if r.size == 0:
            return
    members = idx[r, c]
    size = np.bincount(run)
    long_run = size[run] > MAX_EXACT_RUN
    if long_run.any():
        _count_degenerate_runs(int((size > MAX_EXACT_RUN).sum()))
        key = s32[r, c].astype(np.float64)
        short = ~long_run
        key[short] = exact_scores(queries, rows[r[short]], gallery, members[short])
    else:
        key = exact_scores(queries, rows[r], gallery, members)
    order = np.lexsort((members, -key, run))
    idx[r, c] = members[order]
    s32[r, c] = s32[r, c][order]


def _search_rows(searcher, queries: np.ndarray, rows: np.ndarray, self_pos: np.ndarray,
                 kk: int):
    """Top-``kk`` search of ``queries[rows]``: ``(s32, idx, lowest)``.

    ``s32`` / ``idx``: float32 scores and gallery positions by decreasing score, each query's own
    index dropped (fresh arrays, changed in place by the caller); ``lowest``: each row's smallest
    retrieved score, taken before dropping self, which bounds every unretrieved one.
    """
    s32, idx = searcher.search(queries[rows], kk)
    s32 = np.asarray(s32, dtype=np.float32)
    idx = np.asarray(idx, dtype=np.int64)
    s32, idx = _ensure_sorted(s32, idx)
    lowest = s32[:, -1].copy()
    s32, idx = _drop_self(s32, idx, self_pos[rows])
    return s32, idx, lowest


def _by_float32_score(s32: np.ndarray, idx: np.ndarray, width: int, n_gallery: int):
    """The first ``width`` retrieved neighbours by (-float32 score, index), -1 entries last: the
    bounded order of degenerate rows (no exact scores)."""
    order = np.lexsort((np.where(idx >= 0, idx, n_gallery), -s32))
    return np.take_along_axis(idx, order, 1)[:, :width]


def _relevance(idx: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray) -> np.ndarray:
    """Whether each retrieved neighbour (``idx``, -1 = none) has its query's label."""
    return (g_labels[idx] == q_labels[:, None]) & (idx >= 0)


def settle_rows(
    searcher,
    queries: np.ndarray,
    gallery: np.ndarray,
    self_pos: np.ndarray,
    width: int,
    extra: int,
    tol: float,
    q_labels: np.ndarray | None = None,
    g_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Neighbour table ``(b, width)`` of gallery positions in canonical order, -1 padded.

    With labels, near ties are only resolved where the result could change a metric (runs of
    tied neighbours that mix the query's class with others); the table then equals the canonical
    one up to the order among tied neighbours of equal relevance.
    """
    n_gallery = gallery.shape[0]
    b = queries.shape[0]
    out = np.full((b, width), -1, dtype=np.int64)
    rows = np.arange(b)
    has_self = bool((self_pos >= 0).any())
    kk = min(n_gallery, width + int(has_self) + extra)
    cap = max(4 * width, width + DEGENERATE_TIES)
    while rows.size:
        s32, idx, lowest = _search_rows(searcher, queries, rows, self_pos, kk)
        final = kk >= n_gallery  # everything was retrieved: the order is final
        # A row whose retrieved scores all lie within tol of each other cannot settle at this
        # kk whatever the order inside it: search again (wider) before resolving its ties.
        # At the cap it is degenerate (embeddings collapsed to within float32 precision):
        # settled by (float32 score, index) among the retrieved, without exact scores.
        flat = (s32[:, 0] - lowest <= tol) & (not final)
        degenerate = flat & (kk >= cap)
        if degenerate.any():
            _count_degenerate(int(degenerate.sum()), width)
            out[rows[degenerate]] = _by_float32_score(s32[degenerate], idx[degenerate], width,
                                                      n_gallery)
        wider = rows[flat & ~degenerate]
        live = ~flat
        rows, s32, idx, lowest = rows[live], s32[live], idx[live], lowest[live]
        rel = None if q_labels is None else _relevance(idx, q_labels[rows], g_labels)
        _fix_near_ties(queries, rows, gallery, s32, idx, tol, rel)
        if final:
            out[rows, : min(width, idx.shape[1])] = idx[:, :width]
            break
        kth = s32[:, width - 1]
        ok = lowest < kth - tol
        if kk >= cap and not ok.all():
            # bounded work: a row still tied with unretrieved neighbours at the cap is settled
            # among the retrieved ones (their ties resolved exactly above)
            _count_degenerate(int((~ok).sum()), width)
            ok[:] = True
        out[rows[ok]] = idx[ok, :width]
        rows = np.concatenate([rows[~ok], wider])
        kk = min(n_gallery, 2 * kk)
    return out


def _count_degenerate_runs(n: int) -> None:
    warnings.warn(
        f"{n} chains of more than {MAX_EXACT_RUN} near-tied neighbours (within float32 "
        f"precision): the embeddings are (nearly) collapsed; those chains were ordered by "
        f"float32 score and index", DegenerateTiesWarning, stacklevel=5)


def _count_degenerate(n: int, width: int) -> None:
    warnings.warn(
        f"{n} queries have more than {max(4 * width, width + DEGENERATE_TIES)} neighbours "
        f"tied (within float32 precision) with their k-th: the embeddings are (nearly) "
        f"collapsed; their ties with unretrieved neighbours were broken by the order of the "
        f"retrieved ones",
        DegenerateTiesWarning, stacklevel=4)
