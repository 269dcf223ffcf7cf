"""Features of a frozen backbone, computed once per split and cached on disk.

With a frozen pretrained backbone (``model.frozen_backbone``) every epoch would push the same
images through the same network; instead each split is encoded once, without augmentation, and
training runs on the pooled features (:class:`FeatureDataset`). A cache entry is one ``.npy``
file (float32, ``N x F``) named by the SHA-256 of everything that determines it: the encoder's
architecture and weights, the transform, and the split (dataset description, sample count,
labels and file paths or array rows). A changed model, transform or dataset is a new entry,
never a stale one; entries are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nirdml.data.base import LabeledDataset, Splits
from nirdml.errors import ConfigError
from nirdml.files import atomic_write_bytes


class FeatureDataset(LabeledDataset):
    """Precomputed feature vectors with the labels and masks of the split they came from.

    ``dataset[i]`` is ``(float32 tensor (F,), label)``; ``transform`` stays ``None``.
    """

    def __init__(self, features: np.ndarray, source: LabeledDataset):
        if features.ndim != 2 or len(features) != len(source):
            raise ConfigError(f"features of shape {features.shape} for {len(source)} samples")
        self._features = features
        self._rows = np.arange(len(features), dtype=np.int64)
        super().__init__([source.class_names[k] for k in source.labels],
                         is_query=source.is_query, is_gallery=source.is_gallery,
                         name=f"{source.name}/features")
        self._source_paths = source.paths

    @property
    def paths(self) -> list[str] | None:
        return self._source_paths

    def _read(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._features[self._rows[i]], dtype=np.float32))

    def _describe(self, i: int) -> str:
        return f"feature row {int(self._rows[i])}"

    def _take(self, indices: np.ndarray) -> None:
        self._rows = self._rows[indices]
        if self._source_paths is not None:
            self._source_paths = [self._source_paths[j] for j in indices]


def default_cache_dir() -> Path:
    """``$NIRDML_CACHE/features`` if set, else ``~/.cache/nirdml/features``."""
    base = os.environ.get("NIRDML_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "nirdml").expanduser() / "features"


def _split_identity(dataset: LabeledDataset) -> dict[str, Any]:
    h = hashlib.sha256(np.ascontiguousarray(dataset.labels).tobytes())
    h.update(json.dumps([str(c) for c in dataset.class_names]).encode())
    if dataset.paths is not None:
        h.update("\n".join(dataset.paths).encode())
    elif hasattr(dataset, "_rows"):
        h.update(np.ascontiguousarray(dataset._rows).tobytes())
    return {"type": type(dataset).__name__, "name": dataset.name, "samples": len(dataset),
            "content": h.hexdigest()}


def _weights_digest(encoder: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(encoder: nn.Module, transform: Callable | None, dataset: LabeledDataset,
              description: dict[str, Any]) -> str:
    """SHA-256 naming the features of ``dataset`` under ``encoder`` and ``transform``;
    ``description`` adds what the caller knows (dataset name, root, options, model config)."""
    record = {"description": description, "split": _split_identity(dataset),
              "transform": repr(transform), "encoder": type(encoder).__name__,
              "weights": _weights_digest(encoder)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def encode(encoder: nn.Module, dataset: LabeledDataset, device: torch.device,
           batch_size: int = 256, num_workers: int = 0, progress: bool = False) -> np.ndarray:
    """``encoder(images)`` of every sample in order (eval mode), as float32 ``N x F`` (the
    loader's seed from its own generator: the global RNGs are untouched)."""
    from nirdml.inference.embed import embed_dataset

    return embed_dataset(encoder, dataset, device, batch_size, num_workers,
                         progress=f"features {dataset.name}" if progress else None,
                         generator=torch.Generator().manual_seed(0)).embeddings


def cached_features(encoder: nn.Module, dataset: LabeledDataset, device: torch.device,
                    cache_dir: str | Path | None, description: dict[str, Any],
                    batch_size: int = 256, num_workers: int = 0,
                    progress: bool = False) -> FeatureDataset:
    """The :class:`FeatureDataset` of ``dataset`` (its current transform applied), read from
    the cache or computed and stored there."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = cache_key(encoder, dataset.transform, dataset, description)
    path = folder / f"{key}.npy"
    if path.is_file():
        features = np.load(path, mmap_mode="r")
        if features.shape[0] == len(dataset):
            return FeatureDataset(features, dataset)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"feature cache {str(folder)!r} is not writable ({exc.strerror}); "
                          f"set data.feature_cache to another folder") from None
    features = encode(encoder, dataset, device, batch_size, num_workers, progress)
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write_bytes(path, buffer.getvalue())
    return FeatureDataset(np.load(path, mmap_mode="r"), dataset)


def feature_splits(encoder: nn.Module, splits: Splits, transform: Callable,
                   device: torch.device, cache_dir: str | Path | None,
                   description: dict[str, Any], batch_size: int = 256, num_workers: int = 0,
                   progress: bool = False) -> Splits:
    """``splits`` with every split replaced by its cached features under ``encoder``
    (each split encoded with ``transform``, the evaluation transform: no augmentation)."""
    out = {}
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            out[name] = None
            continue
        ds.transform = transform
        out[name] = cached_features(encoder, ds, device, cache_dir, description,
                                    batch_size, num_workers, progress)
    return Splits(train=out["train"], val=out["val"], test=out["test"], image_kind="features",
                  name=splits.name, root=splits.root, invert_files=splits.invert_files)
