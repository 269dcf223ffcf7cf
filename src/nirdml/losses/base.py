"""``MetricLoss``, the base class of every loss, and ``ProxyLoss``, that of the proxy losses.

Subclasses implement ``_compute(embeddings, labels) -> (total, terms)`` on validated inputs.
The base ``forward`` checks the inputs, turns autocast off and computes in at least float32
(half/bfloat16 inputs are upcast, float64 stays float64; a loss with float64 parameters
computes in float64), and stores the detached sub-terms in ``last_terms`` (always with the key
``"proxy"`` for the total, the key the trainer and NIR read whatever the loss).

``MetricLoss`` has no proxies (the pair-based losses: contrastive, triplet, multi-similarity,
margin); ``ProxyLoss`` adds ``proxies``, ``class_proxies`` (what NIR conditions on) and the
proxy learning-rate multiplier.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError, InputError
from nirdml.losses.shard import ClassShard, NegativeSampler

#: Proxy learning-rate multiplier used by default for every loss. It matches the NIR release's
#: ProxyAnchor *baseline* recipe (Adam, base lr 1e-5, proxies x2000 -> 2e-2); the release trains
#: PA + NIR with x4000. The original papers used other ratios at other base lrs (Kim et al.:
#: x100 at lr 1e-4), so pass ``proxy_lr_multiplier=`` when following another recipe.
DEFAULT_PROXY_LR_MULTIPLIER = 2000.0


#: classes per block of the sharded initialisation (``_block_init``)
INIT_BLOCK = 1024


def _block_init(shard: ClassShard, per_class: int, dim: int, seed: int) -> Tensor:
    """The shard's rows of an N(0, 1) / 8 table drawn block by block (``INIT_BLOCK`` classes,
    each block from its own generator seeded by (seed, block)): the same rows whatever the
    world size, without ever drawing the whole table."""
    rows = []
    for block in range(shard.lo // INIT_BLOCK, -(-shard.hi // INIT_BLOCK)):
        first = block * INIT_BLOCK
        count = min(INIT_BLOCK, shard.num_classes - first)
        state = np.random.SeedSequence([int(seed), block]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        table = torch.randn(count * per_class, dim, generator=generator) / 8.0
        lo, hi = max(shard.lo, first) - first, min(shard.hi, first + count) - first
        rows.append(table[lo * per_class: hi * per_class])
    return torch.cat(rows) if rows else torch.zeros(0, dim)


def _autocast_off(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


class MetricLoss(nn.Module):
    """Base of every loss: ``forward(embeddings, labels) -> scalar``, ``last_terms``, input
    validation (``InputError``), the dtype/autocast policy and ``param_groups``.

    ``num_classes`` is the number of training classes (labels must lie in ``[0,
    num_classes)``); ``embedding_dim`` the embedding size the loss accepts.
    """

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        if int(num_classes) < 1 or int(embedding_dim) < 1:
            raise ConfigError(
                f"num_classes and embedding_dim must be >= 1, got {num_classes} and {embedding_dim}"
            )
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.last_terms: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- validation
    def _check_inputs(self, embeddings, labels) -> Tensor:
        """Raise ``InputError`` on bad inputs; return labels as int64 on the embeddings' device."""
        if not isinstance(embeddings, Tensor):
            raise InputError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if embeddings.ndim != 2:
            raise InputError(
                f"embeddings must be 2-D (batch, dim), got shape {tuple(embeddings.shape)}"
            )
        if not embeddings.dtype.is_floating_point:
            raise InputError(f"embeddings must be floating point, got dtype {embeddings.dtype}")
        if embeddings.shape[1] != self.embedding_dim:
            raise InputError(
                f"embedding dim mismatch: embeddings have dim {embeddings.shape[1]} but the loss "
                f"was built with embedding_dim={self.embedding_dim}"
            )
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise InputError(
                f"labels length mismatch: expected a 1-D tensor of {embeddings.shape[0]} labels "
                f"(one per embedding), got shape {tuple(labels.shape)}"
            )
        if embeddings.shape[0] == 0:
            raise InputError("empty batch: embeddings and labels have 0 rows")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.to(device=embeddings.device, dtype=torch.long)
        lo, hi = torch.aminmax(labels)
        bad_rows = (~torch.isfinite(embeddings).all(dim=1)).sum()
        lo, hi, bad = torch.stack([lo, hi, bad_rows]).tolist()  # a single device sync
        if lo < 0 or hi >= self.num_classes:
            raise InputError(
                f"labels out of range: min {lo}, max {hi}, but num_classes={self.num_classes} "
                f"(labels must lie in [0, {self.num_classes}))"
            )
        if bad:
            raise InputError(f"embeddings contain NaN/inf in {bad} of {embeddings.shape[0]} rows")
        return labels

    # ----------------------------------------------------------------- forward
    def _compute_dtype(self, embeddings: Tensor) -> torch.dtype:
        """The embeddings' dtype promoted with the loss's parameters', at least float32."""
        dtype = embeddings.dtype
        for p in self.parameters():
            if p.dtype.is_floating_point:
                dtype = torch.promote_types(dtype, p.dtype)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        return dtype

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        labels = self._check_inputs(embeddings, labels)
        dtype = self._compute_dtype(embeddings)
        with _autocast_off(embeddings.device):
            total, terms = self._compute(embeddings.to(dtype), labels)
        self.last_terms = {"proxy": total.detach(), **{k: v.detach() for k, v in terms.items()}}
        return total

    def _compute(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups of the loss's own parameters (none for most pair losses)."""
        params = list(self.parameters())
        if not params:
            return []
        return [{"name": "loss_params", "params": params, "lr": lr,
                 "weight_decay": weight_decay}]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"


class ProxyLoss(MetricLoss):
    """Base of proxy losses; ``proxies`` has shape ``(num_classes * k, embedding_dim)``."""

    proxy_lr_multiplier: float = DEFAULT_PROXY_LR_MULTIPLIER

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        proxy_lr_multiplier=None,
        proxies_per_class: int = 1,
        shard: ClassShard | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(num_classes, embedding_dim)
        self.proxies_per_class = int(proxies_per_class)
        if proxy_lr_multiplier is not None:
            self.proxy_lr_multiplier = float(proxy_lr_multiplier)
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ConfigError(f"loss.sample_rate must be in (0, 1], got {sample_rate}")
        self.shard = shard
        self.sample_rate = float(sample_rate)
        self.sampler = NegativeSampler(sample_rate, seed)
        self.step = 0
        if shard is None:
            n = self.num_classes * self.proxies_per_class
            # N(0, 1) / 8, as in the NIR release.
            self.proxies = nn.Parameter(torch.randn(n, self.embedding_dim) / 8.0)
        else:
            if shard.num_classes != self.num_classes:
                raise ConfigError(f"the class shard is of {shard.num_classes} classes but the "
                                  f"loss has num_classes={self.num_classes}")
            self.proxies = nn.Parameter(_block_init(shard, self.proxies_per_class,
                                                    self.embedding_dim, seed))

    # ----------------------------------------------------------------- classes of a step
    def set_step(self, step: int) -> None:
        """The training step the negative sample is drawn for (``loss.sample_rate``)."""
        self.step = int(step)

    def _classes(self, labels: Tensor) -> tuple[ClassShard, Tensor, Tensor]:
        """``(shard, proxies, labels)`` this step computes on: the whole table, this rank's
        shard, or with sampling the kept classes of every rank as one smaller problem (the
        kept rows; labels renumbered into it; the shard's ``num_classes`` the kept total)."""
        shard = self.shard or ClassShard.whole(self.num_classes)
        if self.sample_rate >= 1.0:
            return shard, self.proxies, labels
        k = self.proxies_per_class
        kept = self.sampler.kept(shard, labels, self.step)
        counts = torch.zeros(shard.world, dtype=torch.long, device=labels.device)
        counts[shard.rank] = kept.numel()
        counts = shard.sum(counts)
        offset = int(counts[: shard.rank].sum())
        position = torch.full((shard.size,), -1, dtype=torch.long, device=labels.device)
        position[kept] = torch.arange(kept.numel(), device=labels.device)
        mine = shard.owned(labels)
        renumbered = torch.where(mine, position[(labels - shard.lo).clamp(0, max(
            shard.size - 1, 0))] + offset, torch.zeros_like(labels)) if shard.size else \
            torch.zeros_like(labels)
        renumbered = shard.sum(renumbered * mine)
        total = int(counts.sum())
        sub = ClassShard(total, offset, offset + kept.numel(), shard.rank, shard.world,
                         shard.group)
        rows = (kept[:, None] * k + torch.arange(k, device=kept.device)).flatten()
        return sub, self.proxies[rows], renumbered

    # ----------------------------------------------------------------- helpers
    def _normalized_proxies(self, dtype: torch.dtype) -> Tensor:
        return F.normalize(self.proxies.to(dtype), dim=1)

    def _cosine(self, embeddings: Tensor) -> Tensor:
        """(B, P) cosine similarities between the embeddings and all proxies."""
        return F.normalize(embeddings, dim=1) @ self._normalized_proxies(embeddings.dtype).t()

    def class_proxies(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, D) L2-normalised proxy of each sample's class (what NIR conditions on); the
        first row of a class with several; under a shard from the class's owner."""
        labels = self._check_inputs(embeddings, labels)
        if self.shard is None:
            return F.normalize(self.proxies[labels], dim=1)
        first = self.proxies[:: self.proxies_per_class] if self.proxies_per_class > 1 \
            else self.proxies
        return F.normalize(self.shard.class_rows(first, labels), dim=1)

    def _nearest_own_centre(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B, D) for losses with K centres a class (SoftTriple, Sub-center ArcFace): each
        sample's own-class centre of highest cosine, L2-normalised, from the class's owner
        (the choice carries no gradient, the chosen centre does)."""
        labels = self._check_inputs(embeddings, labels)
        k = self.proxies_per_class
        shard = self.shard or ClassShard.whole(self.num_classes)
        mine = shard.owned(labels)
        local = (labels - shard.lo).clamp(0, max(shard.size - 1, 0))
        with torch.no_grad():
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            x = F.normalize(embeddings.to(dtype), dim=1)
            cos = (x @ F.normalize(self.proxies.to(dtype), dim=1).t()).view(len(labels), -1, k)
            best = cos[torch.arange(len(labels)), local].argmax(dim=1) if shard.size \
                else torch.zeros_like(labels)
        rows = self.proxies[local * k + best] if shard.size else self.proxies.new_zeros(
            labels.shape[0], self.embedding_dim)
        if shard.is_whole:
            return F.normalize(rows, dim=1)
        return F.normalize(shard.sum(rows * mine[:, None].to(rows.dtype)), dim=1)

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: proxies at ``lr * proxy_lr_multiplier`` without weight decay."""
        groups = [
            {
                "name": "proxies",
                "params": [self.proxies],
                "lr": lr * self.proxy_lr_multiplier,
                "weight_decay": 0.0,
            }
        ]
        others = [p for p in self.parameters() if p is not self.proxies]
        if others:
            groups.append(
                {"name": "loss_params", "params": others, "lr": lr, "weight_decay": weight_decay}
            )
        return groups

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"proxy_lr_multiplier={self.proxy_lr_multiplier:g}"
        )
