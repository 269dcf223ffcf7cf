"""Image files on disk: which names are images, the one pixel limit, the one class-folder scanner.

Every reader of a tree of class folders -- the ``folder`` dataset, the class-folder layouts of
``cub200`` and ``cars196``, and folder galleries (``nirdml index build --gallery FOLDER``,
``nirdml.retrieval.gallery``) -- calls :func:`scan_class_folders`, so all of them read
``ROOT/<class>/**/<image>`` by one rule:

* the class of an image is the FIRST folder level under the root: ``ROOT/cat/2019/a.png`` is a
  ``cat``, so sub-folders with the same names under two classes never merge them;
* every image file at any depth below a class folder belongs to that class;
* names starting with ``.`` (hidden files and folders: ``.DS_Store``, ``.ipynb_checkpoints``)
  are skipped at every level; a symlinked folder below a class folder is not followed (no loop);
* an image file directly in the root belongs to no class and is an error (move it into a class
  folder), never labelled with the root's name nor dropped in silence; other files are ignored;
* classes sort by name, the images of a class by their path.

:data:`MAX_IMAGE_PIXELS` is the one pixel limit: before nirdml opens an image it sets
``PIL.Image.MAX_IMAGE_PIXELS`` to it (:func:`apply_pixel_limit`), and an image whose header
claims more pixels is refused before anything is decoded (:func:`exceeds_pixel_limit`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from nirdml.errors import DatasetError, NirdmlError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")

#: The most pixels an image may have: PIL's own default, 2**30 / 12 (a 1 GiB buffer at 12 bytes
#: per pixel, e.g. three float32 channels): about 9,459 x 9,459, ten times a 9-megapixel photo
#: and far above any model input (at most a few hundred pixels a side), while a decompression
#: bomb (a few KB that decode into GBs) is refused from its header.
MAX_IMAGE_PIXELS = 89_478_485


# ---- the pixel limit -----------------------------------------------------------------------
def apply_pixel_limit() -> None:
    """Set PIL's decompression-bomb limit to :data:`MAX_IMAGE_PIXELS` (other code may have
    changed or lifted it): PIL then refuses images of more than twice as many pixels itself."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def exceeds_pixel_limit(size: tuple[int, int]) -> bool:
    """Whether an image of ``size`` (width, height; from its header) has too many pixels."""
    return int(size[0]) * int(size[1]) > MAX_IMAGE_PIXELS


def too_large(size: tuple[int, int] | None = None) -> str:
    """The one-line reason an image over the pixel limit is refused (``size`` when known)."""
    shown = f"{size[0]} x {size[1]} pixels, " if size is not None else ""
    return (f"too large ({shown}more than the limit of {MAX_IMAGE_PIXELS:,} pixels: a "
            f"decompression bomb, or far larger than any model input)")


# ---- names ---------------------------------------------------------------------------------
def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    """A visible file name with an image extension (case-insensitive)."""
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def listing(folder: Path, limit: int = 8) -> str:
    """A short description of what ``folder`` holds, for error messages."""
    if not folder.is_dir():
        return "nothing (not a folder)" if folder.exists() else "nothing (does not exist)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- walking -------------------------------------------------------------------------------
def class_folders(folder: str | os.PathLike) -> list[Path]:
    """The visible sub-folders of ``folder`` (a symlink to a folder counts), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not is_hidden(p.name))


def images_below(folder: str | os.PathLike, what: str = "dataset",
                 error: type[NirdmlError] = DatasetError) -> list[str]:
    """Every visible image file at any depth below ``folder``, sorted; hidden names are skipped
    at every level and symlinked sub-folders are not followed. ``error`` (with ``what`` in its
    message) when a folder cannot be read."""
    found: list[str] = []
    pending = [os.fspath(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if is_hidden(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif is_image_name(entry.name) and entry.is_file():
                        found.append(entry.path)
        except OSError as exc:
            raise error(f"{what}: cannot read folder {current} ({exc.strerror or exc}); make "
                        f"it readable or remove it") from None
    return sorted(found)


def scan_class_folders(root: str | os.PathLike, what: str = "folder",
                       error: type[NirdmlError] = DatasetError
                       ) -> tuple[list[str], list[str], list[int]]:
    """``(paths, class_names, labels)`` of the class-folder tree ``root`` by the rule in the
    module docstring; ``labels[i]`` indexes ``class_names`` (sorted) for ``paths[i]``.

    Raises ``error`` (its messages start with ``what``) when ``root`` is not a folder, holds
    image files outside any class folder, or no image in a class folder. A class folder without
    images is not a class."""
    root_text = os.fspath(root)
    base = Path(root_text)
    if not base.is_dir():
        raise error(f"{what}: {root_text} does not exist or is not a folder; expected class "
                    f"folders there ({root_text}/<class>/<image files>)")
    try:
        with os.scandir(root_text) as scanned:
            entries = sorted(scanned, key=lambda e: e.name)
        loose = [e.name for e in entries if is_image_name(e.name) and e.is_file()]
    except OSError as exc:
        raise error(f"{what}: cannot read {root_text} ({exc.strerror or exc}); make it "
                    f"readable") from None
    if loose:
        shown = ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else "")
        raise error(f"{what}: {len(loose)} image file(s) lie directly in {root_text} ({shown}), "
                    f"outside any class folder; the class is the first folder level: move them "
                    f"into {root_text}/<class>/<image files>")
    paths: list[str] = []
    class_names: list[str] = []
    labels: list[int] = []
    for entry in entries:
        if is_hidden(entry.name) or not entry.is_dir():
            continue
        found = images_below(entry.path, what, error)
        if found:
            labels.extend([len(class_names)] * len(found))
            class_names.append(entry.name)
            paths.extend(found)
    if not paths:
        raise error(f"{what}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in class folders; "
                    f"expected '<class>/<image files>' under {root_text}; found: "
                    f"{listing(base)}")
    return paths, class_names, labels


__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "apply_pixel_limit", "class_folders",
           "decode_jpeg_tensor", "exceeds_pixel_limit", "images_below", "is_image_name", "listing",
           "scan_class_folders", "too_large"]


@functools.cache
def _torchcodec_decode_jpeg():
    """TorchCodec's ``decode_jpeg``, or None where it is not installed or does not load (its
    wheels are built against particular torch versions); looked up once."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # noqa: BLE001 - ImportError, or a library that fails to load
        return None
    return decode_jpeg


def decode_jpeg_tensor(path: str):
    """A JPEG decoded whole, straight into a ``3 x H x W`` uint8 tensor, by TorchCodec (the
    ``nirdml[jpeg]`` extra; torchvision's own decoders are deprecated since 0.29): the same
    libjpeg-turbo with the same defaults as PIL, so the pixels are PIL's, bit for bit
    (``tests/test_loader.py``), at 1.3x PIL's rate on CUB-sized photographs, and no PIL image
    to convert. None where TorchCodec is absent or declines the file (truncated, corrupt): the
    caller then decodes with PIL, which names what is wrong."""
    decode = _torchcodec_decode_jpeg()
    if decode is None:
        return None
    try:
        return decode(path, mode="RGB")
    except Exception:  # noqa: BLE001 - its decoder raises RuntimeError for bad data
        return None


def draft_jpeg(image, mode: str, shorter_side: int | None) -> None:
    """Before decoding: ask PIL to decode a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8)
    that keeps both sides >= ``shorter_side`` (``PIL.Image.draft``), when that is at least
    half the image; nothing for other formats, smaller images or ``None``. The caller's
    transform must resize to at most ``shorter_side / 2`` afterwards (``DraftCompose``)."""
    if shorter_side and image.format == "JPEG" and min(image.size) >= 2 * int(shorter_side):
        image.draft(mode, (int(shorter_side), int(shorter_side)))
