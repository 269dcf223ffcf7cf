"""``TrainedRun``: the one way to use a trained checkpoint.

Everything that uses a trained model -- ``evaluate``, ``embed``, ``analyze``, ``index`` and
``search``, ``export``, ``report`` -- opens the checkpoint through :meth:`TrainedRun.open` and
asks it for what it needs: the resolved :class:`~nirdml.training.config.Config`, the model (in
eval mode, on the chosen device), the criterion with its proxies and flow (built lazily), a
split of the run's own dataset with the evaluation transform, embeddings of a split, and the
:class:`~nirdml.data.preprocessing.Preprocessing` record that says how an image becomes a model
input (saved by the trainer; derived once, from the dataset, for checkpoints older than it).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from nirdml.errors import CheckpointError, ConfigError

SPLITS = ("train", "val", "test")


class TrainedRun:
    """A trained checkpoint and what follows from it (see the module docstring)."""

    def __init__(self, state: dict[str, Any], path: Path, device: str = "auto",
                 data_root: str | None = None):
        from nirdml.training import builders
        from nirdml.training.config import Config

        self.state = state
        self.path = Path(path)
        self.config = Config.from_dict(state["config"])
        # the weights come from the checkpoint: never fetch pretrained ones again
        self.config.model.pretrained = False
        self.config.model.weights_path = None
        if data_root is not None:
            self.config.data.root = str(data_root)
        self.device = builders.resolve_device(device)

    @classmethod
    def open(cls, checkpoint: str | Path, device: str = "auto",
             data_root: str | None = None) -> TrainedRun:
        """Read ``checkpoint`` (CheckpointError if missing or corrupt); ``data_root`` points
        at the dataset when it moved since training."""
        from nirdml.training.checkpoint import load_checkpoint

        return cls(load_checkpoint(checkpoint), checkpoint, device, data_root)

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

        criterion = builders.build_criterion(self.config, int(self.state["num_classes"]))
        try:
            criterion.load_state_dict(self.state["criterion"])
        except (RuntimeError, KeyError) as exc:
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
              progress: str | None = None):
        """:class:`~nirdml.embeddings.Embeddings` of a split name or a dataset, in order, with
        the run's model."""
        from nirdml.embeddings import embed_dataset

        dataset = self.split(split_or_dataset) if isinstance(split_or_dataset, str) \
            else split_or_dataset
        return embed_dataset(
            self.model, dataset, self.device,
            batch_size=batch_size or self.config.data.eval_batch_size,
            num_workers=self.config.data.num_workers, amp=self.config.train.amp,
            progress=progress)

    def summary(self) -> str:
        """One line: dataset, loss (+ NIR), epoch."""
        cfg = self.config
        return (f"{cfg.data.name}, {cfg.loss.name}{' + NIR' if cfg.loss.nir.enabled else ''}, "
                f"epoch {self.state.get('epoch')} of {cfg.train.epochs}")
