"""Diagnostic figures (matplotlib, Agg backend): each function writes one PNG and returns its path.

The flow-samples figure relies on the NIR flow living in the embedding space itself: the flow maps
a residual ``z ~ N(0, I)`` and a class proxy to an embedding ``psi = tau(z | rho_y)``, so its
samples (L2-normalised, as the flow was trained on normalised embeddings) are directly comparable
with the real embeddings and the proxies in one shared projection.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nirdml.analysis import diagnostics as dg  # noqa: E402
from nirdml.embeddings import check_labels  # noqa: E402
from nirdml.errors import InputError  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_spectrum(embeddings, path) -> Path:
    """Singular-value spectrum (normalised to sum 1, log scale) with the spectral decay rho."""
    s = dg.singular_values(embeddings)
    rho = dg.spectral_decay(embeddings)
    fig, ax = plt.subplots(figsize=(6, 4))
    idx = np.arange(1, s.size + 1)
    ax.semilogy(idx, np.maximum(s / s.sum(), dg.EPS), marker=".", lw=1)
    ax.axvline(1.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("singular value index (the first is dropped for rho)")
    ax.set_ylabel("normalised singular value")
    ax.set_title(f"singular-value spectrum, rho = {rho:.4f}")
    return _save(fig, path)


def plot_distance_histograms(embeddings, labels, path, num_pairs: int = 20000,
                             seed: int = 0) -> Path:
    """Histograms of sampled intra-class and inter-class pair distances."""
    intra, inter = dg.sample_pair_distances(embeddings, labels, num_pairs, seed)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.0, 2.0, 81)
    ax.hist(intra, bins=bins, density=True, alpha=0.6, label=f"intra-class ({intra.size} pairs)")
    ax.hist(inter, bins=bins, density=True, alpha=0.6, label=f"inter-class ({inter.size} pairs)")
    ax.set_xlabel("Euclidean distance (L2-normalised embeddings)")
    ax.set_ylabel("density")
    ax.legend()
    return _save(fig, path)


def _pick_classes(labels: np.ndarray, k: int, rng: np.random.Generator,
                  min_size: int = 2) -> np.ndarray:
    classes, counts = np.unique(labels, return_counts=True)
    pool = classes[counts >= min_size]
    if pool.size == 0:
        pool = classes
    return np.sort(rng.choice(pool, size=min(k, pool.size), replace=False))


def plot_tsne(embeddings, labels, path, num_classes: int = 10, max_points: int = 1500,
              seed: int = 0) -> Path:
    """t-SNE map of the samples of ``num_classes`` seeded-random classes (at most ``max_points``
    points, subsampled with the same seed), coloured by class."""
    from sklearn.manifold import TSNE

    x = dg.normalize_embeddings(embeddings)
    y = check_labels(labels, x.shape[0])
    rng = np.random.default_rng(seed)
    chosen = _pick_classes(y, num_classes, rng)
    idx = np.flatnonzero(np.isin(y, chosen))
    if idx.size > max_points:
        idx = np.sort(rng.choice(idx, size=max_points, replace=False))
    if idx.size < 3:
        raise InputError("t-SNE needs at least 3 samples in the chosen classes")
    perplexity = float(min(30.0, max(1.0, (idx.size - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              max_iter=500).fit_transform(x[idx])
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if chosen.size <= 10 else "tab20")
    for n, c in enumerate(chosen):
        m = y[idx] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(n % cmap.N), label=str(c))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {idx.size} embeddings, {chosen.size} classes")
    if chosen.size <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", title="class")
    return _save(fig, path)


# ----------------------------------------------------------------------------- flow samples
def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def sample_flow_around_proxies(flow, proxies, classes, samples_per_class: int = 200,
                               proxies_per_class: int = 1, seed: int = 0
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``flow.sample(cond)`` with ``cond`` = the L2-normalised proxy of each class repeated
    ``samples_per_class`` times (split evenly over a class's proxies when it has several, rows
    ``c * k .. c * k + k - 1``); returns L2-normalised samples ``(M, D)`` and their classes
    ``(M,)``.

    Sampling runs under ``torch.no_grad`` with the flow in eval mode and a forked, seeded torch RNG.
    """
    import torch

    p = torch.as_tensor(_to_numpy(proxies))
    k = int(proxies_per_class)
    try:
        param = next(flow.parameters())
        device, dtype = param.device, param.dtype
    except (StopIteration, AttributeError):
        device, dtype = torch.device("cpu"), torch.float32
    conds, owners = [], []
    for c in classes:
        rows = p[int(c) * k:int(c) * k + k]
        if rows.shape[0] != k:
            raise InputError(f"class {c} has no proxy (proxies has {p.shape[0]} rows, "
                             f"{k} per class)")
        rows = torch.nn.functional.normalize(rows, dim=1)
        conds.append(rows[torch.arange(samples_per_class) % k])
        owners.append(np.full(samples_per_class, int(c)))
    cond = torch.cat(conds).to(device=device, dtype=dtype)
    was_training = getattr(flow, "training", False)
    if hasattr(flow, "eval"):
        flow.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = flow.sample(cond)
    finally:
        if hasattr(flow, "train"):
            flow.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    samples = _to_numpy(out)
    if samples.shape != tuple(cond.shape):
        raise InputError(f"flow.sample returned shape {samples.shape}, expected "
                         f"{tuple(cond.shape)}")
    return dg.normalize_embeddings(samples), np.concatenate(owners)


def flow_sample_stats(samples, sample_labels, embeddings, labels, proxies,
                      proxies_per_class: int = 1) -> dict:
    """Mean cosine to the class's closest proxy and mean distance to the class mean of the real
    embeddings, for flow samples vs real (normalised) embeddings of the same classes."""
    p = dg.normalize_embeddings(_to_numpy(proxies))
    x = dg.normalize_embeddings(embeddings)
    y = np.asarray(labels)
    k = int(proxies_per_class)
    out: dict[str, float | list[int]] = {"classes": sorted(int(c) for c in set(sample_labels))}
    cos_s, cos_r, dist_s, dist_r = [], [], [], []
    for c in out["classes"]:
        pc = p[c * k:c * k + k]
        s = samples[sample_labels == c]
        r = x[y == c]
        mu = r.mean(axis=0)
        cos_s.append((s @ pc.T).max(axis=1).mean())
        cos_r.append((r @ pc.T).max(axis=1).mean())
        dist_s.append(np.linalg.norm(s - mu, axis=1).mean())
        dist_r.append(np.linalg.norm(r - mu, axis=1).mean())
    out.update({"sample_cos_to_proxy": float(np.mean(cos_s)),
                "real_cos_to_proxy": float(np.mean(cos_r)),
                "sample_dist_to_class_mean": float(np.mean(dist_s)),
                "real_dist_to_class_mean": float(np.mean(dist_r))})
    return out


def plot_flow_samples(flow, proxies, embeddings, labels, path, classes=None,
                      num_classes: int = 4, samples_per_class: int = 200,
                      proxies_per_class: int = 1, seed: int = 0, samples=None) -> Path:
    """Flow samples around the proxies of a few (training) classes, next to the real embeddings
    of those classes and the proxies, in one 2-D PCA fitted on the union of the three sets.

    ``embeddings``/``labels``: real (train-split) embeddings whose labels index ``proxies``
    (rows ``c * proxies_per_class ...``). ``classes`` defaults to ``num_classes`` seeded-random
    classes present in ``labels``. ``samples``: optional precomputed ``(samples, sample_labels)``
    from :func:`sample_flow_around_proxies`.
    """
    x = dg.normalize_embeddings(embeddings)
    y = check_labels(labels, x.shape[0])
    if classes is None:
        classes = _pick_classes(y, num_classes, np.random.default_rng(seed), min_size=1)
    classes = np.asarray(classes, dtype=np.int64)
    if samples is None:
        samples = sample_flow_around_proxies(flow, proxies, classes, samples_per_class,
                                             proxies_per_class, seed)
    s, sy = samples
    k = int(proxies_per_class)
    p_all = dg.normalize_embeddings(_to_numpy(proxies))
    prow = np.concatenate([np.arange(c * k, c * k + k) for c in classes])
    p, py = p_all[prow], np.repeat(classes, k)
    mask = np.isin(y, classes)
    r, ry = x[mask], y[mask]
    union = np.vstack([r, s, p])
    mean = union.mean(axis=0)
    _, sv, vt = np.linalg.svd(union - mean, full_matrices=False)
    proj = lambda a: (a - mean) @ vt[:2].T  # noqa: E731
    var = sv[:2] ** 2 / max((sv ** 2).sum(), 1e-300)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    cmap = plt.get_cmap("tab10")
    for n, c in enumerate(classes):
        col = cmap(n % cmap.N)
        rr, ss, pp = proj(r[ry == c]), proj(s[sy == c]), proj(p[py == c])
        ax.scatter(ss[:, 0], ss[:, 1], s=10, marker="x", color=col, alpha=0.45, lw=0.8)
        ax.scatter(rr[:, 0], rr[:, 1], s=14, marker="o", color=col, alpha=0.9,
                   edgecolors="black", linewidths=0.3, label=f"class {c}")
        ax.scatter(pp[:, 0], pp[:, 1], s=220, marker="*", color=col, edgecolors="black",
                   linewidths=1.0)
    ax.set_xlabel(f"PC1 ({100 * var[0]:.1f}% var)")
    ax.set_ylabel(f"PC2 ({100 * var[1]:.1f}% var)")
    ax.set_title("flow samples (x) vs train embeddings (o) around proxies (*)")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
