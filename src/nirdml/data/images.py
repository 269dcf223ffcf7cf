"""Reading image files to embed them: decoding with clear errors, and a Dataset of files.

Query images and the images of folder galleries (``nirdml search``, ``nirdml index build
--gallery FOLDER``) are read here, under :mod:`nirdml.data.image_files`' pixel limit (a folder
gallery is listed by that module's one class-folder scanner, ``scan_class_folders``); the
:class:`~nirdml.data.preprocessing.ImagePrep` of a checkpoint's preprocessing record turns each
decoded image into a model input.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from nirdml.data.image_files import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    apply_pixel_limit,
    exceeds_pixel_limit,
    too_large,
)
from nirdml.data.preprocessing import ImagePrep
from nirdml.data.transforms import decode_planner
from nirdml.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFileDataset", "collate_skipping_bad", "decode_image",
           "load_image"]


def _decode(source, in_chans: int, limit: int, too_big, undecodable, prepare=None):
    """Open ``source`` (a path or a file object) with PIL and fully decode it in ``L`` or
    ``RGB`` mode under ``limit`` pixels, checked from the header before decoding; the
    InputError messages come from ``too_big(size or None)`` and ``undecodable(exc)``;
    ``prepare(image, mode)`` sees the image before decoding (``transforms.decode_planner``)."""
    from PIL import Image

    apply_pixel_limit()
    try:
        with warnings.catch_warnings():
            # PIL warns between the limit and twice the limit; the size check below refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if exceeds_pixel_limit(img.size) or img.size[0] * img.size[1] > limit:
                    raise InputError(too_big(img.size))
                if prepare is not None:
                    prepare(img, "L" if in_chans == 1 else "RGB")
                img.load()
                return img.convert("L" if in_chans == 1 else "RGB")
    except Image.DecompressionBombError:
        raise InputError(too_big(None)) from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types for bad bytes
        raise InputError(undecodable(exc)) from None


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'}"


def decode_image(data: bytes, in_chans: int = 3, max_pixels: int | None = None,
                 name: str = "the upload"):
    """Fully decode image bytes (an upload) as :func:`load_image` decodes a file, in ``L`` or
    ``RGB`` mode; ``max_pixels`` lowers the pixel limit. InputError for no bytes, bytes that
    are not an image, and an image over the limit (refused from its header, before decoding)."""
    import io

    if not data:
        raise InputError(f"{name} is empty (0 bytes); send the image file's bytes")
    limit = MAX_IMAGE_PIXELS if max_pixels is None else min(int(max_pixels), MAX_IMAGE_PIXELS)

    def too_big(size):
        if size is None:
            return f"{name} is {too_large()}; send a smaller image"
        return (f"{name} is too large ({size[0]} x {size[1]} pixels, the limit is "
                f"{limit:,}); send a smaller image")

    return _decode(io.BytesIO(data), in_chans, limit, too_big,
                   lambda exc: f"{name} is not a decodable image ({_first_line(exc)}); send a "
                               f"PNG, JPEG, BMP, GIF or WebP file")


def load_image(path: str | os.PathLike, in_chans: int = 3, prepare=None):
    """Open and fully decode ``path`` as a PIL image in ``L`` (1 channel) or ``RGB`` mode
    (``prepare``: the caller's transform's decode planner, ``transforms.decode_planner``; a
    large JPEG may then decode at a reduced DCT scale, as the dataset readers do).

    Raises InputError for a missing file, one that cannot be decoded, or one whose header claims
    more than :data:`~nirdml.data.image_files.MAX_IMAGE_PIXELS` pixels (refused before decoding).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist or is not a file")
    shown = repr(str(path))
    return _decode(path, in_chans, MAX_IMAGE_PIXELS,
                   lambda size: f"image {shown} is {too_large(size)}; use a smaller image",
                   lambda exc: f"cannot decode image {shown} ({_first_line(exc)}); use a "
                               f"readable {'/'.join(e[1:] for e in IMAGE_EXTENSIONS[:5])}... "
                               f"file", prepare)


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files -> ``(tensor or None, index)``; ``None`` marks an undecodable file.

    ``skip_bad=False`` raises InputError on the first bad file instead.
    """

    def __init__(self, paths: Sequence[str], prep: ImagePrep, skip_bad: bool = True):
        self.paths = list(paths)
        self.prep = prep
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], self.prep.in_chans, decode_planner(self.prep))
        except InputError:
            if not self.skip_bad:
                raise
            return None, i
        return self.prep(image), i


def collate_skipping_bad(batch):
    """Stack the decodable samples of a batch; return ``(images or None, kept, bad)`` indices."""
    kept = [i for x, i in batch if x is not None]
    bad = [i for x, i in batch if x is None]
    images = torch.stack([x for x, _ in batch if x is not None]) if kept else None
    return images, kept, bad
