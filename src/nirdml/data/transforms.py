"""Image transforms (torchvision v2) for the two image kinds: ``"rgb"`` and ``"gray_small"``.

Inputs may be PIL images or ``C x H x W`` tensors (uint8 in ``[0, 255]`` or float in
``[0, 1]``); outputs are float32 ``C x H x W`` tensors, normalised.

- ``rgb`` (CUB200, Cars196, SOP, In-Shop, folders): train ``RandomResizedCrop(S)`` + horizontal
  flip, test ``Resize(round(S * 256 / 224))`` + ``CenterCrop(S)``, ``S = image_size or 224``;
  ImageNet mean/std.
- ``gray_small`` (Omniglot, digits; ink bright on a dark background): resize to ``image_size``,
  or with ``image_size=None`` shrink images larger than 28 px to 28 x 28 (Omniglot 105 -> 28;
  8 x 8 digits stay 8 x 8); train adds a small ``RandomAffine`` (rotation <= 8 degrees, shifts
  <= 10%, scale 0.9-1.1, background filled with 0). No flips: characters are not
  mirror-invariant. Normalised with mean 0.5, std 0.5 (to ``[-1, 1]``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nirdml.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
GRAY_DEFAULT_MAX_SIZE = 28


class ShrinkTo:
    """Resize to ``size x size`` only when the image is larger than that (never upsample)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        height, width = image.shape[-2:]
        if max(height, width) <= self.size:
            return image
        return F.resize(image, [self.size, self.size], antialias=True)

    def __repr__(self) -> str:
        return f"ShrinkTo(size={self.size})"


def build_transforms(image_kind: str, train: bool, image_size: int | None = None) -> Callable:
    """The train or eval transform of ``image_kind`` (``"rgb"`` or ``"gray_small"``)."""
    from torchvision.transforms import v2

    if image_size is not None and int(image_size) <= 0:
        raise ConfigError(f"image_size must be a positive integer, got {image_size}")
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if image_kind == "rgb":
        size = int(image_size or 224)
        if train:
            steps = [v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
        else:
            steps = [v2.ToImage(), v2.Resize(round(size * 256 / 224), antialias=True),
                     v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)]
        return v2.Compose([*steps, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if image_kind == "gray_small":
        if image_size is None:
            resize: Callable = ShrinkTo(GRAY_DEFAULT_MAX_SIZE)
        else:
            resize = v2.Resize((int(image_size), int(image_size)), antialias=True)
        steps = [*to_float, resize]
        if train:
            steps.append(v2.RandomAffine(degrees=8, translate=(0.1, 0.1), scale=(0.9, 1.1),
                                         fill=0))
        return v2.Compose([*steps, v2.Normalize(GRAY_MEAN, GRAY_STD)])
    raise ConfigError(f"unknown image_kind {image_kind!r}; choose 'rgb' or 'gray_small'")
