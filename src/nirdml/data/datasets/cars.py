"""Cars196 (Stanford Cars): classes 1-98 train, 99-196 test.

Layouts under ``root``:

- official: ``cars_annos.mat`` (struct array ``annotations`` with ``relative_im_path``, e.g.
  ``car_ims/000001.jpg`` relative to ``root``, and ``class`` 1..196); the classification
  ``test`` flag is ignored (DML uses all 16,185 images);
- class folders: ``<class>/**/*.jpg`` under ``root/images`` when that is a folder of class
  folders, else under ``root`` (the class is the first folder level;
  :mod:`nirdml.data.image_files`), class ids from the folder names' leading number if all have
  one, else the sorted position (so the first 98 sorted folders train).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import Splits
from nirdml.data.datasets.core import (
    DATASETS,
    class_folders,
    class_ids,
    layout_error,
    require_root,
    scan_class_folders,
    split_by_class_id,
)
from nirdml.errors import DatasetError

NAME = "cars196"


@DATASETS.register(NAME)
def cars196(root: Path | None = None, seed: int = 0, on_error: str = "skip",
            num_train_classes: int = 98) -> Splits:
    """Cars196 (``image_kind="rgb"``): classes with id <= ``num_train_classes`` train."""
    root = require_root(NAME, root)
    if (root / "cars_annos.mat").is_file():
        paths, ids = _official(root)
        keys: list = list(ids)
    else:
        # root/images/<class>/ when there is such a folder of class folders, else root/<class>/
        images = root / "images"
        base = images if images.is_dir() and class_folders(images) else root
        if not class_folders(base):
            raise layout_error(NAME, root, ["cars_annos.mat", "<class>/*.jpg"])
        paths, class_names, labels = scan_class_folders(base, what=NAME)
        class_id = class_ids(class_names)
        keys = [class_names[label] for label in labels]
        ids = [class_id[label] for label in labels]
    return split_by_class_id(NAME, paths, keys, ids, num_train_classes, on_error, root)


def _official(root: Path) -> tuple[list[str], list[int]]:
    from scipy.io import loadmat

    path = root / "cars_annos.mat"
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=True)
        annotations = np.atleast_1d(mat["annotations"])
        rel_paths = np.atleast_1d(annotations["relative_im_path"])
        classes = np.atleast_1d(annotations["class"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{NAME}: cannot read {path} ({exc}); expected a struct array "
                           f"'annotations' with fields 'relative_im_path' and 'class'") from None
    paths = [str(root / str(p)) for p in rel_paths]
    ids = [int(c) for c in classes]
    return paths, ids
