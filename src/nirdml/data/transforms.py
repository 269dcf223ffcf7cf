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

The gray images' random affine and normalisation are two small steps of ours
(:class:`RandomAffineNearest`, :class:`Normalize`) rather than torchvision's classes: the same
parameters drawn from the same random numbers (torchvision's own sampler) and the same output
(``tests/test_data.py`` checks them against ``v2.RandomAffine`` / ``v2.Normalize``), without
the per-call dispatch overhead that made torchvision's pair 0.25 ms of every 28 px image, a
third of a CPU training step of the small CNN.
"""

from __future__ import annotations

import math
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


class RandomAffineNearest:
    """torchvision's ``v2.RandomAffine(degrees, translate, scale, fill=0)`` (nearest, no shear)
    for ``C x H x W`` float tensors, with the sampling grid of each image size built once.

    The parameters come from ``v2.RandomAffine.make_params`` (same random numbers, same
    order); the inverse map ``output pixel -> input pixel`` about the image centre is
    ``R(angle)^-1 / scale`` after removing the translation, sampled by ``grid_sample`` with zero
    padding (the fill), as ``v2.functional.affine`` does.
    """

    def __init__(self, degrees: float, translate: tuple[float, float],
                 scale: tuple[float, float]):
        from torchvision.transforms import v2

        self.sampler = v2.RandomAffine(degrees=degrees, translate=translate, scale=scale, fill=0)
        self._grids: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    def _base(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        key = (height, width, dtype)
        if key not in self._grids:  # pixel centres relative to the image centre, homogeneous
            base = torch.empty(1, height, width, 3, dtype=dtype)
            base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width))
            base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5,
                                              height).unsqueeze_(-1))
            base[..., 2].fill_(1)
            self._grids[key] = base.view(1, height * width, 3)
        return self._grids[key]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        params = self.sampler.make_params([image])
        angle, (tx, ty), scale = params["angle"], params["translate"], params["scale"]
        rot = math.radians(angle)
        # inverse of: rotate by angle and scale about the centre, then translate by (tx, ty)
        m = [math.cos(rot) / scale, math.sin(rot) / scale, 0.0,
             -math.sin(rot) / scale, math.cos(rot) / scale, 0.0]
        m[2] += m[0] * -float(tx) + m[1] * -float(ty)
        m[5] += m[3] * -float(tx) + m[4] * -float(ty)
        theta = torch.tensor(m, dtype=image.dtype).reshape(1, 2, 3)
        theta = theta.transpose(1, 2).div_(torch.tensor([0.5 * width, 0.5 * height],
                                                         dtype=image.dtype))
        grid = self._base(height, width, image.dtype).bmm(theta).view(1, height, width, 2)
        out = torch.nn.functional.grid_sample(image.unsqueeze(0), grid, mode="nearest",
                                              padding_mode="zeros", align_corners=False)
        return out.squeeze(0)

    def __repr__(self) -> str:
        s = self.sampler
        return (f"RandomAffineNearest(degrees={list(s.degrees)}, translate={s.translate}, "
                f"scale={s.scale})")


class Normalize:
    """``(image - mean) / std`` per channel, as ``v2.Normalize`` computes it, for float
    ``C x H x W`` tensors (without torchvision's per-call dispatch)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        if not all(std):
            raise ConfigError(f"Normalize: std must be non-zero, got {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.sub(self.mean.to(image.dtype)).div_(self.std.to(image.dtype))

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def draft_size(transform: Callable | None) -> int | None:
    """The smallest shorter side an evaluation ``transform`` needs of its source image, if it
    says (:class:`DraftCompose`)."""
    return getattr(transform, "draft_size", None)


def decode_planner(transform: Callable | None) -> Callable | None:
    """``transform.prepare`` if it has one: ``prepare(image, mode)`` is called by the image
    readers on the opened, not yet decoded PIL image, and may ask for a reduced-scale JPEG
    decode (``PIL.Image.draft``) that still gives the transform the pixels it needs."""
    return getattr(transform, "prepare", None)


#: how much larger than its resize target a drafted JPEG decode stays (shorter side)
DRAFT_MARGIN = 2


class DraftCompose:
    """``v2.Compose(steps)`` of the evaluation transform, with ``draft_size`` = its resize
    target times :data:`DRAFT_MARGIN`: :meth:`prepare` lets a JPEG decode at 1/2, 1/4 or 1/8
    scale as long as its shorter side stays >= ``draft_size``. Resizing that decode gives the
    image that resizing the full decode gives to within a stated tolerance
    (``tests/test_loader.py``: half a grey level on photographs; DCT scaling is a box filter
    the antialiased resize smooths over), for a fraction of the decoding cost of images several
    times the target (SOP's megapixel photographs)."""

    def __init__(self, steps: list, draft_size: int):
        from torchvision.transforms import v2

        self.compose, self.draft_size = v2.Compose(steps), int(draft_size)

    def prepare(self, image, mode: str) -> None:
        from nirdml.data.image_files import draft_jpeg

        draft_jpeg(image, mode, self.draft_size)

    def __call__(self, image):
        return self.compose(image)

    def __repr__(self) -> str:
        return f"DraftCompose(draft_size={self.draft_size}, {self.compose!r})"


CROP_KEY = "nirdml.crop"  # PIL ``info`` key of a crop planned before decoding
CROP_ATTR = "nirdml_crop"  # the same plan on a tensor decoded from that image's file


def carry_plan(image, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the full decode of ``image``'s file by another decoder) with the crop the
    transform planned on ``image``'s header, if any, so the transform uses that draw."""
    box = image.info.get(CROP_KEY)
    if box is not None:
        setattr(tensor, CROP_ATTR, box)
    return tensor


def _planned_crop(image):
    """The crop planned before decoding (taken off the image), or None."""
    if hasattr(image, "info"):
        return image.info.pop(CROP_KEY, None)
    box = getattr(image, CROP_ATTR, None)
    if box is not None:
        delattr(image, CROP_ATTR)
    return box


class DraftRandomResizedCrop:
    """The training transform ``RandomResizedCrop(size)`` + flip + float + normalise, with the
    crop drawn from the image *header* (:meth:`prepare`, before decoding), so that a JPEG can be
    decoded at the largest DCT scale (1/2, 1/4, 1/8) that keeps the crop's shorter side >=
    :data:`DRAFT_MARGIN` x ``size``; the crop box is then scaled to the reduced image. The crop
    is drawn exactly as torchvision draws it (``RandomResizedCrop.get_params`` on the full
    size, torch's RNG), so the augmentation's distribution is unchanged; an image handed over
    already decoded (no :meth:`prepare`) draws its crop the same way at call time."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        from torchvision.transforms import v2

        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.tail = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def _draw(self, width: int, height: int) -> tuple[int, int, int, int]:
        from torchvision.transforms import RandomResizedCrop

        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # no pixels allocated
        return RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))

    def prepare(self, image, mode: str) -> None:
        width, height = image.size
        top, left, h, w = self._draw(width, height)
        scale = 1
        while scale < 8 and min(h, w) >= 2 * scale * DRAFT_MARGIN * self.size:
            scale *= 2
        if scale > 1 and image.format == "JPEG":
            image.draft(mode, (-(-width // scale), -(-height // scale)))
        fx, fy = image.size[0] / width, image.size[1] / height
        image.info[CROP_KEY] = (top * fy, left * fx, h * fy, w * fx)

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        box = _planned_crop(image)
        x = F.pil_to_tensor(image) if hasattr(image, "info") else image
        if box is None:
            top, left, h, w = self._draw(x.shape[-1], x.shape[-2])
        else:  # the planned crop, on the (possibly reduced) decode
            top, left = int(round(box[0])), int(round(box[1]))
            h = max(1, min(int(round(box[2])), x.shape[-2] - top))
            w = max(1, min(int(round(box[3])), x.shape[-1] - left))
        x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        return self.tail(x)

    def __repr__(self) -> str:
        return (f"DraftRandomResizedCrop(size={self.size}, scale={self.scale}, "
                f"ratio={self.ratio}) + flip + normalise")


def build_transforms(image_kind: str, train: bool, image_size: int | None = None) -> Callable:
    """The train or eval transform of ``image_kind`` (``"rgb"`` or ``"gray_small"``)."""
    from torchvision.transforms import v2

    if image_size is not None and int(image_size) <= 0:
        raise ConfigError(f"image_size must be a positive integer, got {image_size}")
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if image_kind == "rgb":
        size = int(image_size or 224)
        if train:
            return DraftRandomResizedCrop(size)
        resize = round(size * 256 / 224)
        steps = [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return DraftCompose(steps, DRAFT_MARGIN * resize)
    if image_kind == "gray_small":
        if image_size is None:
            resize: Callable = ShrinkTo(GRAY_DEFAULT_MAX_SIZE)
        else:
            resize = v2.Resize((int(image_size), int(image_size)), antialias=True)
        steps = [*to_float, resize]
        if train:
            steps.append(RandomAffineNearest(degrees=8, translate=(0.1, 0.1), scale=(0.9, 1.1)))
        return v2.Compose([*steps, Normalize(GRAY_MEAN, GRAY_STD)])
    raise ConfigError(f"unknown image_kind {image_kind!r}; choose 'rgb' or 'gray_small'")
