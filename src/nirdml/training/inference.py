"""Use a trained checkpoint: rebuild its model and embed a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError
from nirdml.training import builders
from nirdml.training.checkpoint import load_checkpoint
from nirdml.training.config import Config


def load_trained_model(checkpoint: str | Path, device: str = "auto"):
    """Return ``(model, config, state)`` from a checkpoint (model in eval mode, on ``device``)."""
    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    # the weights come from the checkpoint: never fetch pretrained ones again
    cfg.model.pretrained = False
    cfg.model.weights_path = None
    dev = builders.resolve_device(device)
    model = builders.build_model(cfg, in_chans=state.get("in_chans"))
    model.load_state_dict(state["model"])
    return model.to(dev).eval(), cfg, state


def embed_checkpoint_split(checkpoint: str | Path, split: str = "test", device: str = "auto",
                           batch_size: int | None = None, data_root: str | None = None,
                           ) -> tuple[builders.Embeddings, Config]:
    """Embed the ``train``/``val``/``test`` split of the checkpoint's own dataset."""
    model, cfg, _ = load_trained_model(checkpoint, device)
    if data_root is not None:
        cfg.data.root = data_root
    splits = builders.build_splits(cfg)
    dataset = getattr(splits, split, None)
    if dataset is None:
        raise ConfigError(f"split {split!r} is empty for dataset {cfg.data.name!r} "
                          f"(data.val_fraction={cfg.data.val_fraction})")
    if split == "train":  # embed without augmentation
        from nirdml.data import build_transforms

        dataset.transform = build_transforms(splits.image_kind, train=False,
                                             image_size=cfg.data.image_size)
    device_obj = next(model.parameters()).device
    emb = builders.embed_dataset(model, dataset, device_obj,
                                 batch_size=batch_size or cfg.data.eval_batch_size,
                                 num_workers=cfg.data.num_workers, amp=cfg.train.amp)
    return emb, cfg


def checkpoint_summary(state: dict[str, Any]) -> str:
    return (f"epoch {state.get('epoch')} of {state['config']['train']['epochs']}, "
            f"{state['config']['data']['name']}, {state['config']['loss']['name']}"
            f"{' + NIR' if state['config']['loss']['nir']['enabled'] else ''}")
