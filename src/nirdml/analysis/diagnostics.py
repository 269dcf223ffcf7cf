"""Embedding-space structure diagnostics (pure NumPy, float64, never an N x N matrix).

Every function takes ``embeddings`` of shape ``(N, D)`` (and, where needed, integer ``labels`` of
shape ``(N,)``) and first L2-normalises each row. Distances are Euclidean on the unit sphere.
Pairwise quantities are accumulated block by block (``block`` rows at a time), so memory stays at
``O(block^2 + N D)`` even for N of the order of 60k.

Definitions (the paper, Roth et al. CVPR 2022, names the four numbers but publishes exact
definitions only for ``rho`` and ``pi_density``; ``sigma2_kappa`` and ``G2`` are *our* choices):

- ``rho`` (:func:`spectral_decay`): singular values ``s_1 >= ... >= s_D`` of the *uncentred*
  ``N x D`` matrix (zero-padded to D when N < D). The authors' form (``form="release"``, the
  default, as their metric code computes it: a truncated SVD keeping ``D - 1`` components, the
  first dropped) keeps ``s_2 .. s_{D-1}``; ``form="full"`` (``rho_full``, nirdml's earlier
  ``rho``) keeps ``s_2 .. s_D``. The kept values are normalised to sum 1 (``p``); values below
  ``eps`` are raised to ``eps`` and ``p`` renormalised; ``rho = KL(U || p) = sum_i U_i log(U_i /
  p_i)`` (natural log) with ``U`` uniform over the kept entries. Either form is dominated by any
  direction the embedding cannot use: a network whose last layer maps F < D features to D
  dimensions has ``D - F - 1`` zero singular values, each adding about ``log(1 / (m eps)) / m``.
  ``rank`` (:func:`numerical_rank`) says when that is the case.
- ``pi_density`` (:func:`density_ratio`), as in Roth et al. 2020 ("Revisiting training
  strategies..."): ``pi_intra`` = mean over classes (with >= 2 samples) of the mean pairwise
  distance between that class's samples; ``pi_inter`` = mean pairwise distance between the class
  means (means of the normalised embeddings, not renormalised, all classes);
  ``pi_density = pi_intra / pi_inter``.
- ``sigma2_kappa`` (:func:`cluster_size_variance`): ``kappa_c`` = mean distance of class c's
  samples to the class mean; ``sigma2_kappa`` = population variance (ddof=0) of ``kappa_c`` over the
  classes with >= 2 samples.
- ``G2`` (:func:`uniformity_g2`, Wang & Isola 2020 without their log):
  ``mean_{i<j} exp(-t ||x_i - x_j||^2)`` with ``t = 2``; exact for ``N <= max_exact`` (20000),
  otherwise estimated from ``num_pairs`` unordered pairs ``i != j`` drawn uniformly with a seeded
  generator (standard error below 1e-3 for the default 2M pairs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nirdml.embeddings import (
    check_labels,
    check_not_degenerate,
    l2_normalize,
    single_class_message,
)
from nirdml.errors import InputError

EPS = 1e-12
BLOCK = 2048


# ----------------------------------------------------------------------------- validation
def normalize_embeddings(embeddings) -> np.ndarray:
    """The rows of ``embeddings`` L2-normalised as float64 ``(N, D)`` (``nirdml.embeddings``'s
    rule for non-finite and zero rows), at least 2 rows and 2 columns."""
    x = l2_normalize(embeddings, dtype=np.float64)
    if x.shape[0] < 2 or x.shape[1] < 2:
        raise InputError(f"embeddings need at least 2 rows and 2 columns, got shape {x.shape}")
    return x


def _check_labels(labels, n: int) -> np.ndarray:
    """Integer class labels (``nirdml.embeddings.check_labels``' rule) remapped to ``0..C-1``
    (C >= 2)."""
    y = check_labels(labels, n)
    classes, inverse = np.unique(y, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if classes.size == 1:
        raise InputError(single_class_message(classes[0], n))
    if inverse.max(initial=-1) < 1:
        raise InputError("labels must contain at least 2 classes")
    return inverse


def _prepare(embeddings, labels) -> tuple[np.ndarray, np.ndarray]:
    x = normalize_embeddings(embeddings)
    y = _check_labels(labels, x.shape[0])
    return x, y


class _Classes:
    """Samples grouped by class: ``members(c)`` rows, means, sizes."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.order = np.argsort(y, kind="stable")
        self.sizes = np.bincount(y)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        sums = np.add.reduceat(x[self.order], self.starts, axis=0)
        self.means = sums / self.sizes[:, None]
        self.x = x
        self.y = y
        self.multi = np.flatnonzero(self.sizes >= 2)  # classes with a within-class pair
        if self.multi.size == 0:
            raise InputError("every class has a single sample; within-class statistics need at "
                             "least one class with 2 or more samples")

    def members(self, c: int) -> np.ndarray:
        s = self.starts[c]
        return self.x[self.order[s:s + self.sizes[c]]]

    def center_distances(self, block: int = 65536) -> np.ndarray:
        """(N,) distance of every sample to its own class mean."""
        out = np.empty(self.x.shape[0])
        for s in range(0, self.x.shape[0], block):
            diff = self.x[s:s + block] - self.means[self.y[s:s + block]]
            out[s:s + block] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return out


# ----------------------------------------------------------------------------- pair sums
def _sq_dists(a: np.ndarray, b: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    d = a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _upper_pair_sum(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray],
                    block: int = BLOCK) -> float:
    """``sum_{i<j} fn(||x_i - x_j||^2)``, accumulated over upper-triangular blocks."""
    n = x.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    total = 0.0
    for i in range(0, n, block):
        a, a2 = x[i:i + block], sq[i:i + block]
        for j in range(i, n, block):
            vals = fn(_sq_dists(a, x[j:j + block], a2, sq[j:j + block]))
            if j == i:
                total += float(np.triu(vals, k=1).sum())
            else:
                total += float(vals.sum())
    return total


def _mean_pair_distance(x: np.ndarray, block: int = BLOCK) -> float:
    n = x.shape[0]
    return _upper_pair_sum(x, np.sqrt, block) / (n * (n - 1) / 2)


# ----------------------------------------------------------------------------- diagnostics
def singular_values(embeddings) -> np.ndarray:
    """Singular values (descending, length ``min(N, D)``) of the normalised, uncentred matrix.

    Large N is reduced first by a blockwise QR (the R factors of row blocks are stacked and
    re-factorised), which gives the same singular values without holding an N x D copy twice.
    """
    x = normalize_embeddings(embeddings)
    n, d = x.shape
    block = max(4 * d, 8192)
    if n > block:
        r = np.zeros((0, d))
        for s in range(0, n, block):
            r = np.linalg.qr(np.vstack([r, x[s:s + block]]), mode="r")
        x = r
    return np.linalg.svd(x, compute_uv=False)


SPECTRAL_FORMS = ("release", "full")


def spectral_decay(embeddings, eps: float = EPS, form: str = "release") -> float:
    """Spectral decay ``rho = KL(U || p)`` (lower = more directions used).

    ``p``: the singular values of the L2-normalised, *uncentred* ``N x D`` embedding matrix, sorted
    descending and zero-padded to D entries, without the first one -- and, in the authors' form
    (``form="release"``, their truncated SVD of ``D - 1`` components), without the last one --
    divided by their sum. Values below ``max(N, D) * machine-eps * s_1`` count as exact zeros,
    entries of ``p`` below ``eps`` are raised to ``eps`` (then ``p`` is renormalised), and if every
    kept value is zero ``p`` is one-hot (the most collapsed case). ``U`` is uniform over the kept
    entries. The release form needs D >= 3 (NaN below: nothing is kept).
    """
    if form not in SPECTRAL_FORMS:
        raise InputError(f"unknown spectral decay form {form!r}; choose one of "
                         f"{', '.join(SPECTRAL_FORMS)}")
    x = normalize_embeddings(embeddings)
    n, d = x.shape
    s = np.zeros(d)
    sv = singular_values(x)
    s[: sv.size] = sv
    s[s < max(n, d) * np.finfo(np.float64).eps * s[0]] = 0.0
    rest = s[1:d - 1] if form == "release" else s[1:]
    if rest.size == 0:
        return float("nan")
    if rest.sum() > 0:
        p = rest / rest.sum()
    else:
        p = np.zeros_like(rest)
        p[0] = 1.0
    p = np.maximum(p, eps)
    p /= p.sum()
    m = rest.size
    return float(np.sum(np.log((1.0 / m) / p)) / m)


def numerical_rank(embeddings) -> int:
    """How many singular values of the normalised matrix exceed ``max(N, D) * float32-eps *
    s_1``: the directions the embeddings actually use. A network computes them in float32, so
    a direction it cannot reach (a last layer from F < D features) still carries float32
    rounding noise, ~1e-7 of ``s_1``, which this threshold does not count."""
    x = normalize_embeddings(embeddings)
    s = singular_values(x)
    return int(np.sum(s >= max(x.shape) * np.finfo(np.float32).eps * s[0]))


def density_ratio(embeddings, labels, block: int = BLOCK) -> float:
    """Embedding density ``pi_density = pi_intra / pi_inter`` (Roth et al. 2020).

    ``pi_intra``: mean over classes with >= 2 samples of the mean pairwise Euclidean distance
    ``mean_{i<j in c} ||x_i - x_j||``; ``pi_inter``: mean over class pairs ``c < c'`` of
    ``||mu_c - mu_c'||`` with ``mu_c`` the (not renormalised) mean of class c's normalised
    embeddings, over all classes.
    """
    x, y = _prepare(embeddings, labels)
    return _density_ratio(_Classes(x, y), block)


def _density_ratio(cls: _Classes, block: int = BLOCK) -> float:
    intra = np.mean([_mean_pair_distance(cls.members(c), block) for c in cls.multi])
    inter = _mean_pair_distance(cls.means, block)
    if inter <= 0:
        raise InputError("all class means coincide; pi_density is undefined")
    return float(intra / inter)


def cluster_size_variance(embeddings, labels) -> float:
    """``sigma2_kappa``: population variance over classes of the class "size" ``kappa_c``.

    ``kappa_c = mean_{i in c} ||x_i - mu_c||`` (mean distance of class c's normalised embeddings to
    their mean), over classes with >= 2 samples; variance with ``ddof=0``. The paper does not
    publish its exact definition; this one is ours.
    """
    x, y = _prepare(embeddings, labels)
    return _cluster_size_variance(_Classes(x, y))


def _class_center_stats(cls: _Classes) -> dict[str, np.ndarray]:
    d = cls.center_distances()[cls.order]
    cs = cls.multi
    mean = np.array([d[cls.starts[c]:cls.starts[c] + cls.sizes[c]].mean() for c in cs])
    std = np.array([d[cls.starts[c]:cls.starts[c] + cls.sizes[c]].std() for c in cs])
    mx = np.array([d[cls.starts[c]:cls.starts[c] + cls.sizes[c]].max() for c in cs])
    return {"mean": mean, "std": std, "max": mx}


def _cluster_size_variance(cls: _Classes) -> float:
    return float(np.var(_class_center_stats(cls)["mean"]))


def uniformity_g2(embeddings, t: float = 2.0, max_exact: int = 20000,
                  num_pairs: int = 2_000_000, seed: int = 0, block: int = BLOCK) -> float:
    """``G2 = mean_{i<j} exp(-t ||x_i - x_j||^2)`` on the normalised embeddings (lower = more
    uniform; Wang & Isola 2020's uniformity is the log of this).

    Exact (blockwise) when ``N <= max_exact``; otherwise the mean over ``num_pairs`` unordered
    pairs ``i != j`` drawn uniformly with ``numpy.random.default_rng(seed)``. The paper does not
    publish its exact definition; this one is ours.
    """
    x = normalize_embeddings(embeddings)
    n = x.shape[0]
    if n <= max_exact:
        return _upper_pair_sum(x, lambda d: np.exp(-t * d), block) / (n * (n - 1) / 2)
    i, j = _random_pairs(n, num_pairs, np.random.default_rng(seed))
    return float(_pair_values(x, i, j, lambda d: np.exp(-t * d)).mean())


def _random_pairs(n: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` uniform pairs ``i != j`` (uniform over ordered pairs = uniform over unordered)."""
    i = rng.integers(0, n, size=m)
    j = rng.integers(0, n - 1, size=m)
    j = j + (j >= i)  # skip i itself: j uniform over the other n - 1 indices
    return i, j


def _pair_values(x, i, j, fn, chunk: int = 65536) -> np.ndarray:
    out = np.empty(i.shape[0])
    for s in range(0, i.shape[0], chunk):
        diff = x[i[s:s + chunk]] - x[j[s:s + chunk]]
        out[s:s + chunk] = fn(np.einsum("ij,ij->i", diff, diff))
    return out


def _summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "p10": float(np.percentile(values, 10)), "p90": float(np.percentile(values, 90))}


def intra_class_stats(embeddings, labels) -> dict:
    """Per-class mean / std / max distance of the samples to their class mean, summarised over
    classes with >= 2 samples as ``{"mean"|"std"|"max": {"mean", "median", "p10", "p90"}}``, plus
    ``num_classes_used`` and ``class_size`` (same summary of the class sizes)."""
    x, y = _prepare(embeddings, labels)
    return _intra_class_stats(_Classes(x, y))


def _intra_class_stats(cls: _Classes) -> dict:
    stats = _class_center_stats(cls)
    out = {k: _summary(v) for k, v in stats.items()}
    out["class_size"] = _summary(cls.sizes[cls.multi].astype(np.float64))
    out["num_classes_used"] = int(cls.multi.size)
    return out


def sample_pair_distances(embeddings, labels, num_pairs: int = 20000, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Distances of ``num_pairs`` random same-class pairs and ``num_pairs`` random pairs of
    different classes (seeded): the sample of a pair is uniform over samples of classes with
    >= 2 members (intra) / over all samples (inter), its partner uniform among the valid ones."""
    x, y = _prepare(embeddings, labels)
    cls = _Classes(x, y)
    rng = np.random.default_rng(seed)
    # intra: anchor from a class with >= 2 samples, partner another member of the same class
    eligible = np.flatnonzero(cls.sizes[y] >= 2)
    a = eligible[rng.integers(0, eligible.size, size=num_pairs)]
    ca = y[a]
    pos_a = np.empty(x.shape[0], dtype=np.int64)
    pos_a[cls.order] = np.arange(x.shape[0]) - cls.starts[y[cls.order]]
    k = rng.integers(0, cls.sizes[ca] - 1)
    k = k + (k >= pos_a[a])
    b = cls.order[cls.starts[ca] + k]
    intra = np.sqrt(_pair_values(x, a, b, lambda d: d))
    # inter: rejection sampling of pairs with different labels
    i_all, j_all = [], []
    got = 0
    while got < num_pairs:
        i, j = _random_pairs(x.shape[0], 2 * (num_pairs - got) + 16, rng)
        keep = y[i] != y[j]
        i_all.append(i[keep])
        j_all.append(j[keep])
        got += int(keep.sum())
    i = np.concatenate(i_all)[:num_pairs]
    j = np.concatenate(j_all)[:num_pairs]
    inter = np.sqrt(_pair_values(x, i, j, lambda d: d))
    return intra, inter


def structure_report(embeddings, labels, t: float = 2.0, max_exact: int = 20000,
                     num_pairs: int = 2_000_000, seed: int = 0) -> dict:
    """All diagnostics at once: ``rho`` (and ``rho_full``, ``rank``), ``pi_density``,
    ``sigma2_kappa``, ``g2``,
    ``intra_class`` (see :func:`intra_class_stats`), ``num_samples``, ``num_classes``.

    Degenerate embeddings -- a single class, or all rows collapsed to one direction -- are an
    InputError worded as ``evaluate``'s (:func:`nirdml.embeddings.check_not_degenerate`)."""
    x, y = _prepare(embeddings, labels)
    check_not_degenerate(x, y)
    cls = _Classes(x, y)
    return {
        "rho": spectral_decay(x),
        "rho_full": spectral_decay(x, form="full"),
        "rank": numerical_rank(x),
        "pi_density": _density_ratio(cls),
        "sigma2_kappa": _cluster_size_variance(cls),
        "g2": uniformity_g2(x, t=t, max_exact=max_exact, num_pairs=num_pairs, seed=seed),
        "intra_class": _intra_class_stats(cls),
        "num_samples": int(x.shape[0]),
        "num_classes": int(cls.sizes.size),
    }
