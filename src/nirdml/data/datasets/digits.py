"""scikit-learn's bundled 8x8 digits: the zero-setup offline dataset (train 0-4, test 5-9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nirdml.data.base import ArrayDataset, Splits
from nirdml.data.datasets.core import DATASETS


@DATASETS.register("digits")
def digits(root: Path | None = None, seed: int = 0, on_error: str = "skip",
           train_digits: int = 5) -> Splits:
    """1,797 images ``1 x 8 x 8`` float in ``[0, 1]`` (pixel values / 16); classes
    ``0 .. train_digits-1`` train (default 0-4), the rest test. ``root`` is ignored (the data
    ships with scikit-learn). With 5 training classes, the default ``val_fraction=0.1`` holds
    out one of them (at least one class is held out whenever ``val_fraction > 0``);
    cross-validation uses 8 (``configs/digits_cv.yaml``: 4 folds of 2 classes). Not to be
    confused with ``data.train_classes``, a seeded draw of that many of the training classes."""
    from sklearn.datasets import load_digits

    from nirdml.errors import ConfigError

    if isinstance(train_digits, bool) or not isinstance(train_digits, int) \
            or not 2 <= train_digits <= 8:
        raise ConfigError(f"data.options.train_digits must be an integer in 2..8 (digits has "
                          f"10 classes; 2 stay for the test), got {train_digits!r}")
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    target = bunch.target.astype(np.int64)
    splits = {}
    for split, wanted in (("train", target < train_digits),
                          ("test", target >= train_digits)):
        rows = np.flatnonzero(wanted)
        splits[split] = ArrayDataset(images[rows], target[rows].tolist(), on_error=on_error,
                                     name=f"digits/{split}")
    return Splits(train=splits["train"], val=None, test=splits["test"], image_kind="gray_small",
                  name="digits")
