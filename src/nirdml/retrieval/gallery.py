"""Galleries to index: ``split:NAME`` of a run's dataset, a folder of images, or an ``.npz``.

:func:`embed_gallery` turns a gallery spec into a :class:`Gallery` (unit-norm embeddings,
labels, optional paths and class names, and a ``source`` record for the index's meta) with a
:class:`~nirdml.inference.TrainedRun`: a split is embedded with the evaluation transform, a folder's
images with the run's query preprocessing (undecodable files skipped and recorded, or fatal),
and an ``.npz`` is read as it is. File paths of split and folder galleries are absolute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.data.image_files import scan_class_folders
from nirdml.embeddings import Embeddings, l2_normalize
from nirdml.errors import ConfigError, InputError
from nirdml.inference import SPLITS


@dataclass
class Gallery:
    """Embedded gallery: unit-norm ``embeddings`` ``(N, D)``, int ``labels``, optional paths."""

    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str] | None = None
    class_names: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)


def parse_gallery(spec: str | os.PathLike) -> tuple[str, str]:
    """``split:NAME`` -> ("split", NAME); a folder -> ("folder", path); ``*.npz`` -> ("npz", ..)."""
    text = os.fspath(spec)
    if text.startswith("split:"):
        name = text.split(":", 1)[1]
        if name not in SPLITS:
            raise ConfigError(f"gallery {text!r}: split must be one of {', '.join(SPLITS)}")
        return "split", name
    if text.lower().endswith(".npz"):
        if not Path(text).is_file():
            raise InputError(f"gallery embeddings file {text!r} does not exist")
        return "npz", text
    if Path(text).is_dir():
        return "folder", text
    raise ConfigError(f"gallery {text!r} is neither split:train|val|test, an existing folder of "
                      f"images, nor an embeddings .npz file")


def read_embeddings_npz(path: str | os.PathLike, dim: int | None = None) -> Gallery:
    """A gallery from an ``.npz`` (:meth:`nirdml.embeddings.Embeddings.load`: ``embeddings``,
    ``labels``, optional ``paths``), L2-normalised; ``dim`` must match the model's."""
    emb = Embeddings.load(path, dim)
    return Gallery(l2_normalize(emb.embeddings), emb.labels.astype(np.int64), emb.paths, None,
                   {"kind": "npz", "value": str(Path(path).resolve())})


def embed_gallery(run, spec: str | os.PathLike, on_error: str = "skip",
                  batch_size: int | None = None, num_workers: int | None = None) -> Gallery:
    """Embed ``split:NAME`` of ``run``'s dataset or a folder of images with ``run`` (a
    :class:`~nirdml.inference.TrainedRun`), or read an npz of its embeddings."""
    kind, value = parse_gallery(spec)
    if kind == "npz":
        return read_embeddings_npz(value, run.model.embedding_dim)
    if kind == "folder":
        return embed_folder(run, value, on_error, batch_size, num_workers)
    return embed_split(run, value, batch_size, num_workers)


def embed_split(run, split: str, batch_size: int | None = None,
                num_workers: int | None = None) -> Gallery:
    """Split ``split`` of the run's dataset (only its gallery part for query/gallery datasets
    such as In-Shop), embedded in float32 like the queries."""
    dataset = run.split(split)
    emb = run.embed(dataset, batch_size=batch_size, num_workers=num_workers, amp="none")
    rows = np.arange(len(dataset))
    if emb.is_gallery is not None:  # In-Shop style: index the gallery part only
        rows = np.flatnonzero(np.asarray(emb.is_gallery, dtype=bool))
    paths = getattr(dataset, "paths", None)
    names = getattr(dataset, "class_names", None)
    source: dict[str, Any] = {"kind": "split", "value": split, "dataset": run.config.data.name}
    listed = None if paths is None else [os.path.abspath(paths[i]) for i in rows]
    if listed:  # the folder its images lie in, recorded now: thumbnails are served from it only
        source["root"] = str(Path(os.path.commonpath(listed)).resolve())
    return Gallery(emb.embeddings[rows], np.asarray(emb.labels)[rows], listed,
                   None if names is None else [str(c) for c in names], source)


def embed_folder(run, folder: str, on_error: str = "skip", batch_size: int | None = None,
                 num_workers: int | None = None) -> Gallery:
    """The images under ``folder`` (``folder/<class>/**/<image>``: the class is the first folder
    level, see :mod:`nirdml.data.image_files`), prepared like query images
    (``run.query_preprocessing``); undecodable ones are skipped and listed in
    ``source["skipped"]``, or with ``on_error="fail"`` raise InputError. Paths are absolute, so
    an index finds them from any working directory."""
    paths, class_names, labels = scan_class_folders(os.path.abspath(folder), what="gallery",
                                                    error=InputError)
    emb, kept, bad = run.embed_files(paths, skip_bad=on_error != "fail", batch_size=batch_size,
                                     num_workers=num_workers)
    if not kept:
        raise InputError(f"none of the {len(paths)} images in {folder!r} could be decoded")
    source: dict[str, Any] = {"kind": "folder", "value": str(Path(folder).resolve())}
    if bad:
        source["skipped"] = [paths[i] for i in bad]
    return Gallery(emb, np.asarray(labels, np.int64)[kept], [paths[i] for i in kept],
                   class_names, source)


__all__ = ["Gallery", "embed_gallery", "parse_gallery", "read_embeddings_npz"]
