"""Using a trained model: :class:`TrainedRun` opens a checkpoint and gives its config, model,
criterion, dataset splits, preprocessing and embeddings (``nirdml.inference.trained_run``);
:func:`embed_dataset` embeds a dataset with a model (``nirdml.inference.embed``).

Every command after training (``evaluate``, ``embed``, ``analyze``, ``index``, ``search``,
``export``, ``report``) opens its checkpoint through :meth:`TrainedRun.open`.
"""

from __future__ import annotations

from nirdml.inference.embed import embed_dataset
from nirdml.inference.trained_run import SPLITS, TrainedRun, UnusualQueryWarning

__all__ = ["SPLITS", "TrainedRun", "UnusualQueryWarning", "embed_dataset"]
