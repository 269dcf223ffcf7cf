"""Datasets, class-disjoint splits, class-balanced batch sampling and transforms.

``load_splits(name, root=None, val_fraction=0.1, seed=0, on_error="skip", **options)`` returns
:class:`Splits` (``train``/``val``/``test`` :class:`LabeledDataset` s and ``image_kind``) for
``digits``, ``omniglot``, ``cub200``, ``cars196``, ``sop``, ``inshop``, ``folder`` and ``csv``;
``build_transforms(image_kind, train, image_size=None)`` gives the matching transforms and
:class:`ClassBalancedBatchSampler` the P x m batches proxy losses train on.
"""

from __future__ import annotations

from nirdml.data.base import (
    ArrayDataset,
    FileDataset,
    LabeledDataset,
    Splits,
    class_folds,
    encode_labels,
    hold_out_classes,
    hold_out_fold,
    to_float_tensor,
)
from nirdml.data.datasets import DATASETS, IMAGE_EXTENSIONS, default_root, load_splits
from nirdml.data.download import download_file, sha256_of
from nirdml.data.sampler import ClassBalancedBatchSampler
from nirdml.data.transforms import build_transforms

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "ClassBalancedBatchSampler",
    "FileDataset",
    "LabeledDataset",
    "Splits",
    "build_transforms",
    "class_folds",
    "default_root",
    "download_file",
    "encode_labels",
    "hold_out_classes",
    "hold_out_fold",
    "load_splits",
    "sha256_of",
    "to_float_tensor",
]
