"""Embeddings: the container every step after training passes around, its file, and the rules
for the arrays that go with it (L2 normalisation, labels, query/gallery masks).

A shared leaf module: it imports only ``nirdml.errors`` (and, to save a file, ``nirdml.files``),
so data, training, evaluation and everything above can use it.

* :class:`Embeddings`: ``embeddings`` (N, D), ``labels`` (N,) and optional ``paths``,
  ``is_query`` / ``is_gallery`` (In-Shop style), validated on construction; ``save`` writes
  an ``.npz`` atomically, ``load`` reads one (``nirdml embed`` writes them, ``evaluate``,
  ``analyze`` and ``index build --gallery X.npz`` read them).
* :func:`l2_normalize`: rows scaled to unit length. **The rule**: a row with NaN or inf, or an
  all-zero row, is an ``InputError`` naming the first such row -- a zero vector has no
  direction, so no cosine similarity with it means anything.
* :func:`degenerate_reason` / :func:`check_not_degenerate`: **the rule** for data that no
  metric can judge, shared by ``evaluate``, ``analyze`` and training's validation: a single
  class, or fully collapsed embeddings -- after L2 normalisation every row lies within
  ``COLLAPSE_TOLERANCE`` (Euclidean) of the first row, i.e. all rows are one direction up to
  float rounding (rows equal but for float32 rounding differ by ~1e-7 there; any two rows
  within the tolerance have a cosine above 1 - 2e-10, which float32 scores cannot tell from 1,
  so neighbour order would be mere tie order).
* :func:`check_labels`, :func:`check_mask`, :func:`check_selection`: **the rules** for the
  arrays that go with embeddings, shared by :class:`Embeddings`, ``evaluate`` and ``analyze``:
  labels are one integer class id per row (integral floats and an ``(N, 1)`` column are
  accepted); a query or gallery mask is boolean or 0/1 numbers, one entry per row; a query or
  gallery *set* (``check_selection``, where one is used: ``evaluate``) must select at least one
  sample. The container itself may hold an all-False mask (an empty shard, a split with no
  queries), since nothing is selected from it yet.

``nirdml.inference.embed_dataset`` makes an :class:`Embeddings` from a model and a dataset.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nirdml.errors import InputError


def to_numpy(x, what: str) -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, a list) as a numpy array; floating
    tensors as float32. InputError naming ``what`` when it is None."""
    if x is None:
        raise InputError(f"{what} is missing")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def check_matrix(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """``x`` when it is 2-D (N rows of D values), else an InputError naming ``what``."""
    if x.ndim != 2:
        raise InputError(f"{what} must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    return x


def check_labels(labels, n: int) -> np.ndarray:
    """The class ids of ``n`` rows as int64 ``(n,)`` (the rule in the module docstring):
    integers or booleans, or floats that are whole numbers; an ``(n, 1)`` column is flattened.
    InputError otherwise, or when there are not ``n`` of them."""
    y = to_numpy(labels, "labels")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"labels must be 1-D (one class id per row), got shape {y.shape}")
    if y.shape[0] != n:
        raise InputError(f"labels has {y.shape[0]} entries but embeddings has {n} rows")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise InputError("labels must be integer class ids (found non-integer floats)")
    elif y.dtype.kind not in "iub":
        raise InputError(f"labels must be integer class ids, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def check_mask(mask, n: int, name: str) -> np.ndarray | None:
    """A query or gallery mask of ``n`` rows as a boolean ``(n,)`` array (None stays None):
    booleans, or numbers that are all 0 or 1 (the rule in the module docstring); anything
    else is an InputError naming ``name``. An all-False mask passes (see
    :func:`check_selection`)."""
    if mask is None:
        return None
    m = to_numpy(mask, name)
    if m.ndim != 1:
        raise InputError(f"{name} must be 1-D (one flag per row), got shape {m.shape}")
    if m.shape[0] != n:
        raise InputError(f"{name} has {m.shape[0]} entries but embeddings has {n} rows")
    if m.dtype.kind in "iuf":   # 0/1 numbers (a mask saved as floats too, as before)
        if not np.isin(m, (0, 1)).all():
            raise InputError(f"{name} must be booleans or 0/1 values; got other {m.dtype} "
                             "values")
    elif m.dtype != np.bool_:
        raise InputError(f"{name} must be booleans or 0/1 values, got {m.dtype} values")
    return m.astype(bool)


def check_selection(mask, n: int, name: str) -> np.ndarray:
    """The query or gallery set a mask selects among ``n`` rows, as a boolean ``(n,)`` array:
    :func:`check_mask`'s rule, None selecting every row, and an InputError naming ``name``
    when it selects no row."""
    m = check_mask(mask, n, name)
    if m is None:
        return np.ones(n, dtype=bool)
    if not m.any():
        role = "query" if "query" in name else "gallery"
        raise InputError(f"{name} selects no samples: the {role} set is empty")
    return m


def l2_normalize(embeddings, dtype=np.float32) -> np.ndarray:
    """``(N, D)`` rows scaled to unit L2 norm, a new C-contiguous array of ``dtype``.

    InputError for anything but a non-empty 2-D numeric array, for rows with NaN/inf and for
    all-zero rows (see the module docstring).
    """
    x = check_matrix(to_numpy(embeddings, "embeddings"))
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
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(x, axis=1)
    odd = ~np.isfinite(norms) | (norms == 0)
    if odd.any():  # squares that overflow or underflow float32: rescale those rows first
        rows = x[odd].astype(np.float64)
        scale = np.abs(rows).max(axis=1, keepdims=True)
        scaled = rows / np.where(scale > 0, scale, 1.0)
        length = np.linalg.norm(scaled, axis=1, keepdims=True)
        x[odd] = scaled / np.where(length > 0, length, 1.0)
        norms[odd] = np.where(scale[:, 0] > 0, 1.0, 0.0)
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        raise InputError(f"embeddings contain {rows.size} all-zero row(s) (first: row "
                         f"{rows[0]}): all zeros have no direction, so their cosine similarity "
                         f"is undefined; fix the model output or drop those samples")
    x /= norms[:, None]
    return x


#: the key :meth:`Embeddings.save` adds to mark an ``.npz`` as nirdml's (its version string)
MARKER_KEY = "nirdml_version"
#: every key :meth:`Embeddings.save` may write
SAVED_KEYS = frozenset({"embeddings", "labels", "is_query", "is_gallery", "paths", MARKER_KEY})


def is_embeddings_file(path: str | Path) -> bool:
    """Whether ``path`` is an embeddings ``.npz`` that :meth:`Embeddings.save` wrote: a zip
    holding ``embeddings``, ``labels`` and the ``nirdml_version`` marker, and no key it does
    not write (read from the zip's directory only; the arrays are not loaded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
    keys = {name[:-4] for name in names if name.endswith(".npy")}
    return (len(keys) == len(names) and {"embeddings", "labels", MARKER_KEY} <= keys
            and keys <= SAVED_KEYS)


#: rows of L2-normalised embeddings all within this distance of the first are "collapsed"
COLLAPSE_TOLERANCE = 1e-5


class DegenerateEmbeddingsError(InputError):
    """Embeddings no metric can judge (module docstring); ``kind`` is ``"single_class"`` or
    ``"collapsed"``."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def collapse_spread(unit_embeddings: np.ndarray, block: int = 65536) -> float:
    """The largest Euclidean distance of a row of ``unit_embeddings`` (L2-normalised, (N, D))
    from the first row, in float64, block by block (every pairwise distance is at most twice
    it)."""
    x = np.asarray(unit_embeddings)
    first = x[0].astype(np.float64)
    spread = 0.0
    for start in range(0, x.shape[0], block):
        diff = x[start:start + block].astype(np.float64) - first
        spread = max(spread, float(np.sqrt(np.einsum("ij,ij->i", diff, diff).max())))
    return spread


def single_class_message(label, count: int) -> str:
    """The one wording of "a single class" (:func:`degenerate_reason`; ``analyze`` too)."""
    return (f"the embeddings hold a single class (label {label}, {count} samples): every "
            f"neighbour is a match, so no metric means anything; use data with at least 2 "
            f"classes")


def degenerate_reason(unit_embeddings: np.ndarray, labels) -> tuple[str, str] | None:
    """``(kind, message)`` when the embeddings are degenerate (a single class, or collapsed:
    module docstring), None when metrics can judge them. ``unit_embeddings``: the (N >= 1, D)
    rows L2-normalised; ``labels``: N class ids."""
    classes, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    n = int(np.asarray(unit_embeddings).shape[0])
    if classes.size == 1:
        return "single_class", single_class_message(classes[0], int(counts[0]))
    if n >= 2:
        spread = collapse_spread(unit_embeddings)
        if spread <= COLLAPSE_TOLERANCE:
            return "collapsed", (
                f"the embeddings are collapsed: all {n} rows point the same way (each within "
                f"{spread:.1e} of the first after L2 normalisation, tolerance "
                f"{COLLAPSE_TOLERANCE:g}), so any neighbour order is mere tie order; the model "
                f"has collapsed (check the loss and learning rate) or the file is wrong")
    return None


def check_not_degenerate(unit_embeddings: np.ndarray, labels) -> None:
    """Raise :class:`DegenerateEmbeddingsError` (an InputError) with
    :func:`degenerate_reason`'s message when the embeddings are degenerate."""
    found = degenerate_reason(unit_embeddings, labels)
    if found is not None:
        raise DegenerateEmbeddingsError(found[1], found[0])


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
        self.embeddings = check_matrix(to_numpy(self.embeddings, "embeddings"))
        n = self.embeddings.shape[0]
        labels = to_numpy(self.labels, "labels")
        check_labels(labels, n)
        self.labels = labels.reshape(n)  # kept as given: an (N, 1) column becomes (N,)
        self.is_query = check_mask(self.is_query, n, "is_query")
        self.is_gallery = check_mask(self.is_gallery, n, "is_gallery")
        if self.paths is not None:
            self.paths = [str(p) for p in self.paths]
            if len(self.paths) != n:
                raise InputError(f"paths has {len(self.paths)} entries but embeddings has "
                                 f"{n} rows")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (keys ``embeddings``, ``labels`` and those present of ``is_query``,
        ``is_gallery``, ``paths``, plus the marker ``nirdml_version``: see
        :func:`is_embeddings_file`) atomically."""
        from nirdml import __version__
        from nirdml.files import atomic_write_bytes

        arrays = {"embeddings": self.embeddings, "labels": self.labels,
                  MARKER_KEY: np.asarray(__version__)}
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
                names = list(data.files)
                missing = [k for k in ("embeddings", "labels") if k not in names]
                if not missing:
                    _check_declared_sizes(path, data.zip)
                    arrays = {k: data[k] for k in SAVED_KEYS if k in names}
        except InputError:
            raise
        except MemoryError:
            raise InputError(f"{str(path)!r} is too large to load into memory; embed fewer "
                             "samples or use a machine with more memory") from None
        except _READ_ERRORS as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"cannot read {str(path)!r} as an .npz archive (damaged or "
                             f"truncated?): {text}") from None
        if missing:
            raise InputError(
                f"{str(path)!r} lacks key(s) {missing} (no {missing[0]!r} array); it has "
                f"{sorted(names)}. Save it with np.savez(path, embeddings=..., labels=..., "
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
        if paths is not None and (paths.ndim != 1 or paths.dtype.kind not in "US"):
            raise InputError(f"{str(path)!r}: paths must be a 1-D array of strings, got "
                             f"{paths.dtype} of shape {paths.shape}")
        return cls(emb, labels, arrays.get("is_query"), arrays.get("is_gallery"),
                   None if paths is None else [str(p) for p in paths])


#: what reading a damaged zip or .npy member raises (zipfile, zlib, numpy's header parser)
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, struct.error, SyntaxError, TypeError,
                KeyError, OverflowError)


def _check_declared_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    """InputError when an ``.npy`` member's header declares more data than the member holds
    (a damaged header would otherwise allocate its shape -- terabytes -- before the read fails).
    """
    for info in archive.infolist():
        if not info.filename.endswith(".npy") or info.filename[:-4] not in SAVED_KEYS:
            continue
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            header_bytes = member.tell()
        needed = header_bytes + math.prod(shape) * dtype.itemsize
        if needed > info.file_size:
            raise InputError(f"{str(path)!r} is damaged: {info.filename} declares shape "
                             f"{shape} ({needed} bytes) but holds {info.file_size} bytes")
