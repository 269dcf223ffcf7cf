"""Verification: a cosine threshold for "same item?" at a target false-match rate, and the
false non-match rate it costs (FNMR@FMR, as open-metric-learning and face recognition report).

Pairs are every query-gallery pair of distinct samples (each unordered pair once when the
query and gallery sets are the same samples); a pair is *genuine* when both have one label,
an *impostor* otherwise. For a target rate ``f`` with ``I`` impostor pairs at most
``a = floor(f * I)`` impostors may match: the threshold ``t`` is the ``(a + 1)``-th largest
impostor score and the decision is ``same = score > t``, so the false-match rate reached is
``#{impostor > t} / I <= f`` (less when impostor scores tie at ``t``), and
``FNMR = #{genuine <= t} / G``. When ``a >= I`` every pair matches (``t = -inf``).

Scores are float64 inner products of the L2-normalised float32 embeddings, computed block by
block: only the genuine scores and the ``a + 1`` largest impostor scores are kept, never the
full score matrix. Written by hand: scikit-learn's ``roc_curve`` needs every score in memory
(``N^2 / 2`` of them for a test set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nirdml.errors import ConfigError, InputError

_BLOCK_ELEMENTS = 1 << 24  # scores per block (128 MiB of float64)


@dataclass(frozen=True)
class MatchThreshold:
    """The threshold for one target false-match rate and what it gives on the pairs it was
    fitted on: same item iff ``cosine > threshold``."""

    target_fmr: float
    threshold: float
    fmr: float
    fnmr: float
    impostor_pairs: int
    genuine_pairs: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_rates(rates: Sequence[float]) -> tuple[float, ...]:
    """The target false-match rates as floats in (0, 1) (ConfigError otherwise)."""
    out = []
    for rate in rates:
        ok = isinstance(rate, int | float | np.floating) and not isinstance(rate, bool)
        if not (ok and 0.0 < float(rate) < 1.0):
            raise ConfigError(f"a target false-match rate must be a number in (0, 1), "
                              f"e.g. 1e-3; got {rate!r}")
        out.append(float(rate))
    return tuple(out)


def _pair_counts(yq: np.ndarray, yg: np.ndarray, same_set: bool,
                 self_pos: np.ndarray) -> tuple[int, int]:
    """(genuine, impostor) pair counts from the labels alone."""
    if same_set:
        _, counts = np.unique(yg, return_counts=True)
        genuine = int((counts * (counts - 1) // 2).sum())
        n = yg.size
        return genuine, n * (n - 1) // 2 - genuine
    uniq, counts = np.unique(yg, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, yq), uniq.size - 1)
    same = np.where(uniq[pos] == yq, counts[pos], 0) - (self_pos >= 0)
    total = yq.size * yg.size - int((self_pos >= 0).sum())
    genuine = int(same.sum())
    return genuine, total - genuine


def fnmr_at_fmr(xq: np.ndarray, yq: np.ndarray, xg: np.ndarray, yg: np.ndarray,
                rates: Sequence[float], *, same_set: bool = False,
                self_pos: np.ndarray | None = None) -> dict[float, MatchThreshold]:
    """A :class:`MatchThreshold` for each target rate over the pairs of queries ``xq`` (labels
    ``yq``) and gallery ``xg`` (``yg``), L2-normalised; ``same_set``: the queries are the
    gallery (unordered pairs); else ``self_pos`` gives each query's gallery position (-1: none)
    and that pair is left out."""
    rates = check_rates(rates)
    yq, yg = np.asarray(yq), np.asarray(yg)
    own = np.full(yq.size, -1, np.int64) if self_pos is None or same_set else \
        np.asarray(self_pos, np.int64)
    n_gen, n_imp = _pair_counts(yq, yg, same_set, own)
    if n_gen == 0 or n_imp == 0:
        raise InputError(f"FNMR@FMR needs genuine and impostor pairs; these labels give "
                         f"{n_gen} genuine and {n_imp} impostor pairs")
    allowed = {r: math.floor(r * n_imp) for r in rates}
    keep = min(max(allowed.values()) + 1, n_imp)
    g = np.asarray(xg, np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(1, g.shape[0]))
    genuine, top = [], np.empty(0)
    for start in range(0, yq.size, block):
        stop = min(start + block, yq.size)
        s = np.asarray(xq[start:stop], np.float64) @ g.T
        valid = np.ones(s.shape, bool)
        rows = np.arange(start, stop)
        if same_set:
            valid &= np.arange(g.shape[0])[None, :] > rows[:, None]
        else:
            mine = own[start:stop] >= 0
            valid[np.flatnonzero(mine), own[start:stop][mine]] = False
        same = yq[start:stop, None] == yg[None, :]
        genuine.append(s[valid & same])
        imp = s[valid & ~same]
        if imp.size > keep:
            imp = np.partition(imp, imp.size - keep)[-keep:]
        top = np.concatenate([top, imp])
        if top.size > keep:
            top = np.partition(top, top.size - keep)[-keep:]
    genuine_scores = np.concatenate(genuine)
    top = np.sort(top)[::-1]
    out = {}
    for rate, a in allowed.items():
        t = float(top[a]) if a < n_imp else -math.inf
        fm = int((top > t).sum())  # every impostor above t is among the kept ones
        fnm = int((genuine_scores <= t).sum())
        out[rate] = MatchThreshold(rate, t, fm / n_imp, fnm / n_gen, n_imp, n_gen)
    return out


def fit_threshold(embeddings: np.ndarray, labels: np.ndarray,
                  rate: float) -> MatchThreshold:
    """The threshold for target false-match ``rate`` over all pairs of one labelled set (the
    validation classes), L2-normalising ``embeddings`` here."""
    from nirdml.embeddings import check_labels, l2_normalize

    x = l2_normalize(embeddings)
    y = check_labels(labels, x.shape[0])
    return fnmr_at_fmr(x, y, x, y, [rate], same_set=True)[check_rates([rate])[0]]


__all__ = ["MatchThreshold", "check_rates", "fit_threshold", "fnmr_at_fmr"]
