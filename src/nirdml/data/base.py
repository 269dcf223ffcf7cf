"""Core dataset types: :class:`LabeledDataset` and :class:`Splits`.

Every split holds contiguous labels ``0..C-1`` and ``class_names`` mapping each label back to the
original class id or name. Unreadable files are normally found and left out before any work by
``nirdml.data.scan``; a file that becomes unreadable later follows ``on_error``: ``"fail"``
raises :class:`~nirdml.errors.DatasetError` naming the file; ``"skip"`` substitutes another
readable sample of the same class in a training split (counted in ``bad_samples``, warned
once) and raises in an evaluation split (``substitute=False``).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from nirdml.data.image_files import (
    apply_pixel_limit,
    decode_jpeg_tensor,
    exceeds_pixel_limit,
    too_large,
)
from nirdml.data.transforms import carry_plan, decode_planner
from nirdml.errors import ConfigError, DatasetError

ON_ERROR = ("skip", "fail")
IMAGE_KINDS = ("rgb", "gray_small")

# What a broken/truncated/missing image file raises while PIL opens and decodes it.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _class_sort_key(key: Any) -> tuple:
    """Integers sort numerically and before strings; strings sort lexicographically."""
    if isinstance(key, int | np.integer):
        return (0, int(key), "")
    return (1, 0, str(key))


def encode_labels(keys: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Map original class keys to contiguous int64 labels; returns ``(labels, class_names)``.

    Classes are numbered in sorted order of their keys (integers numerically), so label ``k``
    is ``class_names[k]``.
    """
    keys = list(keys)
    class_names = sorted(set(keys), key=_class_sort_key)
    index = {k: i for i, k in enumerate(class_names)}
    labels = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    return labels, class_names


def to_float_tensor(image: Any) -> torch.Tensor:
    """Default transform: PIL image or tensor -> float32 ``C x H x W`` in ``[0, 1]``."""
    if isinstance(image, Image.Image):
        array = np.asarray(image)
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    else:
        tensor = torch.as_tensor(image)
        if tensor.ndim == 2:
            tensor = tensor[None]
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(255.0)
    return tensor.to(torch.float32)


class LabeledDataset(torch.utils.data.Dataset):
    """A labelled split: ``dataset[i] -> (image tensor C x H x W float32, int label)``.

    Attributes: ``labels`` (int64 numpy, contiguous ``0..C-1``), ``class_names`` (label ->
    original class id/name), ``num_classes``, ``is_query``/``is_gallery`` (bool numpy or
    ``None``; set for query/gallery benchmarks such as In-Shop), ``paths`` (list of file paths or
    ``None`` for in-memory data), ``transform`` (settable; ``None`` means
    :func:`to_float_tensor`), ``bad_samples`` (unreadable samples met so far) and ``bad_paths``.

    With a ``DataLoader`` and ``num_workers > 0`` every worker process has its own copy of the
    dataset, so ``bad_samples``/``bad_paths`` (and the one-time warning) are per worker process;
    the copy in the main process only counts what the main process itself read.

    Subclasses implement :meth:`_read` (raw image: a PIL image or a ``C x H x W`` tensor),
    :meth:`_describe` and :meth:`_take`.
    """

    #: with ``on_error="skip"``, replace an unreadable image by another of its class (training
    #: splits); ``False`` (evaluation splits) raises instead: a substitute would be a duplicate
    substitute: bool = True

    def __init__(self, class_keys: Sequence[Any], *, transform: Callable | None = None,
                 on_error: str = "skip", is_query: Sequence[bool] | None = None,
                 is_gallery: Sequence[bool] | None = None, name: str = ""):
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.labels, self.class_names = encode_labels(class_keys)
        self.transform = transform
        self.on_error = on_error
        self.name = name
        self.is_query = None if is_query is None else np.asarray(is_query, dtype=bool)
        self.is_gallery = None if is_gallery is None else np.asarray(is_gallery, dtype=bool)
        for mask_name, mask in (("is_query", self.is_query), ("is_gallery", self.is_gallery)):
            if mask is not None and mask.shape != self.labels.shape:
                raise DatasetError(f"{name}: {mask_name} has {mask.size} entries for "
                                   f"{self.labels.size} samples")
        self._reset_counters()

    # ---- storage hooks ---------------------------------------------------------------------
    def _read(self, i: int) -> Any:
        raise NotImplementedError

    def _describe(self, i: int) -> str:
        return f"sample {i}"

    def _take(self, indices: np.ndarray) -> None:
        """Restrict the storage to ``indices`` (called on a shallow copy by :meth:`select`)."""
        raise NotImplementedError

    # ---- public ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def paths(self) -> list[str] | None:
        return None

    def __len__(self) -> int:
        return int(self.labels.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if i < 0:
            i += len(self)
        image = self._read_checked(i)
        transform = self.transform if self.transform is not None else to_float_tensor
        return transform(image), int(self.labels[i])

    def select(self, indices: Sequence[int] | np.ndarray, name: str | None = None
               ) -> LabeledDataset:
        """A new dataset of the samples ``indices``, labels renumbered contiguously.

        Classes keep their relative order (``class_names`` of the subset is a sub-list).
        """
        idx = np.asarray(indices, dtype=np.int64)
        out = copy.copy(self)
        old = self.labels[idx]
        kept = np.unique(old)
        out.labels = np.searchsorted(kept, old).astype(np.int64)
        out.class_names = [self.class_names[k] for k in kept]
        out.is_query = None if self.is_query is None else self.is_query[idx]
        out.is_gallery = None if self.is_gallery is None else self.is_gallery[idx]
        out.name = self.name if name is None else name
        out._take(idx)
        out._reset_counters()
        return out

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        extra = "" if self.is_query is None else f", queries={int(self.is_query.sum())}"
        return (f"{type(self).__name__}(name={self.name!r}, samples={len(self)}, "
                f"classes={self.num_classes}{extra})")

    # ---- unreadable images -------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self.bad_samples = 0
        self.bad_paths: list[str] = []
        self._bad: set[int] = set()
        self._warned = False
        self._by_class: list[np.ndarray] | None = None

    def _read_checked(self, i: int) -> Any:
        if i not in self._bad:
            try:
                return self._read(i)
            except _READ_ERRORS as exc:
                self._mark_bad(i, exc)
        # skip policy: another readable sample of the same class, searched from i onwards
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.cumsum(np.bincount(self.labels, minlength=self.num_classes))[:-1]
            self._by_class = np.split(order, bounds)
        members = self._by_class[int(self.labels[i])]
        start = int(np.searchsorted(members, i))
        for j in np.roll(members, -start):
            j = int(j)
            if j == i or j in self._bad:
                continue
            try:
                return self._read(j)
            except _READ_ERRORS as exc:
                self._mark_bad(j, exc)
        raise DatasetError(
            f"{self.name}: every image of class {self.class_names[int(self.labels[i])]!r} is "
            f"unreadable (first: {self._describe(i)}); fix or remove these files")

    def _mark_bad(self, i: int, exc: BaseException) -> None:
        where = self._describe(i)
        if self.on_error == "fail":
            raise DatasetError(f"{self.name}: cannot read image {where}: {exc} "
                               f"(use on_error='skip' to substitute unreadable images)") from exc
        if not self.substitute:
            raise DatasetError(f"{self.name}: cannot read image {where}: {exc} (an evaluation "
                               f"split never substitutes images: fix or remove the file)"
                               ) from exc
        self._bad.add(i)
        self.bad_samples += 1
        self.bad_paths.append(where)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.name}: cannot read image {where} ({exc}); using another image of the "
                f"same class instead. Further unreadable images are counted in bad_samples "
                f"without warning.", RuntimeWarning, stacklevel=3)


class FileDataset(LabeledDataset):
    """Images stored as files; read with PIL and converted to ``mode`` (``"RGB"`` or ``"L"``).

    ``invert=True`` inverts grey values after conversion (Omniglot PNGs: ink becomes bright).
    """

    def __init__(self, paths: Sequence[str | Path], class_keys: Sequence[Any], *,
                 mode: str = "RGB", invert: bool = False, **kwargs: Any):
        self._paths = [str(p) for p in paths]
        if len(self._paths) != len(class_keys):
            raise DatasetError(f"{len(self._paths)} paths for {len(class_keys)} labels")
        self.mode = mode
        self.invert = invert
        super().__init__(class_keys, **kwargs)

    @property
    def paths(self) -> list[str]:
        return self._paths

    def _read(self, i: int) -> Image.Image | torch.Tensor:
        apply_pixel_limit()
        with Image.open(self._paths[i]) as image:
            if exceeds_pixel_limit(image.size):  # refused from its header, never decoded
                raise ValueError(too_large(image.size))
            size = image.size
            prepare = decode_planner(self.transform)
            if prepare is not None:  # e.g. a reduced-scale JPEG decode (transforms.py)
                prepare(image, self.mode)
            if (image.format == "JPEG" and image.size == size and image.mode in ("RGB", "L")
                    and self.mode == "RGB" and not self.invert):
                # a whole JPEG: TorchCodec gives PIL's pixels as a tensor, 1.3x as fast
                tensor = decode_jpeg_tensor(self._paths[i])
                if tensor is not None:
                    return carry_plan(image, tensor)
            image = image.convert(self.mode)  # decodes the whole file (truncation raises here)
        return ImageOps.invert(image) if self.invert else image

    def _describe(self, i: int) -> str:
        return self._paths[i]

    def _take(self, indices: np.ndarray) -> None:
        self._paths = [self._paths[j] for j in indices]


class ArrayDataset(LabeledDataset):
    """Images held in memory: ``images`` is ``N x H x W`` or ``N x C x H x W`` (any dtype).

    ``dataset[i]`` hands the transform a tensor ``C x H x W`` (uint8 images are scaled to
    ``[0, 1]`` by the default transform; float images are taken as they are). ``convert``
    (a picklable function ``ndarray -> ndarray``) is applied to one image on reading, which
    lets large arrays stay in their compact stored form. Subsets share the array (no copy).
    """

    def __init__(self, images: np.ndarray, class_keys: Sequence[Any], *,
                 convert: Callable[[np.ndarray], np.ndarray] | None = None, **kwargs: Any):
        if images.ndim not in (3, 4) or len(images) != len(class_keys):
            raise DatasetError(f"expected images N x H x W or N x C x H x W for "
                               f"{len(class_keys)} labels, got shape {images.shape}")
        self._images = images
        self._rows = np.arange(len(images), dtype=np.int64)
        self.convert = convert
        super().__init__(class_keys, **kwargs)

    def _read(self, i: int) -> torch.Tensor:
        array = self._images[self._rows[i]]
        if self.convert is not None:
            array = self.convert(array)
        tensor = torch.from_numpy(np.array(array, copy=True))
        return tensor[None] if tensor.ndim == 2 else tensor

    def _describe(self, i: int) -> str:
        return f"array row {int(self._rows[i])}"

    def _take(self, indices: np.ndarray) -> None:
        self._rows = self._rows[indices]


@dataclass
class Splits:
    """The splits of one dataset: class-disjoint ``train``/``val``/``test``.

    ``val`` holds out whole training classes (``None`` when ``val_fraction == 0``);
    ``image_kind`` (``"rgb"`` or ``"gray_small"``) picks the transform family.
    """

    train: LabeledDataset
    val: LabeledDataset | None
    test: LabeledDataset
    image_kind: str
    name: str
    root: Path | None = None
    #: unreadable files left out of each split by ``nirdml.data.scan.scan_splits``
    unreadable_dropped: dict[str, int] = field(default_factory=dict)
    #: a raw image *file* of this dataset is inverted on reading (Omniglot's official PNGs are
    #: black on white; every source reaches the model with bright strokes): what a query image
    #: needs too, whatever source the model was trained from
    invert_files: bool = False

    def summary(self) -> str:
        parts = []
        for split in ("train", "val", "test"):
            ds = getattr(self, split)
            if ds is not None:
                parts.append(f"{split} {len(ds)} images / {ds.num_classes} classes")
        return f"{self.name} ({self.image_kind}): " + ", ".join(parts)


def num_held_out(num_classes: int, val_fraction: float) -> int:
    """How many classes ``val_fraction`` holds out: ``round(f * C)``, but at least 1 if f > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return 0
    return max(1, int(round(val_fraction * num_classes)))


def draw_classes(dataset: LabeledDataset, count: int, seed: int = 0) -> LabeledDataset:
    """A seeded uniform draw of ``count`` of ``dataset``'s classes (all their samples),
    relabelled 0..count-1 in their original order: a small training set (``data.train_classes``,
    e.g. CUB-sized 100 classes of Omniglot's 964). The draw is ``numpy.random.default_rng([seed,
    5678])`` over the class list, so it depends on ``seed`` (``data.class_seed``) only, not on
    the run's seed: every seed of a study trains on the same classes."""
    count = int(count)
    if not 1 <= count <= dataset.num_classes:
        raise ConfigError(f"data.train_classes={count}, but {dataset.name!r} has "
                          f"{dataset.num_classes} training classes; choose 1..{dataset.num_classes}"
                          f" (or null for all)")
    if count == dataset.num_classes:
        return dataset
    rng = np.random.default_rng([int(seed), 5678])
    keep = np.zeros(dataset.num_classes, dtype=bool)
    keep[rng.choice(dataset.num_classes, size=count, replace=False)] = True
    return dataset.select(np.flatnonzero(keep[dataset.labels]), name=dataset.name)


def hold_out_classes(dataset: LabeledDataset, val_fraction: float, seed: int = 0
                     ) -> tuple[LabeledDataset, LabeledDataset | None]:
    """Split whole classes off ``dataset``: returns ``(train, val)``, both relabelled 0..C-1.

    The held-out classes are a seeded random choice (``numpy.random.default_rng([seed,
    1234])``), so the split is deterministic given ``seed`` and the class list; ``val`` is
    ``None`` when ``val_fraction == 0``. At least one class is held out when
    ``val_fraction > 0`` and at least one is left for training.
    """
    n_val = num_held_out(dataset.num_classes, val_fraction)
    if n_val == 0:
        return dataset, None
    if n_val >= dataset.num_classes:
        raise ConfigError(
            f"val_fraction={val_fraction} holds out {n_val} of the {dataset.num_classes} "
            f"training classes of {dataset.name!r}, leaving none to train on; lower val_fraction")
    rng = np.random.default_rng([seed, 1234])
    val_classes = np.zeros(dataset.num_classes, dtype=bool)
    val_classes[rng.choice(dataset.num_classes, size=n_val, replace=False)] = True
    in_val = val_classes[dataset.labels]
    base = dataset.name.rsplit("/", 1)[0] if "/" in dataset.name else dataset.name
    return (dataset.select(np.flatnonzero(~in_val), name=f"{base}/train"),
            dataset.select(np.flatnonzero(in_val), name=f"{base}/val"))


def class_folds(num_classes: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Split the labels ``0..num_classes-1`` into ``folds`` class-disjoint folds.

    A seeded permutation (``numpy.random.default_rng([seed, 4321])``) dealt into ``folds`` parts
    whose sizes differ by at most one; each fold is sorted. Every class is in exactly one fold.
    """
    folds = int(folds)
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    if folds > num_classes:
        raise ConfigError(f"{folds} folds need at least {folds} training classes, but there are "
                          f"{num_classes}; use fewer folds")
    order = np.random.default_rng([seed, 4321]).permutation(num_classes)
    return [np.sort(part) for part in np.array_split(order, folds)]


def hold_out_fold(dataset: LabeledDataset, folds: int, fold: int, seed: int = 0
                  ) -> tuple[LabeledDataset, LabeledDataset]:
    """``(train, val)`` of cross-validation fold ``fold`` of ``folds``: ``val`` holds the
    classes of that fold (:func:`class_folds` over ``dataset``'s classes), ``train`` the
    others; both relabelled 0..C-1."""
    parts = class_folds(dataset.num_classes, folds, seed)
    if not 0 <= fold < len(parts):
        raise ConfigError(f"fold must be in [0, {len(parts)}), got {fold}")
    in_val = np.zeros(dataset.num_classes, dtype=bool)
    in_val[parts[fold]] = True
    rows = in_val[dataset.labels]
    base = dataset.name.rsplit("/", 1)[0] if "/" in dataset.name else dataset.name
    return (dataset.select(np.flatnonzero(~rows), name=f"{base}/train"),
            dataset.select(np.flatnonzero(rows), name=f"{base}/val"))
