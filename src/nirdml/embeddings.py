"""Embeddings: the container every step after training passes around, its file, and one rule
for L2 normalisation.

* :class:`Embeddings`: ``embeddings`` (N, D), ``labels`` (N,) and optional ``paths``,
  ``is_query`` / ``is_gallery`` (In-Shop style), validated on construction; ``save`` writes
  an ``.npz`` atomically, ``load`` reads one (``nirdml embed`` writes them, ``evaluate``,
  ``analyze`` and ``index build --gallery X.npz`` read them).
* :func:`l2_normalize`: rows scaled to unit length. **The rule**: a row with NaN or inf, or an
  all-zero row, is an ``InputError`` naming the first such row -- a zero vector has no
  direction, so no cosine similarity with it means anything.
* :func:`embed_dataset`: a model's embeddings of every sample of a dataset, in order.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nirdml.errors import InputError


def _numpy(x, what: str) -> np.ndarray:
    if x is None:
        raise InputError(f"{what} is missing")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def l2_normalize(embeddings, dtype=np.float32) -> np.ndarray:
    """``(N, D)`` rows scaled to unit L2 norm, a new C-contiguous array of ``dtype``.

    InputError for anything but a non-empty 2-D numeric array, for rows with NaN/inf and for
    all-zero rows (see the module docstring).
    """
    x = _numpy(embeddings, "embeddings")
    if x.ndim != 2:
        raise InputError(f"embeddings must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"embeddings have no {'rows' if x.shape[0] == 0 else 'columns'} "
                         f"(shape {tuple(x.shape)}): there is nothing to compare")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"embeddings must be numeric; got dtype {x.dtype}")
    x = np.array(x, dtype=dtype, order="C", copy=True)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise InputError(f"embeddings contain NaN or inf in {rows.size} of {x.shape[0]} rows "
                         f"(first: row {rows[0]}); fix the model output or drop those samples")
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        raise InputError(f"embeddings contain {rows.size} all-zero row(s) (first: row "
                         f"{rows[0]}): all zeros have no direction, so their cosine similarity "
                         f"is undefined; fix the model output or drop those samples")
    x /= norms[:, None]
    return x


def _mask(mask, n: int, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = _numpy(mask, name)
    if mask.shape != (n,):
        raise InputError(f"{name} has {mask.size} entries but embeddings has {n} rows")
    return mask.astype(bool)


@dataclass
class Embeddings:
    """Embeddings of one split with their labels (and optional paths and query/gallery masks).

    Construction checks the shapes agree (``InputError``); the arrays are kept as given
    (normalise with :func:`l2_normalize` where cosine similarity is needed).
    """

    embeddings: np.ndarray
    labels: np.ndarray
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.embeddings = _numpy(self.embeddings, "embeddings")
        if self.embeddings.ndim != 2:
            raise InputError(f"embeddings must be a 2-D (N, D) array, got shape "
                             f"{tuple(self.embeddings.shape)}")
        n = self.embeddings.shape[0]
        self.labels = _numpy(self.labels, "labels")
        if self.labels.shape != (n,):
            raise InputError(f"labels has {self.labels.size} entries but embeddings has {n} rows")
        self.is_query = _mask(self.is_query, n, "is_query")
        self.is_gallery = _mask(self.is_gallery, n, "is_gallery")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise InputError(f"paths has {len(self.paths)} entries but embeddings has "
                                 f"{n} rows")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (keys ``embeddings``, ``labels`` and those present of ``is_query``,
        ``is_gallery``, ``paths``) atomically."""
        from nirdml.files import atomic_write_bytes

        arrays = {"embeddings": self.embeddings, "labels": self.labels}
        for key in ("is_query", "is_gallery"):
            if getattr(self, key) is not None:
                arrays[key] = getattr(self, key)
        if self.paths is not None:
            arrays["paths"] = np.asarray(self.paths, dtype=str)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    save_npz = save  # the name the trainer's callers used

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None) -> Embeddings:
        """Read an ``.npz`` written by :meth:`save` or ``np.savez(path, embeddings=...,
        labels=..., [is_query=..., is_gallery=..., paths=...])``; ``dim`` checks the width."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"embeddings file {str(path)!r} does not exist")
        if not zipfile.is_zipfile(path):
            raise InputError(f"{str(path)!r} is not an .npz file; write one with nirdml embed "
                             "or np.savez(path, embeddings=..., labels=...)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise InputError(f"cannot read {str(path)!r} as an .npz archive: {exc}") from None
        missing = [k for k in ("embeddings", "labels") if k not in arrays]
        if missing:
            raise InputError(
                f"{str(path)!r} lacks key(s) {missing} (no {missing[0]!r} array); it has "
                f"{sorted(arrays)}. Save it with np.savez(path, embeddings=..., labels=..., "
                "[is_query=..., is_gallery=...])")
        emb, labels = arrays["embeddings"], arrays["labels"]
        if not np.issubdtype(emb.dtype, np.floating):
            raise InputError(f"{str(path)!r}: embeddings must be floats, got {emb.dtype}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{str(path)!r}: labels must be integers, got {labels.dtype}")
        if dim is not None and emb.ndim == 2 and emb.shape[1] != dim:
            raise InputError(f"{str(path)!r} holds {emb.shape[1]}-d embeddings but the model "
                             f"embeds into {dim} dimensions: they come from another model")
        paths = arrays.get("paths")
        return cls(emb, labels, arrays.get("is_query"), arrays.get("is_gallery"),
                   None if paths is None else [str(p) for p in paths])


def embed_dataset(model, dataset, device, batch_size: int = 256, num_workers: int = 0,
                  amp: str = "none", progress: str | None = None,
                  generator=None) -> Embeddings:
    """Embed every sample of ``dataset`` in order (eval mode, no gradients); ``progress``
    names a progress bar shown on a terminal. The loader draws its workers' base seed from
    ``generator``, or from the global torch RNG when None (as the trainer's evaluation always
    has: changing that would change every run's trajectory)."""
    import torch

    from nirdml.devices import autocast

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, generator=generator,
                                         pin_memory=torch.device(device).type == "cuda")
    was_training = model.training
    model.eval()
    chunks = []
    bar = None
    if progress:
        from nirdml.evaluation.core import progress_bar

        bar = progress_bar(len(dataset), f"{progress}: embedding", "img")
    try:
        with torch.no_grad():
            for images, _ in loader:
                with autocast(torch.device(device), amp):
                    chunks.append(model(images.to(device, non_blocking=True)).float().cpu())
                if bar is not None:
                    bar.update(len(images))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    emb = torch.cat(chunks).numpy() if chunks else np.zeros((0, 1), np.float32)
    return Embeddings(emb, np.asarray(dataset.labels), getattr(dataset, "is_query", None),
                      getattr(dataset, "is_gallery", None))
