"""Dataset loaders, registered in :data:`DATASETS` by name; use :func:`load_splits`."""

from __future__ import annotations

from nirdml.data.datasets import cars, cub, digits, generic, omniglot, products  # noqa: F401
from nirdml.data.datasets.core import DATASETS, IMAGE_EXTENSIONS, default_root, load_splits

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "default_root", "load_splits"]
