"""Reading image files to embed them: decoding with clear errors, folder listing, a Dataset.

Query images and folder galleries (``nirdml search``, ``nirdml index build --gallery FOLDER``)
are read here; the :class:`~nirdml.data.preprocessing.ImagePrep` of a checkpoint's
preprocessing record turns each decoded image into a model input.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from nirdml.data.datasets.core import IMAGE_EXTENSIONS
from nirdml.data.preprocessing import ImagePrep
from nirdml.errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFileDataset", "collate_skipping_bad", "list_image_folder",
           "load_image"]


def load_image(path: str | os.PathLike, in_chans: int = 3):
    """Open and fully decode ``path`` as a PIL image in ``L`` (1 channel) or ``RGB`` mode.

    Raises InputError for a missing file or one that cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("L" if in_chans == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"cannot decode image {str(path)!r} ({type(exc).__name__}: {exc}); "
            f"use a readable {'/'.join(e[1:] for e in IMAGE_EXTENSIONS[:5])}... file"
        ) from None


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """Images under ``root`` (recursive, sorted): ``(paths, class_names, labels)``.

    The class of an image is the name of its parent folder; ``labels`` index ``class_names``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"gallery folder {str(root)!r} does not exist or is not a folder")
    paths = sorted(
        str(p) for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not paths:
        raise InputError(
            f"gallery folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"lay them out as {root}/<class name>/<image>"
        )
    parents = [Path(p).parent.name for p in paths]
    class_names = sorted(set(parents))
    index = {name: i for i, name in enumerate(class_names)}
    return paths, class_names, [index[name] for name in parents]


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
            image = load_image(self.paths[i], self.prep.in_chans)
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
