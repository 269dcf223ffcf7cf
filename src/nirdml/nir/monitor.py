"""Mechanism metrics: is NIR alive, does its flow use the condition, are embeddings collapsing?

The trainer logs these once per epoch (``probe/*`` and ``flow/*`` in ``metrics.jsonl`` and
TensorBoard); ``nirdml analyze`` reports them for a checkpoint. All of them are computed on a
:class:`MechanismProbe`: a fixed, seeded subset of *training-class* samples (only those have
proxies) embedded without augmentation, so the numbers of different epochs and runs compare.

* ``condition_gain_nats``: mean NLL of an embedding given the proxy of a random other class
  minus given its own class's proxy. About 0: the flow learned one density for all classes.
* ``class_id_acc``: how often ``argmax_c log p(x | proxy_c)`` over the probe's classes is the
  own class (chance: 1 / number of probe classes): the flow as a classifier.
* ``nir_grad_share``: ``|grad_x NIR| / (|grad_x NIR| + |grad_x proxy|)`` of the weighted terms
  on the probe's embeddings: how much of the push on the embeddings comes from NIR (0: inert).
* ``cos_between`` / ``cos_within``: mean cosine between embeddings of different classes / of the
  same class; ``cos_between`` near 1 means the embeddings collapse to a point.
* ``flow/drift`` and ``flow/drift_max``: relative L2 distance of the flow's parameters from
  their initial values, and the largest absolute change (0: the flow does not learn).

Nothing here draws from the global random generators, so a run logs them without changing its
training trajectory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _nll(criterion: nn.Module, x: Tensor, cond: Tensor) -> Tensor:
    """Per-sample NLL under the criterion's flow and base distribution."""
    nll = getattr(criterion, "nll", None)
    return nll(x, cond) if callable(nll) else criterion.flow.nll(x, cond)


def collapse_metrics(x: Tensor, y: Tensor) -> dict[str, float]:
    """Mean cosine between embeddings of different classes and of the same class."""
    x = F.normalize(x.double(), dim=1)
    cos = x @ x.t()
    same = y[:, None] == y[None, :]
    off_diagonal = ~torch.eye(len(y), dtype=torch.bool, device=x.device)
    within = cos[same & off_diagonal]
    return {"cos_between": cos[~same].mean().item() if (~same).any() else float("nan"),
            "cos_within": within.mean().item() if within.numel() else float("nan")}


@torch.no_grad()
def condition_metrics(criterion: nn.Module, x: Tensor, y: Tensor, seed: int = 0,
                      classify: bool = True) -> dict[str, float]:
    """``nll_own_proxy``, ``nll_other_proxy`` (a seeded random other class out of all
    ``num_classes``), ``condition_gain_nats`` = other - own, and (``classify``) ``class_id_acc``:
    argmax over the classes present in ``y`` of ``log p(x | proxy_c)``."""
    base = getattr(criterion, "base_loss", criterion)
    num_classes = int(base.num_classes)
    x = F.normalize(x.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    other = (y + torch.randint(1, max(num_classes, 2), y.shape, generator=g).to(y.device)
             ) % num_classes
    own_nll = _nll(criterion, x, base.class_proxies(x, y))
    other_nll = _nll(criterion, x, base.class_proxies(x, other))
    out = {"nll_own_proxy": own_nll.mean().item(), "nll_other_proxy": other_nll.mean().item(),
           "condition_gain_nats": (other_nll - own_nll).mean().item(),
           "num_samples": int(y.numel())}
    if classify:
        classes = torch.unique(y)
        scores = torch.stack([
            -_nll(criterion, x, base.class_proxies(x, torch.full_like(y, int(c))))
            for c in classes], 1)
        predicted = classes[scores.argmax(1)]
        out["class_id_acc"] = (predicted == y).double().mean().item()
        out["class_id_chance"] = 1.0 / classes.numel()
    return out


def gradient_share(criterion: nn.Module, x: Tensor, y: Tensor) -> float:
    """``|grad NIR| / (|grad NIR| + |grad proxy|)`` w.r.t. the embeddings ``x``, each term with
    the weight it has in the loss (``NIRLoss.objective``)."""
    x = x.detach().float().requires_grad_(True)
    proxy_part, nir_part, _ = criterion.objective(x, y)
    g_proxy, = torch.autograd.grad(proxy_part, x, retain_graph=True, allow_unused=True)
    g_nir, = torch.autograd.grad(nir_part, x, allow_unused=True)
    n_proxy = 0.0 if g_proxy is None else g_proxy.norm().item()
    n_nir = 0.0 if g_nir is None else g_nir.norm().item()
    return n_nir / (n_nir + n_proxy) if n_nir + n_proxy > 0 else 0.0


def flow_state(flow: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the flow's parameters (the reference for :func:`flow_drift`)."""
    return {k: v.detach().cpu().clone() for k, v in flow.named_parameters()}


def flow_drift(flow: nn.Module, initial: dict[str, Tensor]) -> dict[str, float]:
    """Relative L2 distance of the flow's parameters from ``initial``, and the largest change."""
    diff2 = ref2 = 0.0
    largest = 0.0
    for name, p in flow.named_parameters():
        p0 = initial[name].to(p.device, p.dtype)
        d = (p.detach() - p0)
        diff2 += d.double().square().sum().item()
        ref2 += p0.double().square().sum().item()
        largest = max(largest, d.abs().max().item() if d.numel() else 0.0)
    return {"drift": (diff2 / ref2) ** 0.5 if ref2 > 0 else 0.0, "drift_max": largest}


class MechanismProbe:
    """A fixed subset of a training split, and the mechanism metrics computed on it.

    Args:
        dataset: the training split (a ``LabeledDataset``).
        transform: the evaluation transform (no augmentation) applied to its images.
        num_classes: how many training classes the probe holds (``min`` with what exists).
        per_class: samples per probe class (classes with fewer give what they have).
        seed: chooses classes and samples (its own generator: the global RNGs are untouched).

    Images are read and transformed at every call (nothing is kept in memory).
    """

    def __init__(self, dataset, transform, num_classes: int = 64, per_class: int = 4,
                 seed: int = 0, batch_size: int = 256):
        labels = np.asarray(dataset.labels)
        rng = np.random.default_rng([seed, 7919])
        present = np.unique(labels)
        classes = np.sort(rng.choice(present, size=min(num_classes, present.size), replace=False))
        rows = []
        for c in classes:
            members = np.flatnonzero(labels == c)
            take = min(per_class, members.size)
            rows.append(np.sort(rng.choice(members, size=take, replace=False)))
        self.indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.labels = torch.as_tensor(labels[self.indices], dtype=torch.long)
        # a copy of just these samples with the evaluation transform (labels kept from above:
        # ``select`` renumbers them, the proxies need the training numbering)
        self.samples = dataset.select(self.indices, name=f"{dataset.name}/probe")
        self.samples.transform = transform
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return int(self.indices.size)

    @torch.no_grad()
    def embed(self, model: nn.Module, device: torch.device) -> Tensor:
        """The probe's embeddings (N, D) on ``device``, model in eval mode (restored after)."""
        was_training = model.training
        model.eval()
        try:
            chunks = []
            for start in range(0, len(self), self.batch_size):
                stop = min(start + self.batch_size, len(self))
                batch = torch.stack([self.samples[i][0] for i in range(start, stop)])
                chunks.append(model(batch.to(device)).float())
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def metrics(self, model: nn.Module, criterion: nn.Module, device: torch.device,
                flow_init: dict[str, Tensor] | None = None) -> dict[str, float]:
        """Every mechanism metric that applies: ``probe/cos_*`` always; with a flow also
        ``probe/condition_gain_nats``, ``probe/class_id_acc``, ``probe/nll_own_proxy``,
        ``probe/nir_grad_share`` and (given ``flow_init``) ``flow/drift``, ``flow/drift_max``."""
        if len(self) == 0:
            return {}
        x = self.embed(model, device)
        y = self.labels.to(device)
        out = {f"probe/{k}": v for k, v in collapse_metrics(x, y).items()}
        flow = getattr(criterion, "flow", None)
        if flow is None:
            return out
        was_training = criterion.training
        criterion.eval()  # no input noise
        try:
            cond = condition_metrics(criterion, x, y)
            out.update({f"probe/{k}": v for k, v in cond.items()
                        if k not in ("num_samples", "class_id_chance")})
            if hasattr(criterion, "objective"):
                # the disc mode draws negatives: keep the global generators where they were
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    out["probe/nir_grad_share"] = gradient_share(criterion, x, y)
        finally:
            criterion.train(was_training)
        if flow_init is not None:
            out.update({f"flow/{k}": v for k, v in flow_drift(flow, flow_init).items()})
        return out
