"""Output files: check up front that they can be written, and write them atomically.

Every command that writes a file checks its path before doing any work (a one-line
``ConfigError`` naming the path and the option, never a traceback after minutes of work), and
writes through :func:`atomic_write_bytes`: the bytes go to a temporary file in the same folder,
are flushed to disk, and replace the target in one ``os.replace``, so a reader never sees half
a file. An existing file is replaced only when it is nirdml's own output of the same kind
(:func:`check_output_file`), unless the user asks with ``--overwrite``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from nirdml.errors import ConfigError


def check_writable_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Raise ConfigError unless ``path`` can be created or replaced (its folder is created)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; give a file name")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.{os.getpid()}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{option} {str(path)!r} cannot be written ({exc.strerror or exc}); "
                          f"choose a writable location") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {str(path)!r} exists and is read-only; remove it or "
                          f"choose another path")
    return path


def check_output_file(path: str | os.PathLike, option: str,
                      is_ours: Callable[[Path], bool], overwrite: bool = False) -> Path:
    """:func:`check_writable_file`, and refuse to replace a file nirdml did not write.

    A missing ``path`` is fine. An existing file is replaced only when ``is_ours(path)``
    recognises it as nirdml's own output of that kind (it sniffs the file and must not raise:
    an exception counts as "not ours"), or when ``overwrite`` (the user's ``--overwrite``);
    otherwise a one-line ConfigError naming ``option``, the path and the way out."""
    path = check_writable_file(path, option)
    if overwrite or not (path.exists() or path.is_symlink()):
        return path
    try:
        ours = bool(is_ours(path))
    except Exception:  # a sniffer that cannot read the file: it is not recognisably ours
        ours = False
    if not ours:
        raise ConfigError(f"{option} {str(path)!r} exists and was not written by nirdml; pass "
                          f"--overwrite to replace it or choose another path")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))
