"""Cars196 (Stanford Cars): classes 1-98 train, 99-196 test.

Layouts under ``root``:

- official: ``cars_annos.mat`` (struct array ``annotations`` with ``relative_im_path``, e.g.
  ``car_ims/000001.jpg`` relative to ``root``, and ``class`` 1..196); the classification
  ``test`` flag is ignored (DML uses all 16,185 images);
- class folders: ``<class>/*.jpg`` directly under ``root`` (or under ``root/images``), class ids
  from the folder names' leading number if all have one, else the sorted position (so the
  first 98 sorted folders train).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import Splits
from nirdml.data.datasets.core import (
    DATASETS,
    class_folders,
    class_ids,
    images_in,
    layout_error,
    require_root,
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
        for base in (root, root / "images"):
            folders = [f for f in class_folders(base) if images_in(f)] if base.is_dir() else []
            if folders:
                break
        else:
            raise layout_error(NAME, root, ["cars_annos.mat", "<class>/*.jpg"])
        paths, keys, ids = [], [], []
        for folder, cid in zip(folders, class_ids(folders)):
            for p in images_in(folder):
                paths.append(str(p))
                keys.append(folder.name)
                ids.append(cid)
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
