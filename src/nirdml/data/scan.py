"""Find unreadable image files before any work is done, and drop them from the splits.

A missing, empty, corrupt or truncated file would otherwise surface in the middle of training,
or -- worse -- be replaced by another image of its class, which puts exact duplicates into an
evaluation split and inflates its metrics. :func:`scan_splits` checks every file of every split
up front, in parallel: PIL opens it (header) and verifies it (PNG: every chunk's CRC up to
IEND; other formats their structure), and a JPEG must end with its end-of-image marker, which
a truncated download lacks; an image over the pixel limit of :mod:`nirdml.data.image_files` is
refused from its header (a decompression bomb is never decoded). Results are cached by the
list of (path, size, mtime), so a second run over unchanged files costs only a ``stat`` per
file.

``on_error="fail"`` raises :class:`DatasetError` naming the files; ``"skip"`` removes them from
their split (never substitutes them) and reports how many went from each split.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from nirdml.data import image_files
from nirdml.data.base import LabeledDataset, Splits
from nirdml.data.image_files import apply_pixel_limit, exceeds_pixel_limit, too_large
from nirdml.errors import DatasetError
from nirdml.files import atomic_write_text

_JPEG_END = b"\xff\xd9"


def check_image(path: str) -> str | None:
    """``None`` if ``path`` is a readable image, else the reason it is not (one line).

    An image whose header claims more than :data:`~nirdml.data.image_files.MAX_IMAGE_PIXELS`
    pixels is unreadable (``"too large (...)"``): nothing of it is decoded."""
    apply_pixel_limit()
    try:
        with Image.open(path) as image:
            if exceeds_pixel_limit(image.size):
                return too_large(image.size)
            fmt = image.format
            image.verify()
        if fmt == "JPEG":
            with open(path, "rb") as fh:
                fh.seek(-2, os.SEEK_END)
                tail = fh.read(2)
            if tail != _JPEG_END:
                return "truncated JPEG (no end-of-image marker)"
    except FileNotFoundError:
        return "file not found"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return too_large()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        return (f"{type(exc).__name__}: {exc}".splitlines() or ["unreadable"])[0][:200]
    return None


def _cache_file(paths: list[str]) -> tuple[Path, list[tuple[str, int, int]]]:
    from nirdml.data.features import default_cache_dir

    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((p, st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((p, -1, -1))
    # the pixel limit is part of the key: a result found under another limit is not reused
    key = hashlib.sha256(json.dumps([image_files.MAX_IMAGE_PIXELS, stats]).encode()).hexdigest()
    return default_cache_dir().parent / "scans" / f"{key}.json", stats


def find_unreadable(paths: list[str], workers: int | None = None,
                    cache: bool = True) -> dict[str, str]:
    """``path -> reason`` for every unreadable file of ``paths`` (checked in parallel)."""
    if not paths:
        return {}
    cache_path, stats = _cache_file(paths) if cache else (None, [])
    if cache_path is not None and cache_path.is_file():
        try:
            return json.loads(cache_path.read_text())
        except (OSError, ValueError):
            pass
    missing = {p: "file not found" for p, size, _ in stats if size < 0}
    todo = [p for p in paths if p not in missing]
    # PIL warns about images between the pixel limit and twice it; check_image refuses them
    # itself. The filter is set here, in one thread, for the workers (catch_warnings is not
    # thread-safe).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers or min(16, (os.cpu_count() or 2) * 2)
                                ) as pool:
            reasons = list(pool.map(check_image, todo, chunksize=64))
    bad = {**missing, **{p: r for p, r in zip(todo, reasons) if r is not None}}
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(bad))
        except OSError:
            pass  # an unwritable cache only costs the next run another scan
    return bad


def scan_splits(splits: Splits, on_error: str = "skip", cache: bool = True
                ) -> tuple[Splits, dict[str, int]]:
    """Check every file of every split; returns the splits without unreadable files and
    ``{split: number dropped}`` (raises DatasetError with ``on_error="fail"``)."""
    dropped: dict[str, int] = {}
    bad_all: dict[str, str] = {}
    datasets: dict[str, LabeledDataset | None] = {}
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        datasets[name] = ds
        if ds is None or ds.paths is None:
            continue
        bad = find_unreadable(list(ds.paths), cache=cache)
        if not bad:
            continue
        bad_all.update(bad)
        if on_error == "fail":
            continue
        keep = np.array([p not in bad for p in ds.paths])
        if not keep.any():
            raise DatasetError(f"{ds.name}: every image is unreadable (first: "
                               f"{next(iter(bad))}: {next(iter(bad.values()))})")
        datasets[name] = ds.select(np.flatnonzero(keep))
        dropped[name] = int((~keep).sum())
    if bad_all and on_error == "fail":
        shown = "; ".join(f"{p}: {r}" for p, r in list(bad_all.items())[:5])
        more = f" (and {len(bad_all) - 5} more)" if len(bad_all) > 5 else ""
        raise DatasetError(
            f"{len(bad_all)} unreadable image file(s): {shown}{more}. Fix or remove them, or "
            f"set data.on_error=skip to leave them out")
    if not dropped:
        return splits, {}
    return Splits(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                  image_kind=splits.image_kind, name=splits.name, root=splits.root,
                  invert_files=splits.invert_files), dropped
