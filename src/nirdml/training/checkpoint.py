"""Atomic checkpoint files: write to a temporary file, fsync, rename; detect corruption on load.

``save_checkpoint`` never leaves a half-written file under the final name: the bytes go to
``NAME.tmp`` in the same folder, are flushed to disk, and replace ``NAME`` in one ``os.replace``.
The previous good file is kept as ``NAME.prev`` so that a file corrupted after the fact (a
truncated copy, a bad disk) still leaves something to resume from. ``load_checkpoint`` turns
any unreadable file into a :class:`CheckpointError` that says which file and what to do.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from nirdml.errors import CheckpointError

FORMAT_VERSION = 1
_MAGIC = b"NIRDMLCK"  # 8 bytes, then 32 bytes sha256 of the torch payload, then the payload


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically; the previous file (if any) becomes ``path.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(_MAGIC)
            fh.write(hashlib.sha256(payload).digest())
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write checkpoint {str(path)!r}{hint}: {exc.strerror or exc}; "
            f"the previous checkpoint is intact"
        ) from exc
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise CheckpointError if corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    if data[: len(_MAGIC)] != _MAGIC or len(data) < len(_MAGIC) + 32:
        raise CheckpointError(
            f"{str(path)!r} is not a nirdml checkpoint (or its header is truncated)"
            + _prev_hint(path)
        )
    digest, payload = data[len(_MAGIC) : len(_MAGIC) + 32], data[len(_MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated (checksum mismatch)"
            + _prev_hint(path)
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state.get('format_version')}, "
            f"this nirdml reads format {FORMAT_VERSION}"
        )
    return state


def _prev_hint(path: Path) -> str:
    prev = path.with_name(path.name + ".prev")
    return f"; the previous good checkpoint is {str(prev)!r}" if prev.exists() else ""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
