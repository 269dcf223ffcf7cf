"""``analyze``: structure diagnostics and figures for an embeddings file or a trained checkpoint.

Its output folder is nirdml's (``nirdml.owned``, kind ``"analysis"``): a new or empty folder,
one with the analysis marker, or one an older nirdml wrote (nothing in it but
``analysis.json`` and the known figures) -- anything else is refused before any work, and a
run that fails leaves no half-written folder it created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.analysis.diagnostics import structure_report
from nirdml.errors import InputError

#: figure file names written by :func:`analyze`
PLOT_FILES = {"spectrum": "spectrum.png", "distances": "distances.png", "tsne": "tsne.png",
              "flow_samples": "flow_samples.png"}
#: the ``nirdml.owned`` kind of an analysis folder
KIND = "analysis"
#: every file :func:`analyze` writes into its folder
OUTPUT_FILES = ("analysis.json", *PLOT_FILES.values())


def is_legacy_analysis(folder: str | Path) -> bool:
    """Whether ``folder`` is an analysis folder of a nirdml from before the marker: it has no
    marker, holds ``analysis.json`` and nothing but :data:`OUTPUT_FILES`."""
    from nirdml.owned import marker_kind

    folder = Path(folder)
    try:
        names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    except OSError:
        return False
    return (marker_kind(folder) is None and "analysis.json" in names
            and names <= set(OUTPUT_FILES))


def _undo_claim(out: Path, existed: bool) -> None:
    """After a failed run in a folder that was not ours: remove what it wrote (and the folder,
    when this run created it and nothing else is in it)."""
    from nirdml.owned import remove_owned

    remove_owned(out, OUTPUT_FILES, remove_folder=not existed)


def load_embeddings_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, labels)`` of an ``.npz`` written by ``nirdml embed``
    (:meth:`nirdml.embeddings.Embeddings.load`)."""
    from nirdml.embeddings import Embeddings

    emb = Embeddings.load(path)
    return emb.embeddings, emb.labels


def _flow_samples(run, batch_size: int | None, num_classes_shown: int,
                  max_real_per_class: int, seed: int) -> dict[str, Any] | None:
    """The run's flow and a few training classes embedded (evaluation transform), for the
    flow figure and the mechanism metrics; ``None`` when the run has no flow.

    Returns ``flow``, ``proxies``, ``proxies_per_class``, ``embeddings``, ``labels`` (training
    numbering: what the proxies are indexed by), ``classes``, ``criterion`` and ``flow_init``.
    """
    if not run.config.loss.nir.enabled:
        return None
    criterion = run.criterion
    flow = getattr(criterion, "flow", None)
    if flow is None:
        return None
    base = getattr(criterion, "base_loss", criterion)
    train = run.split("train")
    labels = np.asarray(train.labels)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    classes = np.sort(rng.choice(present, size=min(num_classes_shown, present.size),
                                 replace=False))
    idx = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if members.size > max_real_per_class:
            members = np.sort(rng.choice(members, size=max_real_per_class, replace=False))
        idx.append(members)
    rows = np.concatenate(idx)
    emb = run.embed(train.select(rows), batch_size)
    return {"flow": flow, "proxies": base.proxies.detach().cpu(),
            "proxies_per_class": int(getattr(base, "proxies_per_class", 1)),
            "embeddings": emb.embeddings, "labels": labels[rows], "classes": classes,
            "criterion": criterion, "flow_init": run.flow_init}


def mechanism_metrics(flow_info: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The NIR mechanism metrics (``nirdml.nir.monitor``) of a checkpoint's flow on the
    embedded training-class samples: condition gain, flow class-id accuracy, between/within
    class cosines, and the flow's drift from its initial weights when the checkpoint kept them."""
    import torch

    from nirdml.nir.monitor import collapse_metrics, condition_metrics, flow_drift

    x = torch.as_tensor(np.asarray(flow_info["embeddings"]), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(flow_info["labels"]), dtype=torch.long)
    out = condition_metrics(flow_info["criterion"], x, y, seed=seed)
    out.update(collapse_metrics(x, y))
    if flow_info.get("flow_init") is not None:
        out.update({f"flow_{k}": v for k, v in flow_drift(flow_info["flow"],
                                                         flow_info["flow_init"]).items()})
    return out


def analyze(embeddings=None, labels=None, checkpoint=None, out_dir: str | Path = "analysis",
            split: str = "test", flow_classes: int = 4, plots: bool = True,
            device: str = "auto", batch_size: int | None = None, data_root: str | None = None,
            seed: int = 0, flow_samples_per_class: int = 200, tsne_classes: int = 10,
            ) -> dict[str, Any]:
    """Compute :func:`structure_report` and write ``OUT/analysis.json`` (+ figures).

    Input is either ``embeddings`` (an ``(N, D)`` array with ``labels``, or the path of an npz with
    keys ``embeddings`` and ``labels``) or ``checkpoint`` (its ``split`` is embedded with
    :class:`nirdml.inference.TrainedRun`). For a checkpoint trained with NIR
    and ``flow_classes > 0``, ``flow_classes`` random training classes are embedded too and the
    flow is sampled around their proxies: statistics (and :func:`mechanism_metrics`) go to
    ``analysis.json["flow_samples"]``,
    the figure to ``flow_samples.png``. Figures: ``spectrum.png``, ``distances.png``,
    ``tsne.png`` (skipped with ``plots=False``). Returns the dict written to the JSON file.

    ``out_dir`` is claimed before any work (module docstring: a folder nirdml did not write is
    a one-line ConfigError); degenerate embeddings (a single class, or collapsed) are an
    InputError, worded as ``evaluate``'s.
    """
    from nirdml.owned import claim_folder

    out = Path(out_dir)
    if (embeddings is None) == (checkpoint is None):
        raise InputError("give exactly one of embeddings (array or .npz) and checkpoint")
    existed = out.exists()
    was_ours = claim_folder(out, KIND, "--out", legacy=is_legacy_analysis(out))
    try:
        return _analyze_into(out, embeddings, labels, checkpoint, split, flow_classes, plots,
                             device, batch_size, data_root, seed, flow_samples_per_class,
                             tsne_classes)
    except BaseException:
        if not was_ours:
            _undo_claim(out, existed)
        raise


def _analyze_into(out: Path, embeddings, labels, checkpoint, split, flow_classes, plots, device,
                  batch_size, data_root, seed, flow_samples_per_class, tsne_classes
                  ) -> dict[str, Any]:
    """:func:`analyze`'s work, once ``out`` is claimed."""
    from nirdml.files import atomic_write_text

    run, x, y, source = _read_input(embeddings, labels, checkpoint, split, device, batch_size,
                                    data_root)
    report = structure_report(x, y, seed=seed)
    result: dict[str, Any] = {**report, "source": source, "plots": {}, "flow_samples": None}
    if plots:
        from nirdml.analysis import plots as pl

        result["plots"]["spectrum"] = str(pl.plot_spectrum(x, out / PLOT_FILES["spectrum"]))
        result["plots"]["distances"] = str(pl.plot_distance_histograms(
            x, y, out / PLOT_FILES["distances"], seed=seed))
        result["plots"]["tsne"] = str(pl.plot_tsne(
            x, y, out / PLOT_FILES["tsne"], num_classes=tsne_classes, seed=seed))
    if run is not None and flow_classes > 0:
        flow_info = _flow_samples(run, batch_size, flow_classes, max_real_per_class=200,
                                  seed=seed)
        if flow_info is not None:
            _flow_section(result, flow_info, out, plots, flow_samples_per_class, seed)
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=2) + "\n")
    return result


def _read_input(embeddings, labels, checkpoint, split, device, batch_size, data_root):
    """``(run or None, x, y, source)`` from exactly one of embeddings and checkpoint."""
    if (embeddings is None) == (checkpoint is None):
        raise InputError("give exactly one of embeddings (array or .npz) and checkpoint")
    if checkpoint is not None:
        from nirdml.inference import TrainedRun

        run = TrainedRun.open(checkpoint, device, data_root)
        emb = run.embed(split, batch_size)
        return run, emb.embeddings, emb.labels, {"checkpoint": str(checkpoint),
                                                 "split": split,
                                                 "dataset": run.config.data.name}
    if isinstance(embeddings, (str, Path)):
        if labels is not None:
            raise InputError("labels come from the npz file; do not pass them as well")
        x, y = load_embeddings_npz(embeddings)
        return None, x, y, {"embeddings": str(embeddings)}
    if labels is None:
        raise InputError("labels are required with an embeddings array")
    return None, embeddings, labels, {"embeddings": "array"}


def _flow_section(result: dict[str, Any], flow_info: dict[str, Any], out: Path, plots: bool,
                  samples_per_class: int, seed: int) -> None:
    """Flow samples around a few proxies: their statistics and the mechanism metrics into
    ``result["flow_samples"]``, the figure (with ``plots``) to ``flow_samples.png``."""
    from nirdml.analysis import plots as pl

    k = flow_info["proxies_per_class"]
    samples = pl.sample_flow_around_proxies(flow_info["flow"], flow_info["proxies"],
                                            flow_info["classes"], samples_per_class, k, seed)
    result["flow_samples"] = pl.flow_sample_stats(
        *samples, flow_info["embeddings"], flow_info["labels"], flow_info["proxies"], k)
    result["flow_samples"].update(mechanism_metrics(flow_info, seed))
    if plots:
        result["plots"]["flow_samples"] = str(pl.plot_flow_samples(
            flow_info["flow"], flow_info["proxies"], flow_info["embeddings"],
            flow_info["labels"], out / PLOT_FILES["flow_samples"],
            classes=flow_info["classes"], proxies_per_class=k, seed=seed, samples=samples))


def format_table(result: dict[str, Any]) -> str:
    """The four headline numbers as a small text table."""
    rows = [("rho", "lower"), ("pi_density", "higher"), ("sigma2_kappa", "higher"),
            ("g2", "lower")]
    lines = [f"{'metric':<14}{'value':>10}  better", "-" * 32]
    lines += [f"{k:<14}{result[k]:>10.4f}  {b}" for k, b in rows]
    if "rho_full" in result:
        lines.append(f"{'rho_full':<14}{result['rho_full']:>10.4f}  lower  (every direction "
                     f"past the first; rank {result.get('rank', '?')} of the embedding)")
    lines.append(f"({result['num_samples']} samples, {result['num_classes']} classes)")
    return "\n".join(lines)
