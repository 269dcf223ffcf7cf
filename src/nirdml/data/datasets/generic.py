"""Your own data: class-per-folder trees (``folder``) and the CSV contract (``csv``).

- ``folder``: ``<root>/<class>/**/<image>``: the class is the first folder level, images at any
  depth below it belong to it, hidden names are skipped (:mod:`nirdml.data.image_files`).
  Either ``train_root`` and ``test_root`` (two trees with disjoint classes), or one ``root``
  whose classes are split seeded at random (``numpy.random.default_rng([seed, 4321])``),
  ``test_fraction`` of them (at least one) for test.
- ``csv``: ``root`` is a CSV file (or a folder holding exactly one ``*.csv``) with a header and
  the columns ``label,path,split[,is_query,is_gallery]``; ``split`` is ``train``,
  ``validation`` (or ``val``) or ``test``; relative paths are relative to the CSV's folder.
  ``validation`` rows, when present, are the validation split (``val_fraction`` is then not
  used). ``is_query``/``is_gallery`` (1/0, true/false, yes/no) give the test split's masks.
"""

from __future__ import annotations

import csv as csv_module
import warnings
from pathlib import Path

import numpy as np

from nirdml.data.base import FileDataset, Splits, num_held_out
from nirdml.data.datasets.core import (
    DATASETS,
    check_image_kind,
    listing,
    pil_mode,
    scan_class_folders,
)
from nirdml.errors import ConfigError, DatasetError

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}
_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


@DATASETS.register("folder")
def folder(root: Path | None = None, seed: int = 0, on_error: str = "skip",
           train_root: str | Path | None = None, test_root: str | Path | None = None,
           test_fraction: float = 0.5, image_kind: str = "rgb") -> Splits:
    """Class-per-folder images; ``image_kind`` ``"rgb"`` (RGB) or ``"gray_small"`` (grey)."""
    mode = pil_mode(image_kind)
    if train_root is not None or test_root is not None:
        if train_root is None or test_root is None:
            raise ConfigError("folder: give both train_root and test_root (or only root)")
        parts = {"train": _scan(Path(train_root).expanduser()),
                 "test": _scan(Path(test_root).expanduser())}
        shared = set(parts["train"][1]) & set(parts["test"][1])
        if shared:
            warnings.warn(f"folder: {len(shared)} class names occur in both train_root and "
                          f"test_root (e.g. {sorted(shared)[0]!r}); deep metric learning "
                          f"normally tests on unseen classes", RuntimeWarning, stacklevel=3)
        base = Path(train_root).expanduser()
    elif root is not None:
        paths, keys = _scan(root)
        classes = sorted(set(keys))
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"folder: test_fraction must be in (0, 1), got {test_fraction}")
        n_test = num_held_out(len(classes), test_fraction)
        if n_test >= len(classes):
            raise DatasetError(f"folder: {root} has {len(classes)} class folder(s); at least 2 "
                               f"are needed to split classes into train and test")
        rng = np.random.default_rng([seed, 4321])
        test_classes = {classes[i] for i in rng.choice(len(classes), n_test, replace=False)}
        parts = {split: ([p for p, k in zip(paths, keys) if (k in test_classes) == is_test],
                         [k for k in keys if (k in test_classes) == is_test])
                 for split, is_test in (("train", False), ("test", True))}
        base = root
    else:
        raise ConfigError("folder: give root=<folder of class folders> (split into train/test "
                          "classes by test_fraction) or train_root=... and test_root=...")
    out = {split: FileDataset(p, k, mode=mode, on_error=on_error, name=f"folder/{split}")
           for split, (p, k) in parts.items()}
    return Splits(train=out["train"], val=None, test=out["test"], image_kind=image_kind,
                  name="folder", root=base)


def _scan(root: Path) -> tuple[list[str], list[str]]:
    """``(paths, class name per image)`` of one class-folder tree (the rule of
    :mod:`nirdml.data.image_files`: the class is the first folder level)."""
    paths, class_names, labels = scan_class_folders(root, what="folder")
    return paths, [class_names[label] for label in labels]


@DATASETS.register("csv")
def csv(root: Path | None = None, seed: int = 0, on_error: str = "skip",
        image_kind: str = "rgb") -> Splits:
    """The CSV contract ``label,path,split[,is_query,is_gallery]`` (see the module docstring)."""
    mode = pil_mode(check_image_kind(image_kind))
    table = _find_csv(root)
    try:
        rows, has_masks = _read_rows(table)
    except DatasetError:
        raise
    except (UnicodeDecodeError, csv_module.Error, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"csv: {table} is not a readable UTF-8 CSV file ({text}); save it as "
                           f"UTF-8 text with the columns label,path,split[,is_query,is_gallery]"
                           ) from None
    for split in ("train", "test"):
        if not rows[split]:
            raise DatasetError(f"csv: {table} has no '{split}' rows")
    train_classes = {r[1] for r in rows["train"] + rows["val"]}
    overlap = train_classes & {r[1] for r in rows["test"]}
    if overlap:
        warnings.warn(f"csv: {len(overlap)} labels occur in both training and test rows (e.g. "
                      f"{sorted(overlap)[0]!r}); deep metric learning normally tests on unseen "
                      f"classes", RuntimeWarning, stacklevel=3)

    def build(split: str) -> FileDataset:
        part = rows[split]
        masks = {}
        if split == "test" and has_masks:
            masks = {"is_query": [r[2] if r[2] is not None else True for r in part],
                     "is_gallery": [r[3] if r[3] is not None else True for r in part]}
        return FileDataset([r[0] for r in part], [r[1] for r in part], mode=mode,
                           on_error=on_error, name=f"csv/{split}", **masks)

    return Splits(train=build("train"), val=build("val") if rows["val"] else None,
                  test=build("test"), image_kind=image_kind, name="csv", root=table.parent)


def _read_rows(table: Path) -> tuple[dict[str, list[tuple[str, str, bool | None, bool | None]]],
                                     bool]:
    """``({split: [(path, label, is_query, is_gallery)]}, has mask columns)`` of ``table``;
    DatasetError for a missing column or a bad value (a UTF-8 byte-order mark is allowed)."""
    rows: dict[str, list[tuple[str, str, bool | None, bool | None]]] = {
        "train": [], "val": [], "test": []}
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv_module.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = {"label", "path", "split"} - set(columns)
        if missing:
            raise DatasetError(f"csv: {table} needs a header with columns label,path,split"
                               f"[,is_query,is_gallery]; missing {sorted(missing)} in {columns}")
        has_masks = "is_query" in columns or "is_gallery" in columns
        for lineno, row in enumerate(reader, 2):
            split = _SPLITS.get((row["split"] or "").strip().lower())
            if split is None:
                raise DatasetError(f"csv: {table} line {lineno}: split must be train, validation "
                                   f"or test, got {row['split']!r}")
            label, rel = (row["label"] or "").strip(), (row["path"] or "").strip()
            if not label or not rel:
                raise DatasetError(f"csv: {table} line {lineno}: empty label or path")
            path = Path(rel).expanduser()
            path = path if path.is_absolute() else table.parent / path
            flags = tuple(_flag(row.get(c), table, lineno, c) if c in columns else None
                          for c in ("is_query", "is_gallery"))
            rows[split].append((str(path), label, *flags))
    return rows, has_masks


def _find_csv(root: Path | None) -> Path:
    if root is None:
        raise ConfigError("csv: give root=<path to the CSV file> (columns "
                          "label,path,split[,is_query,is_gallery])")
    if root.is_file():
        return root
    if root.is_dir():
        tables = sorted(root.glob("*.csv"))
        if len(tables) == 1:
            return tables[0]
        raise DatasetError(f"csv: expected one '*.csv' file (label,path,split[,is_query,"
                           f"is_gallery]) in {root}; found: {listing(root)}")
    raise DatasetError(f"csv: {root} does not exist; give the path of a CSV file with columns "
                       f"label,path,split[,is_query,is_gallery]")


def _flag(value: str | None, table: Path, lineno: int, column: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"csv: {table} line {lineno}: {column} must be 1/0, true/false or "
                       f"yes/no, got {value!r}")
