"""Class proxies split across ranks: which classes a rank owns, and the exact reductions.

A :class:`ClassShard` is a contiguous class range ``[lo, hi)`` of ``num_classes`` owned by one
rank of a process group (``ClassShard.split``; the first ``C % world`` ranks own one class
more, so C need not divide by the world size). ``ClassShard.whole(C)`` is the one shard of a
single process: every reduction is then the identity, so the dense loss is the one-shard case
of the same code.

The invariant that makes the reductions exact: a sharded loss gets the *global* batch
(identical on every rank), computes per-class parts on the classes it owns, and combines them
only through :meth:`ClassShard.sum` (all-reduce SUM); everything computed from a reduced value
is computed identically on every rank. So ``sum``'s backward is the identity: each rank's
local parts get the gradient of the full loss, its proxies their exact gradient, and the
embeddings its shard's contribution (whose sum over ranks is the dense gradient).

:class:`NegativeSampler` keeps, per step, the owned classes of the batch plus a seeded uniform
sample of the other owned classes (Partial FC's rule; the draw depends only on (seed, step,
rank), so a resumed run draws the same classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over ranks; backward: the identity (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


@dataclass(frozen=True, eq=False)
class ClassShard:
    """The classes ``[lo, hi)`` of ``num_classes`` that rank ``rank`` of ``world`` owns."""

    num_classes: int
    lo: int
    hi: int
    rank: int = 0
    world: int = 1
    group: object = None  # None: the default process group

    @classmethod
    def whole(cls, num_classes: int) -> ClassShard:
        """The single shard of one process (every reduction is the identity)."""
        return cls(int(num_classes), 0, int(num_classes))

    @staticmethod
    def ranges(num_classes: int, world: int) -> list[tuple[int, int]]:
        """The contiguous ranges of ``world`` ranks (``np.array_split``'s rule)."""
        base, extra = divmod(int(num_classes), int(world))
        bounds = [0]
        for r in range(world):
            bounds.append(bounds[-1] + base + (1 if r < extra else 0))
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    @classmethod
    def split(cls, num_classes: int, rank: int, world: int, group=None) -> ClassShard:
        """Rank ``rank``'s shard of ``num_classes`` over ``world`` ranks (``whole`` for one)."""
        if world == 1:
            return cls.whole(num_classes)
        lo, hi = cls.ranges(num_classes, world)[rank]
        return cls(int(num_classes), lo, hi, int(rank), int(world), group)

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def is_whole(self) -> bool:
        return self.world == 1

    # ---- reductions ---------------------------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """The sum over ranks (forward all-reduce, backward identity)."""
        return tensor if self.is_whole else _AllReduceSum.apply(tensor, self.group)

    def amax(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum over ranks of a detached tensor (a stable LSE's shift)."""
        out = tensor.detach().clone()
        if not self.is_whole:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX,
                                         group=self.group)
        return out

    def owned(self, labels: Tensor) -> Tensor:
        """A boolean mask of the ``labels`` (global class ids) this shard owns."""
        return (labels >= self.lo) & (labels < self.hi)

    def cross_entropy(self, local_logits: Tensor, labels: Tensor) -> Tensor:
        """Mean over rows of ``-log softmax`` over *all* classes, given this shard's columns
        (``(B, size)``) and global ``labels``. One shard: exactly ``F.cross_entropy``."""
        if self.is_whole:
            return F.cross_entropy(local_logits, labels)
        shift = self.amax(local_logits.max(dim=1).values)
        sum_exp = self.sum(torch.exp(local_logits - shift[:, None]).sum(dim=1))
        mine = self.owned(labels)
        index = (labels - self.lo).clamp(0, max(self.size - 1, 0))[:, None]
        if self.size:
            target_local = local_logits.gather(1, index)[:, 0] * mine
        else:
            target_local = local_logits.new_zeros(labels.shape[0])
        target = self.sum(target_local)
        return (torch.log(sum_exp) + shift - target).mean()

    # ---- rows of per-class tables -------------------------------------------------------
    def class_rows(self, local_table: Tensor, labels: Tensor) -> Tensor:
        """``(B, D)``: the row of each sample's class, from its owner (``local_table`` holds
        this shard's ``size`` rows); a row's gradient reaches only its owner."""
        if self.is_whole:
            return local_table[labels]
        mine = self.owned(labels)
        index = (labels - self.lo).clamp(0, max(self.size - 1, 0))
        rows = local_table[index] if self.size else local_table.new_zeros(
            labels.shape[0], local_table.shape[1])
        return self.sum(rows * mine[:, None].to(rows.dtype))

    def gather_rows(self, local_rows: Tensor, per_class: int = 1) -> Tensor:
        """The whole table on every rank (``per_class`` rows a class, class-major), from each
        shard's rows; no gradient. For checkpoints and the probe. ``per_class`` is given, not
        inferred, so a rank that owns no class pads to the same shape as the others."""
        local_rows = local_rows.detach()
        if self.is_whole:
            return local_rows.clone()
        sizes = [hi - lo for lo, hi in self.ranges(self.num_classes, self.world)]
        longest = max(sizes) * per_class
        padded = local_rows.new_zeros((longest, *local_rows.shape[1:]))
        padded[: local_rows.shape[0]] = local_rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded, group=self.group)
        return torch.cat([part[: size * per_class] for part, size in zip(parts, sizes,
                                                                        strict=True)])

    def slice_rows(self, full_rows: Tensor, per_class: int = 1) -> Tensor:
        """This shard's rows of a whole (class-major) table."""
        return full_rows[self.lo * per_class: self.hi * per_class].clone()


class NegativeSampler:
    """Which of a shard's classes one step computes on (``rate`` in (0, 1]).

    Partial FC's rule: the owned classes present in the global batch, plus a uniform sample
    without replacement of the other owned classes, ``max(#present, int(rate * size))`` in
    all. The draw depends only on ``(seed, step, rank)``. ``rate == 1`` keeps every class and
    draws nothing.
    """

    def __init__(self, rate: float, seed: int = 0):
        self.rate = float(rate)
        self.seed = int(seed)

    def kept(self, shard: ClassShard, labels: Tensor, step: int) -> Tensor:
        """Sorted local class indices (``0..size-1``) kept at ``step``."""
        device = labels.device
        if self.rate >= 1.0:
            return torch.arange(shard.size, device=device)
        present = torch.unique(labels[shard.owned(labels)]) - shard.lo
        wanted = max(int(present.numel()), int(self.rate * shard.size))
        others = torch.ones(shard.size, dtype=torch.bool)
        others[present.cpu()] = False
        pool = others.nonzero().flatten()
        state = np.random.SeedSequence([self.seed, int(step), shard.rank]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        extra = pool[torch.randperm(pool.numel(), generator=generator)[
            : wanted - present.numel()]]
        return torch.sort(torch.cat([present.cpu(), extra])).values.to(device)


__all__ = ["ClassShard", "NegativeSampler"]
