"""Fetch a file over http(s) or ``file://`` with an optional sha256 check; atomic on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from nirdml.errors import DatasetError

_CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, *,
                  timeout: float = 60.0, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    The bytes go to ``dest + ".part"`` first and are renamed onto ``dest`` only once complete
    and verified, so an interrupted download never leaves a truncated ``dest``. With
    ``sha256`` the file must match (mismatch: the file is deleted and
    :class:`~nirdml.errors.DatasetError` raised); without it the file must be non-empty and its
    computed sha256 is printed to stderr (so that it can be pinned). An existing ``dest`` that
    passes the same check is kept without downloading again.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and dest.stat().st_size > 0:
        if expected is None or sha256_of(dest) == expected:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"cannot download {url} to {dest}: {reason}; check the network, or download the "
            f"file by hand and place it at {dest}") from None
    size = part.stat().st_size
    if size == 0:
        part.unlink(missing_ok=True)
        raise DatasetError(f"downloaded an empty file from {url}; try again later")
    actual = sha256_of(part)
    if expected is not None and actual != expected:
        part.unlink(missing_ok=True)
        raise DatasetError(
            f"checksum mismatch for {url}: expected sha256 {expected}, got {actual} ({size} "
            f"bytes); the file was deleted. The download is corrupt or the file changed upstream")
    os.replace(part, dest)
    if expected is None and not quiet:
        print(f"downloaded {url} -> {dest} ({size} bytes, sha256 {actual}; no checksum pinned)",
              file=sys.stderr)
    return dest
