"""CUB-200-2011: classes 1-100 train, 101-200 test.

Layouts under ``root`` (or ``root/CUB_200_2011``):

- official: ``images.txt`` (``<image id> <class folder>/<file>``), ``image_class_labels.txt``
  (``<image id> <class id>``), optional ``classes.txt`` (``<class id> <class name>``) and
  ``images/``;
- plain class folders: ``images/<class>/**/*.jpg`` (the class is the first folder level under
  ``images/``; :mod:`nirdml.data.image_files`) with class ids taken from the folder names'
  leading number (``001.Black_footed_Albatross``), or from their sorted position.
"""

from __future__ import annotations

from pathlib import Path

from nirdml.data.base import Splits
from nirdml.data.datasets.core import (
    DATASETS,
    class_folders,
    class_ids,
    layout_error,
    read_table,
    require_root,
    scan_class_folders,
    split_by_class_id,
)
from nirdml.errors import DatasetError

NAME = "cub200"


@DATASETS.register(NAME)
def cub200(root: Path | None = None, seed: int = 0, on_error: str = "skip",
           num_train_classes: int = 100) -> Splits:
    """CUB-200-2011 (``image_kind="rgb"``): classes with id <= ``num_train_classes`` train."""
    root = require_root(NAME, root)
    bases = [root, root / "CUB_200_2011"]
    for base in bases:
        if (base / "images.txt").is_file():
            paths, keys, ids = _official(base)
            break
    else:
        for base in bases:
            if (base / "images").is_dir() and class_folders(base / "images"):
                paths, keys, ids = _plain(base / "images")
                break
        else:
            raise layout_error(NAME, root, ["CUB_200_2011/images.txt", "images/<class>/"])
    return split_by_class_id(NAME, paths, keys, ids, num_train_classes, on_error, root)


def _official(base: Path) -> tuple[list[str], list, list[int]]:
    labels_file = base / "image_class_labels.txt"
    if not labels_file.is_file():
        raise DatasetError(f"{NAME}: {base / 'images.txt'} exists but {labels_file} is missing")
    images = {}
    with open(base / "images.txt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                fields = line.strip().split(maxsplit=1)
                if len(fields) != 2:
                    raise DatasetError(f"{NAME}: {base / 'images.txt'} line {lineno}: expected "
                                       f"'<image id> <path>', got {line.strip()!r}")
                images[fields[0]] = fields[1]
    class_of = {row[0]: int(row[1]) for row in read_table(labels_file, NAME, 2)}
    names = {}
    if (base / "classes.txt").is_file():
        names = {int(r[0]): r[1] for r in read_table(base / "classes.txt", NAME, 2)}
    missing = sorted(set(images) - set(class_of))
    if missing:
        raise DatasetError(f"{NAME}: {len(missing)} image ids of images.txt (e.g. {missing[0]}) "
                           f"have no class in {labels_file}")
    paths, keys, ids = [], [], []
    for image_id, rel in images.items():
        cid = class_of[image_id]
        paths.append(str(base / "images" / rel))
        keys.append(names.get(cid, cid))
        ids.append(cid)
    return paths, keys, ids


def _plain(images_root: Path) -> tuple[list[str], list[str], list[int]]:
    """Class folders ``images/<class>/**/<image>`` (:func:`scan_class_folders`'s rule)."""
    paths, class_names, labels = scan_class_folders(images_root, what=NAME)
    ids = class_ids(class_names)
    return paths, [class_names[label] for label in labels], [ids[label] for label in labels]
