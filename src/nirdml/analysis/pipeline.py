"""``analyze``: structure diagnostics and figures for an embeddings file or a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.analysis.diagnostics import structure_report
from nirdml.errors import CheckpointError, InputError

#: figure file names written by :func:`analyze`
PLOT_FILES = {"spectrum": "spectrum.png", "distances": "distances.png", "tsne": "tsne.png",
              "flow_samples": "flow_samples.png"}


def load_embeddings_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, labels)`` from an npz written by ``nirdml embed`` (keys of those names)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embeddings file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"embeddings", "labels"} - set(data.files)
            if missing:
                raise InputError(f"{str(path)!r} lacks the array(s) {sorted(missing)}; expected "
                                 f"an npz with 'embeddings' (N, D) and 'labels' (N,)")
            return data["embeddings"], data["labels"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot read {str(path)!r} as an npz file: {exc}") from None


class _Subset:
    """Rows ``indices`` of a labelled dataset, keeping a ``labels`` array (for embed_dataset)."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(dataset.labels)[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]


def _flow_from_checkpoint(checkpoint, device: str, data_root: str | None,
                          batch_size: int | None, num_classes_shown: int,
                          max_real_per_class: int, seed: int):
    """Rebuild the checkpoint's criterion; if it has a flow, embed a few train classes.

    Returns ``None`` when the criterion has no flow, else a dict with ``flow``, ``proxies``,
    ``proxies_per_class``, ``embeddings``, ``labels`` (train split, chosen classes only) and
    ``classes``.
    """
    from nirdml.data import build_transforms
    from nirdml.training import builders
    from nirdml.training.inference import load_trained_model

    model, cfg, state = load_trained_model(checkpoint, device)
    if not cfg.loss.nir.enabled:
        return None
    if data_root is not None:
        cfg.data.root = data_root
    criterion = builders.build_criterion(cfg, int(state["num_classes"]))
    try:
        criterion.load_state_dict(state["criterion"])
    except RuntimeError as exc:
        raise CheckpointError(f"the criterion state of {str(checkpoint)!r} does not match its "
                              f"config ({exc})") from None
    criterion.eval()
    flow = getattr(criterion, "flow", None)
    if flow is None:
        return None
    base = getattr(criterion, "base_loss", criterion)
    proxies = base.proxies.detach().cpu()
    k = int(getattr(base, "proxies_per_class", 1))

    splits = builders.build_splits(cfg)
    train = splits.train
    train.transform = build_transforms(splits.image_kind, train=False,
                                       image_size=cfg.data.image_size)
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
    subset = _Subset(train, np.concatenate(idx))
    dev = next(model.parameters()).device
    emb = builders.embed_dataset(model, subset, dev,
                                 batch_size=batch_size or cfg.data.eval_batch_size,
                                 num_workers=cfg.data.num_workers, amp=cfg.train.amp)
    return {"flow": flow, "proxies": proxies, "proxies_per_class": k,
            "embeddings": emb.embeddings, "labels": emb.labels, "classes": classes,
            "criterion": criterion, "flow_init": state.get("flow_init")}


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
    :func:`nirdml.training.inference.embed_checkpoint_split`). For a checkpoint trained with NIR
    and ``flow_classes > 0``, ``flow_classes`` random training classes are embedded too and the
    flow is sampled around their proxies: statistics (and :func:`mechanism_metrics`) go to
    ``analysis.json["flow_samples"]``,
    the figure to ``flow_samples.png``. Figures: ``spectrum.png``, ``distances.png``,
    ``tsne.png`` (skipped with ``plots=False``). Returns the dict written to the JSON file.
    """
    if (embeddings is None) == (checkpoint is None):
        raise InputError("give exactly one of embeddings (array or .npz) and checkpoint")
    source: dict[str, Any]
    if checkpoint is not None:
        from nirdml.training.inference import embed_checkpoint_split

        emb, cfg = embed_checkpoint_split(checkpoint, split, device, batch_size, data_root)
        x, y = emb.embeddings, emb.labels
        source = {"checkpoint": str(checkpoint), "split": split, "dataset": cfg.data.name}
    elif isinstance(embeddings, (str, Path)):
        if labels is not None:
            raise InputError("labels come from the npz file; do not pass them as well")
        x, y = load_embeddings_npz(embeddings)
        source = {"embeddings": str(embeddings)}
    else:
        if labels is None:
            raise InputError("labels are required with an embeddings array")
        x, y = embeddings, labels
        source = {"embeddings": "array"}

    report = structure_report(x, y, seed=seed)
    result: dict[str, Any] = {**report, "source": source, "plots": {}, "flow_samples": None}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    flow_info = None
    if checkpoint is not None and flow_classes > 0 and cfg.loss.nir.enabled:
        flow_info = _flow_from_checkpoint(checkpoint, device, data_root, batch_size,
                                          flow_classes, max_real_per_class=200, seed=seed)

    if plots or flow_info is not None:
        from nirdml.analysis import plots as pl

        if plots:
            result["plots"]["spectrum"] = str(pl.plot_spectrum(x, out / PLOT_FILES["spectrum"]))
            result["plots"]["distances"] = str(pl.plot_distance_histograms(
                x, y, out / PLOT_FILES["distances"], seed=seed))
            result["plots"]["tsne"] = str(pl.plot_tsne(
                x, y, out / PLOT_FILES["tsne"], num_classes=tsne_classes, seed=seed))
        if flow_info is not None:
            k = flow_info["proxies_per_class"]
            samples = pl.sample_flow_around_proxies(
                flow_info["flow"], flow_info["proxies"], flow_info["classes"],
                flow_samples_per_class, k, seed)
            result["flow_samples"] = pl.flow_sample_stats(
                *samples, flow_info["embeddings"], flow_info["labels"], flow_info["proxies"], k)
            result["flow_samples"].update(mechanism_metrics(flow_info, seed))
            if plots:
                result["plots"]["flow_samples"] = str(pl.plot_flow_samples(
                    flow_info["flow"], flow_info["proxies"], flow_info["embeddings"],
                    flow_info["labels"], out / PLOT_FILES["flow_samples"],
                    classes=flow_info["classes"], proxies_per_class=k, seed=seed,
                    samples=samples))

    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The four headline numbers as a small text table."""
    rows = [("rho", "lower"), ("pi_density", "higher"), ("sigma2_kappa", "higher"),
            ("g2", "lower")]
    lines = [f"{'metric':<14}{'value':>10}  better", "-" * 32]
    lines += [f"{k:<14}{result[k]:>10.4f}  {b}" for k, b in rows]
    lines.append(f"({result['num_samples']} samples, {result['num_classes']} classes)")
    return "\n".join(lines)
