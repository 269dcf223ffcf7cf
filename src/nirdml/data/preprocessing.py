"""How an image file becomes a model input, recorded once and carried by the checkpoint.

A model is only right on inputs prepared the way its training images were. :class:`Preprocessing`
is that record (as timm models carry their ``pretrained_cfg``): the transform family and size,
the channel count, the input size the model saw, whether a raw image *file* of the dataset is
inverted on reading (Omniglot: black strokes on white in the official PNGs, bright strokes on
dark for the model, whichever source -- npz, folders or zips -- the run was trained from), and
statistics of the training inputs, which let a query that looks nothing like them (an inverted
image, another modality) be flagged. The trainer stores it in every checkpoint
(``state["preprocessing"]``); ``search``, ``embed`` of files, ``index`` and ``export`` apply it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Preprocessing:
    """The preparation of one model's inputs (see the module docstring)."""

    image_kind: str
    in_chans: int
    image_size: int | None = None
    input_size: tuple[int, int] | None = None
    invert: bool = False
    #: mean and std over training images of each image's mean model-input value
    input_mean: float | None = None
    input_mean_std: float | None = None

    # ---- record ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = None if self.input_size is None else list(self.input_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        if kw.get("input_size") is not None:
            kw["input_size"] = tuple(int(v) for v in kw["input_size"])
        return cls(**kw)

    @classmethod
    def plain(cls, image_kind: str | None, in_chans: int | None, image_size: int | None,
              invert: bool = False, input_size=None) -> Preprocessing:
        """A record without input statistics: the eval transform of ``image_kind`` (plus
        ``invert`` and ``input_size`` when known), for checkpoints older than the record."""
        if image_kind is None:
            from nirdml.errors import CheckpointError

            raise CheckpointError("the checkpoint does not record its image_kind, so the right "
                                  "image transform is unknown; re-save it with a current nirdml")
        return cls(image_kind=image_kind, in_chans=int(in_chans or 3), image_size=image_size,
                   input_size=None if input_size is None else tuple(int(v) for v in input_size),
                   invert=bool(invert))

    @classmethod
    def measure(cls, dataset, image_kind: str, in_chans: int, image_size: int | None,
                invert: bool, samples: int = 256, seed: int = 0) -> Preprocessing:
        """The record of ``dataset`` (whose ``transform`` is the evaluation transform):
        input size and input statistics from ``samples`` seeded images (global RNGs untouched)."""
        n = len(dataset)
        rows = np.sort(np.random.default_rng([seed, 4242]).choice(
            n, size=min(samples, n), replace=False)) if n else []
        means, size = [], None
        for i in rows:
            x = dataset[int(i)][0]
            size = tuple(int(s) for s in x.shape[-2:])
            means.append(float(x.float().mean()))
        return cls(image_kind=image_kind, in_chans=int(in_chans), image_size=image_size,
                   input_size=size, invert=bool(invert),
                   input_mean=float(np.mean(means)) if means else None,
                   input_mean_std=float(np.std(means)) if means else None)

    # ---- use ---------------------------------------------------------------------------------
    def transform(self) -> Callable:
        """PIL image -> model input tensor (channel mode, inversion, eval transform, size)."""
        from nirdml.data.transforms import build_transforms

        return ImagePrep(build_transforms(self.image_kind, train=False,
                                          image_size=self.image_size),
                         self.in_chans, self.invert, self.input_size)

    def unusual(self, x: torch.Tensor, sigmas: float = 6.0) -> str | None:
        """Why input ``x`` (C x H x W) looks unlike the training inputs, or None.

        Compares its mean value with the training images' (``input_mean +- input_mean_std``);
        an inverted image or another kind of picture lies many standard deviations away.
        """
        if self.input_mean is None or self.input_mean_std is None:
            return None
        mean = float(x.float().mean())
        spread = max(self.input_mean_std, 1e-3)
        if abs(mean - self.input_mean) <= sigmas * spread:
            return None
        hint = " (inverted colours or polarity?)" if self.invert or self.image_kind == \
            "gray_small" else ""
        return (f"mean input value {mean:.3f}, training images {self.input_mean:.3f} +- "
                f"{self.input_mean_std:.3f}{hint}")


class ImagePrep:
    """PIL image -> model input: channel mode, optional inversion, eval transform, and a final
    resize to ``input_size`` (H, W) when the transform alone gives another size."""

    def __init__(self, transform: Callable, in_chans: int = 3, invert: bool = False,
                 input_size: tuple[int, int] | None = None):
        self.transform = transform
        self.in_chans = in_chans
        self.invert = invert
        self.input_size = None if input_size is None else tuple(int(s) for s in input_size)
        #: the transform's decode planner (``nirdml.data.transforms.decode_planner``)
        self.prepare = getattr(transform, "prepare", None)

    def __call__(self, image) -> torch.Tensor:
        from PIL import ImageOps

        image = image.convert("L" if self.in_chans == 1 else "RGB")
        if self.invert:
            image = ImageOps.invert(image)
        x = self.transform(image)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            from torchvision.transforms.v2 import functional as F

            x = F.resize(x, list(self.input_size), antialias=True)
        return x
