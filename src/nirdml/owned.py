"""Folders nirdml owns: it writes into, reuses or clears only folders that carry its marker.

A run folder, a cross-validation, a tune study, an index or an analysis is a folder that nirdml
created; it carries a small marker file, ``.nirdml`` (JSON: which kind of output, the nirdml
version that made it). Before writing, a command calls :func:`check_folder` (no writes: may
``kind`` go there?) and then :func:`claim_folder` (create it and write the marker). The rule:

* a path that does not exist, or an empty folder, may become ours;
* a folder with our marker of the same kind is ours (to reuse, resume or extend);
* anything else -- a file, a non-empty folder without the marker, a folder of another kind --
  is refused with a one-line :class:`~nirdml.errors.ConfigError` naming it. nirdml never
  deletes or overwrites what it did not create.

:func:`remove_owned` removes only the files a caller names inside a folder of ours (and the
folder, when that leaves it empty), never a whole tree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from nirdml.errors import ConfigError

MARKER = ".nirdml"


def marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind recorded in ``folder``'s marker, or None when it has no (readable) marker."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _writable_ancestor(path: Path, option: str) -> None:
    """ConfigError unless the nearest existing ancestor of ``path`` is a writable folder."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: {str(probe)!r} is a file, not a folder; "
                          f"choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r} cannot be written ({str(probe)!r} is not "
                          f"writable); choose a writable location")


def check_folder(folder: str | os.PathLike, kind: str, option: str = "--out",
                 legacy: bool = False) -> bool:
    """Whether ``folder`` already holds nirdml output of ``kind`` (True) or may become such a
    folder (False: missing or empty). ConfigError for anything else; writes nothing.

    ``legacy=True`` accepts a non-empty folder without a marker too (the caller has recognised
    it as output of an older nirdml by its own files) and returns True."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {str(folder)!r} is a file, not a folder; choose another "
                          f"path")
    if not folder.exists():
        _writable_ancestor(folder, option)
        return False
    found = marker_kind(folder)
    if found == kind:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {str(folder)!r} is not writable; choose a writable "
                              f"location")
        return True
    if found is not None:
        raise ConfigError(f"{option} {str(folder)!r} holds nirdml {found} output, not a "
                          f"{kind}; choose another path")
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError as exc:
        raise ConfigError(f"{option} {str(folder)!r} cannot be read ({exc.strerror or exc}); "
                          f"choose another path") from None
    if not entries:
        _writable_ancestor(folder, option)
        return False
    if legacy:
        return True
    shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    raise ConfigError(f"{option} {str(folder)!r} is not empty ({shown}) and was not written by "
                      f"nirdml; nirdml does not write into it: choose a new or empty folder")


def claim_folder(folder: str | os.PathLike, kind: str, option: str = "--out",
                 legacy: bool = False) -> bool:
    """:func:`check_folder`, then create ``folder`` and its marker; returns True when the
    folder was ours already (False: created or taken over empty just now)."""
    from nirdml import __version__
    from nirdml.files import atomic_write_text

    folder = Path(folder)
    ours = check_folder(folder, kind, option, legacy)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if marker_kind(folder) != kind:
            atomic_write_text(folder / MARKER,
                              json.dumps({"kind": kind, "nirdml": __version__}) + "\n")
    except OSError as exc:
        raise ConfigError(f"{option} {str(folder)!r} cannot be written "
                          f"({exc.strerror or exc}); choose a writable location") from None
    return ours


def remove_owned(folder: str | os.PathLike, names: Iterable[str],
                 remove_folder: bool = True, keep_marker: bool = False) -> bool:
    """Remove the files ``names`` from ``folder``, and the sub-folders among ``names`` when
    they are empty after that (name a folder after its files), then the marker (unless
    ``keep_marker``); with ``remove_folder``, remove ``folder`` itself when nothing else is
    left (pass False for a folder the user made). Returns whether the folder went.

    Only paths named here are touched: a file or folder a user put into the folder stays, and
    so does the folder around it."""
    folder = Path(folder)
    for name in [*names, *([] if keep_marker else [MARKER])]:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            try:
                path.rmdir()  # only when empty
            except OSError:
                pass
    if not remove_folder:
        return False
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
