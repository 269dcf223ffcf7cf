"""``TrainedRun``: the one way to use a trained checkpoint.

Everything that uses a trained model -- ``evaluate``, ``embed``, ``analyze``, ``index`` and
``search``, ``export``, ``report`` -- opens the checkpoint through :meth:`TrainedRun.open` and
asks it for what it needs: the resolved :class:`~nirdml.training.config.Config`, the model (in
eval mode, on the chosen device), the criterion with its proxies and flow (built lazily), a
split of the run's own dataset with the evaluation transform, embeddings of a split, and the
:class:`~nirdml.data.preprocessing.Preprocessing` record that says how an image becomes a model
input (saved by the trainer; derived once, from the dataset, for checkpoints older than it).

Query images -- files or PIL images, as ``search`` and folder galleries get them -- are embedded
here too (:meth:`TrainedRun.embed_images`, :meth:`TrainedRun.embed_files`,
:meth:`TrainedRun.embed_tensors`), prepared with :attr:`TrainedRun.query_preprocessing`; a query
far from the training inputs (an inverted image, another modality) warns
:class:`UnusualQueryWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.errors import CheckpointError, ConfigError, InputError, NirdmlError

SPLITS = ("train", "val", "test")


class UnusualQueryWarning(UserWarning):
    """A query image's statistics are far from the training images' (e.g. inverted)."""


class TrainedRun:
    """A trained checkpoint and what follows from it (see the module docstring)."""

    def __init__(self, state: dict[str, Any], path: Path, device: str = "auto",
                 data_root: str | None = None):
        from nirdml.devices import resolve_device
        from nirdml.training.config import Config

        self.state = state
        self.path = Path(path)
        self.config = Config.from_dict(state["config"])
        # the weights come from the checkpoint: never fetch pretrained ones again
        self.config.model.pretrained = False
        self.config.model.weights_path = None
        if data_root is not None:
            self.config.data.root = str(data_root)
        self.device = resolve_device(device)

    @classmethod
    def open(cls, checkpoint: str | Path, device: str = "auto",
             data_root: str | None = None) -> TrainedRun:
        """Read ``checkpoint`` (CheckpointError if missing or corrupt); ``data_root`` points
        at the dataset when it moved since training."""
        from nirdml.training.checkpoint import MODEL_KEYS, load_checkpoint

        return cls(load_checkpoint(checkpoint, require=MODEL_KEYS), checkpoint, device,
                   data_root)

    # ---- what the checkpoint holds ------------------------------------------------------------
    @cached_property
    def model(self):
        """The embedding network with the checkpoint's weights, in eval mode on ``device``."""
        from nirdml.training import builders

        model = builders.build_model(self.config, in_chans=self.state.get("in_chans"))
        try:
            model.load_state_dict(self.state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"the model weights of {str(self.path)!r} do not match its "
                                  f"config ({str(exc).splitlines()[0]})") from None
        return model.to(self.device).eval()

    @cached_property
    def criterion(self):
        """The proxy loss (with NIR and its flow when the run had it), checkpoint state loaded,
        in eval mode on ``device``."""
        from nirdml.training import builders

        if "num_classes" not in self.state:
            raise CheckpointError(f"{str(self.path)!r} holds no proxies (no 'num_classes'): it "
                                  f"is a model-only checkpoint; use one written by nirdml train")
        criterion = builders.build_criterion(self.config, int(self.state["num_classes"]))
        try:
            criterion.load_state_dict(self.state["criterion"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"the criterion state of {str(self.path)!r} does not match "
                                  f"its config ({exc})") from None
        return criterion.to(self.device).eval()

    @property
    def flow_init(self):
        """The flow's initial parameters, when the checkpoint kept them (NIR runs)."""
        return self.state.get("flow_init")

    @cached_property
    def splits(self):
        """The run's dataset splits (every image file checked, see ``nirdml.data.scan``)."""
        from nirdml.training import builders

        return builders.build_splits(self.config)

    @cached_property
    def preprocessing(self):
        """How an image becomes a model input: the checkpoint's record, or for older
        checkpoints the same record measured once on the run's training images."""
        from nirdml.data.preprocessing import Preprocessing
        from nirdml.training import builders

        record = self.state.get("preprocessing")
        if record is not None:
            return Preprocessing.from_dict(record)
        in_chans = self.state.get("in_chans") or int(self.splits.train[0][0].shape[0])
        return builders.measure_preprocessing(self.config, self.splits, in_chans)

    @cached_property
    def query_preprocessing(self):
        """:attr:`preprocessing` for query images; a checkpoint older than the record whose
        dataset is not at hand gets the eval transform of its ``image_kind`` alone (with a
        warning for small grey images, whose inversion and training size are then unknown)."""
        try:
            return self.preprocessing
        except (NirdmlError, OSError):
            if self.state.get("preprocessing") is not None:
                raise
        kind = self.state.get("image_kind")
        if kind == "gray_small":
            warnings.warn(f"dataset {self.config.data.name!r} is not available, so query images "
                          f"get the eval transform only (no inversion, no resize to the "
                          f"training size)", RuntimeWarning, stacklevel=3)
        from nirdml.data.preprocessing import Preprocessing

        in_chans = self.state.get("in_chans") or getattr(self.model, "in_chans", None)
        return Preprocessing.plain(kind, in_chans, self.config.data.image_size)

    # ---- data and embeddings ------------------------------------------------------------------
    def split(self, name: str):
        """Split ``name`` of the run's dataset with the evaluation transform (no augmentation,
        also for ``train``)."""
        from nirdml.data import build_transforms

        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        dataset = getattr(self.splits, name)
        if dataset is None:
            raise ConfigError(f"split {name!r} is empty for dataset {self.config.data.name!r} "
                              f"(data.val_fraction={self.config.data.val_fraction})")
        if name == "train":
            dataset.transform = build_transforms(self.splits.image_kind, train=False,
                                                 image_size=self.config.data.image_size)
        return dataset

    def embed(self, split_or_dataset, batch_size: int | None = None,
              progress: str | None = None, num_workers: int | None = None,
              amp: str | None = None):
        """:class:`~nirdml.embeddings.Embeddings` of a split name or a dataset, in order, with
        the run's model (``num_workers`` and ``amp`` default to the run's)."""
        from nirdml.inference.embed import embed_dataset

        dataset = self.split(split_or_dataset) if isinstance(split_or_dataset, str) \
            else split_or_dataset
        return embed_dataset(
            self.model, dataset, self.device,
            batch_size=batch_size or self.config.data.eval_batch_size,
            num_workers=self.config.data.num_workers if num_workers is None else num_workers,
            amp=self.config.train.amp if amp is None else amp, progress=progress)

    # ---- query images -------------------------------------------------------------------------
    @torch.no_grad()
    def embed_tensors(self, images: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Embed preprocessed images ``(B, C, H, W)`` in batches (float32, no autocast);
        returns float32 ``(B, D)``."""
        model = self.model
        if images.dim() == 3:
            images = images.unsqueeze(0)
        step = batch_size or self.config.data.eval_batch_size
        was_training = model.training
        model.eval()
        out = []
        try:
            for start in range(0, images.shape[0], step):
                batch = images[start:start + step].to(self.device, torch.float32)
                out.append(model(batch).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, model.embedding_dim), np.float32)

    def embed_images(self, images: Sequence[Any], batch_size: int | None = None,
                     preprocessing=None) -> np.ndarray:
        """Embed image files (paths) or PIL images prepared with ``preprocessing`` (default
        :attr:`query_preprocessing`); an undecodable file raises InputError, an image unlike
        the training inputs warns :class:`UnusualQueryWarning`."""
        from PIL import Image

        from nirdml.data.images import load_image

        prep = preprocessing or self.query_preprocessing
        transform = prep.transform()
        tensors = []
        for item in images:
            if isinstance(item, Image.Image):
                image = item
            elif isinstance(item, str | os.PathLike):
                image = load_image(item, prep.in_chans, transform.prepare)
            else:
                raise InputError(f"a query must be an image path or a PIL image, got "
                                 f"{type(item).__name__}")
            tensors.append(transform(image))
            why = prep.unusual(tensors[-1])
            if why is not None:
                name = os.fspath(item) if isinstance(item, str | os.PathLike) else "a PIL image"
                warnings.warn(f"query {name} looks unlike the images this model was trained on "
                              f"({why}); its results are unreliable", UnusualQueryWarning,
                              stacklevel=2)
        if not tensors:
            raise InputError("no query images given")
        return self.embed_tensors(torch.stack(tensors), batch_size)

    def embed_files(self, paths: Sequence[str], skip_bad: bool = True,
                    batch_size: int | None = None, num_workers: int | None = None,
                    preprocessing=None) -> tuple[np.ndarray, list[int], list[int]]:
        """Embed image files through a DataLoader: ``(embeddings, kept, bad)``, the rows of
        the decoded files and the indices of the undecodable ones (skipped with ``skip_bad``,
        else the first raises InputError)."""
        from nirdml.data.images import ImageFileDataset, collate_skipping_bad

        prep = preprocessing or self.query_preprocessing
        dataset = ImageFileDataset(paths, prep.transform(), skip_bad=skip_bad)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size or self.config.data.eval_batch_size,
            num_workers=self.config.data.num_workers if num_workers is None else num_workers,
            collate_fn=collate_skipping_bad)
        chunks, kept, bad = [], [], []
        for images, k, b in loader:
            bad.extend(b)
            if images is not None:
                chunks.append(self.embed_tensors(images, batch_size))
                kept.extend(k)
        dim = self.model.embedding_dim
        emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
        return emb, kept, bad

    def summary(self) -> str:
        """One line: dataset, loss (+ NIR), epoch."""
        cfg = self.config
        return (f"{cfg.data.name}, {cfg.loss.name}{' + NIR' if cfg.loss.nir.enabled else ''}, "
                f"epoch {self.state.get('epoch')} of {cfg.train.epochs}")
