"""Omniglot: 964 background classes train, 659 evaluation classes test (class-disjoint).

Each part (``images_background`` / ``images_evaluation``) is read from the first of, under
``root``:

1. ``<part>.npz`` -- arrays ``images`` (bool, classes x 20 x 105 x 105, True = background) and
   ``labels``; kept in memory as stored, converted per image to uint8 with ink = 255;
2. ``<part>/<Alphabet>/characterNN/*.png`` -- the official folder layout (PNG, inverted on
   reading so that ink = 255, as for the npz);
3. ``<part>.zip`` -- the official zip, extracted once into ``root`` (atomically: to a temporary
   folder in ``root``, then renamed to ``root/<part>/``), after which 2. applies;
4. with ``download=True``: the official zip, downloaded into ``root`` and extracted.

Either way the images reach the transform with bright ink on a dark background (the default
transform gives ink = 1.0, background = 0.0), which is what ``gray_small`` augmentation assumes
(it fills with 0). ``class_names`` are the official character ids 1-1623 for the npz pair (npz
label + 1 for the background part, + 965 for the evaluation part, as the npz labels count from 0
within each file), or ``"Alphabet/characterNN"`` for the folder layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from nirdml.data.base import ArrayDataset, FileDataset, LabeledDataset, Splits
from nirdml.data.datasets.core import (
    DATASETS,
    OFFICIAL_PAGES,
    class_folders,
    default_root,
    images_in,
    listing,
)
from nirdml.data.download import download_file
from nirdml.errors import DatasetError

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# sha256 of the official zips. None means "not known to this project yet": a download is then
# only checked to be non-empty and its computed sha256 is printed, so that it can be pinned here.
# The small1 value comes from the project's offline copy (shared/data/omniglot/README.md).
OMNIGLOT_SHA256: dict[str, str | None] = {
    "images_background.zip": None,
    "images_evaluation.zip": None,
    "images_background_small1.zip":
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
}


def ink_bright(image: np.ndarray) -> np.ndarray:
    """npz drawing (bool, True = background) -> uint8 with ink 255 and background 0."""
    return np.where(image, np.uint8(0), np.uint8(255))


@DATASETS.register("omniglot")
def omniglot(root: Path | None = None, seed: int = 0, on_error: str = "skip",
             download: bool = False, background: str = "images_background",
             evaluation: str = "images_evaluation", base_url: str = OMNIGLOT_URL,
             cache_size: int | None = None) -> Splits:
    """Omniglot splits (``image_kind="gray_small"``). ``root`` defaults to
    ``$NIRDML_DATA/omniglot`` or ``~/.cache/nirdml/omniglot``. ``download=True`` fetches the
    official zips from ``base_url`` (sha256-checked where :data:`OMNIGLOT_SHA256` knows the
    value, else size > 0 and the sha256 printed). ``background``/``evaluation`` name the parts
    (e.g. ``images_background_small1``). ``cache_size=S`` resizes the npz drawings once, at
    load time, to ``S x S`` (area averaging, kept as uint8 in memory), so that training does not
    pay a per-image resize of the 105 x 105 originals every epoch."""
    path = default_root("omniglot") if root is None else root
    if download:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise DatasetError(
            f"omniglot: dataset root {path} does not exist; pass download=True (CLI: --set "
            f"data.options.download=true) to fetch the official zips, or get "
            f"{background}.zip and {evaluation}.zip from {OFFICIAL_PAGES['omniglot']} "
            f"(python/ folder) into {path}")
    train = _load_part(path, background, "train", download, base_url, on_error, cache_size)
    test = _load_part(path, evaluation, "test", download, base_url, on_error, cache_size)
    return Splits(train=train, val=None, test=test, image_kind="gray_small", name="omniglot",
                  root=path, invert_files=True)


def _load_part(root: Path, part: str, split: str, download: bool, base_url: str,
               on_error: str, cache_size: int | None = None) -> LabeledDataset:
    name = f"omniglot/{split}"
    npz, folder, archive = root / f"{part}.npz", root / part, root / f"{part}.zip"
    if npz.is_file():
        return _from_npz(npz, name, on_error, first_id=1 if split == "train" else 965,
                         cache_size=cache_size)
    if not folder.is_dir():
        if not archive.is_file():
            if not download:
                raise DatasetError(
                    f"omniglot: expected '{part}.npz', '{part}/<Alphabet>/characterNN/' or "
                    f"'{part}.zip' under {root}; found: {listing(root)}. Pass download=True "
                    f"(CLI: --set data.options.download=true) to fetch the official zips")
            download_file(f"{base_url.rstrip('/')}/{archive.name}", archive,
                          OMNIGLOT_SHA256.get(archive.name))
        _extract(archive, root, part)
    return _from_folder(folder, name, on_error)


def _from_npz(path: Path, name: str, on_error: str, first_id: int,
              cache_size: int | None = None) -> ArrayDataset:
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"omniglot: cannot read {path} ({exc}); expected an npz with "
                           f"'images' (bool, classes x 20 x H x W) and 'labels'") from None
    if images.dtype != bool or images.ndim != 4 or labels.shape != images.shape[:2]:
        raise DatasetError(
            f"omniglot: {path} holds images {images.dtype} {images.shape} and labels "
            f"{labels.shape}; expected bool images (classes x drawings x H x W, True = "
            f"background) and int labels (classes x drawings)")
    flat = images.reshape(-1, *images.shape[2:])
    ids = (labels.reshape(-1).astype(np.int64) + first_id).tolist()
    if cache_size:
        return ArrayDataset(_resize_all(flat, int(cache_size)), ids, on_error=on_error, name=name)
    return ArrayDataset(flat, ids, convert=ink_bright, on_error=on_error, name=name)


def _resize_all(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Bool drawings (True = background) -> uint8 ``N x size x size`` with bright ink."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(images), size, size), np.uint8)
    for lo in range(0, len(images), chunk):
        ink = torch.from_numpy(~images[lo:lo + chunk]).float()[:, None]
        small = F.interpolate(ink, size=(size, size), mode="area")[:, 0]
        out[lo:lo + chunk] = (small * 255).round().to(torch.uint8).numpy()
    return out


def _from_folder(folder: Path, name: str, on_error: str) -> FileDataset:
    paths: list[str] = []
    keys: list[str] = []
    for alphabet in class_folders(folder):
        for character in class_folders(alphabet):
            for p in images_in(character):
                paths.append(str(p))
                keys.append(f"{alphabet.name}/{character.name}")
    if not paths:
        raise DatasetError(f"omniglot: expected '<Alphabet>/characterNN/*.png' under {folder}; "
                           f"found: {listing(folder)}")
    return FileDataset(paths, keys, mode="L", invert=True, on_error=on_error, name=name)


def _extract(archive: Path, root: Path, part: str) -> None:
    """Extract ``archive`` (entries ``<part>/...``) to ``root/<part>`` atomically."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
            stray = [n for n in members if not n.startswith(f"{part}/")]
            if not members or stray:
                raise DatasetError(
                    f"omniglot: {archive} should hold '{part}/<Alphabet>/characterNN/*.png'; "
                    f"found entries like {(stray or ['nothing'])[:3]}")
            tmp = Path(tempfile.mkdtemp(prefix=f".{part}-extracting-", dir=root))
            try:
                zf.extractall(tmp, members=members)  # extractall strips '..' and drive parts
                try:
                    os.replace(tmp / part, root / part)
                except OSError:
                    if not (root / part).is_dir():  # not a concurrent extraction: a real error
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except DatasetError:
        raise
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"omniglot: {archive} is not a valid zip ({exc}); delete it and "
                           f"download it again") from None
    except OSError as exc:
        raise DatasetError(f"omniglot: cannot extract {archive} into {root} ({exc}); extract it "
                           f"by hand there or use a writable root") from None
