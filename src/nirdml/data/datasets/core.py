"""The dataset registry, :func:`load_splits`, and helpers shared by the dataset loaders.

A loader is registered with ``@DATASETS.register("name")`` and called as
``loader(root=..., seed=..., on_error=..., **options) -> Splits``; ``root`` is ``None`` when the
user gave none. It returns ``val=None`` unless the layout defines a validation split itself;
:func:`load_splits` then holds out ``val_fraction`` of the training classes.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nirdml.data.base import (
    IMAGE_KINDS,
    ON_ERROR,
    FileDataset,
    Splits,
    draw_classes,
    hold_out_classes,
    hold_out_fold,
    num_held_out,
)
from nirdml.data.image_files import (  # noqa: F401 - the class-folder rule, used by loaders
    IMAGE_EXTENSIONS,
    class_folders,
    images_below,
    is_image_name,
    listing,
    scan_class_folders,
)
from nirdml.errors import ConfigError, DatasetError
from nirdml.registry import Registry

DATASETS = Registry("dataset")

# Where each benchmark is officially distributed (quoted when the data is missing).
OFFICIAL_PAGES = {
    "cub200": "https://www.vision.caltech.edu/datasets/cub_200_2011/",
    "cars196": "https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
    "sop": "https://cvgl.stanford.edu/projects/lifted_struct/",
    "inshop": "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
    "omniglot": "https://github.com/brendenlake/omniglot",
}


def load_splits(name: str, root: str | os.PathLike | None = None, val_fraction: float = 0.1,
                seed: int = 0, on_error: str = "skip", folds: int = 0, fold: int = 0,
                train_classes: int | None = None, class_seed: int = 0,
                **options: Any) -> Splits:
    """Load dataset ``name`` as class-disjoint ``train``/``val``/``test`` :class:`Splits`.

    ``val`` holds out ``val_fraction`` of the *training classes* (a seeded random choice, at
    least one class when ``val_fraction > 0``; ``None`` when it is 0), unless the layout
    brings its own validation split (the CSV layout's ``validation`` rows). With ``folds >=
    2`` (cross-validation) ``val`` is instead fold ``fold`` of the training classes split into
    ``folds`` seeded class-disjoint folds (``nirdml.data.base.class_folds``; ``val_fraction``
    unused; a layout with its own validation split is refused). ``train_classes``: keep a
    seeded draw of that many training classes (``nirdml.data.base.draw_classes``, seeded by
    ``class_seed``), before the validation classes are held out of them. ``options`` go to
    the dataset's loader (``None`` values are dropped); see ``DATASETS.names()`` and each
    loader's docstring.
    """
    loader = DATASETS.get(name)
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    num_held_out(1, val_fraction)  # validates the range
    options = {k: v for k, v in options.items() if v is not None}
    params = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(params) - {"root", "seed", "on_error"})
    if unknown:
        takes = [p for p in params if p not in ("root", "seed", "on_error")]
        raise ConfigError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(takes) or 'none'}")
    root_path = None if root is None else Path(root).expanduser()
    splits = loader(root=root_path, seed=seed, on_error=on_error, **options)
    if train_classes is not None:
        if splits.val is not None:
            raise ConfigError(f"{name}: the layout brings its own validation split; draw "
                              f"training classes (data.train_classes) only from a dataset "
                              f"whose validation classes are held out of its training split")
        splits.train = draw_classes(splits.train, train_classes, class_seed)
    if folds:
        if splits.val is not None:
            raise ConfigError(f"{name}: the layout brings its own validation split, so its "
                              f"training classes cannot be cross-validated (data.folds="
                              f"{folds}); merge the validation rows into the training split")
        splits.train, splits.val = hold_out_fold(splits.train, folds, fold, seed)
    elif splits.val is None and val_fraction > 0:
        splits.train, splits.val = hold_out_classes(splits.train, val_fraction, seed)
    for split in ("train", "test"):
        if len(getattr(splits, split)) == 0:
            raise DatasetError(f"{name}: the {split} split is empty (root {splits.root})")
    return splits


# ---- helpers for the loaders ---------------------------------------------------------------
def default_root(name: str) -> Path:
    """``$NIRDML_DATA/<name>`` if ``NIRDML_DATA`` is set, else ``~/.cache/nirdml/<name>``."""
    base = os.environ.get("NIRDML_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "nirdml").expanduser() / name


def check_image_kind(image_kind: str) -> str:
    if image_kind not in IMAGE_KINDS:
        raise ConfigError(f"image_kind must be one of {IMAGE_KINDS}, got {image_kind!r}")
    return image_kind


def pil_mode(image_kind: str) -> str:
    return "RGB" if check_image_kind(image_kind) == "rgb" else "L"


def require_root(name: str, root: Path | None, hint: str = "") -> Path:
    """``root`` (or the default root) if it is an existing folder, else a DatasetError saying
    where the data was expected and how to get it."""
    path = default_root(name) if root is None else root
    if not path.is_dir():
        page = OFFICIAL_PAGES.get(name)
        how = f"download it from {page}" if page else "prepare it"
        where = "" if root is not None else (
            " (the default root; pass root=... / --set data.root=PATH, or set NIRDML_DATA)")
        raise DatasetError(f"{name}: dataset root {path}{where} does not exist; {how} and point "
                           f"root at the extracted folder{hint}")
    return path


def layout_error(name: str, root: Path, expected: Iterable[str]) -> DatasetError:
    wanted = " or ".join(repr(e) for e in expected)
    return DatasetError(f"{name}: expected {wanted} under {root}; found: {listing(root)}")


def is_image(path: Path) -> bool:
    return is_image_name(path.name)


def images_in(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted (hidden files and folders skipped)."""
    return [Path(p) for p in images_below(folder)]


_NUMERIC_PREFIX = re.compile(r"^(\d+)")


def class_ids(folders: Sequence[str | Path]) -> list[int]:
    """Class ids of sorted class folders (or their names): the leading number when every
    folder name has one (``001.Black_footed_Albatross`` -> 1), else the 1-based position."""
    matches = [_NUMERIC_PREFIX.match(Path(f).name) for f in folders]
    if matches and all(matches):
        return [int(m.group(1)) for m in matches]
    return list(range(1, len(folders) + 1))


def read_table(path: Path, name: str, min_columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a text file (after ``skip`` lines; blank lines ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.split()
            if len(fields) < min_columns:
                raise DatasetError(f"{name}: {path} line {lineno}: expected {min_columns} "
                                   f"columns, got {line.strip()!r}")
            rows.append(fields)
    return rows


def split_by_class_id(name: str, paths: list[str], keys: list, ids: list[int],
                      num_train_classes: int, on_error: str, root: Path) -> Splits:
    """CUB/Cars-style split: class id <= ``num_train_classes`` is train, the rest test."""
    out = {}
    for split, wanted in (("train", lambda c: c <= num_train_classes),
                          ("test", lambda c: c > num_train_classes)):
        rows = [i for i, c in enumerate(ids) if wanted(c)]
        if not rows:
            raise DatasetError(
                f"{name}: no {split} images under {root} (class ids "
                f"{min(ids, default=None)}-{max(ids, default=None)}, {split} "
                f"{'<=' if split == 'train' else '>'} {num_train_classes})")
        out[split] = FileDataset([paths[i] for i in rows], [keys[i] for i in rows],
                                 mode="RGB", on_error=on_error, name=f"{name}/{split}")
    return Splits(train=out["train"], val=None, test=out["test"], image_kind="rgb", name=name,
                  root=root)
