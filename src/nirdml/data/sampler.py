"""Class-balanced batches (P classes x m samples), reproducible per epoch, resumable, DDP-shardable.

Each *global* batch holds ``batch_size / samples_per_class`` distinct classes with
``samples_per_class`` samples each, laid out class by class (``[a, a, b, b, c, c, ...]``). The
batches of an epoch depend only on ``(seed, epoch)``, so every DDP rank computes the same global
batches and takes its own contiguous slice of ``batch_size / num_replicas`` samples: slices are
disjoint, their union is the global batch, and class groups stay whole on one rank (the local
batch size must be a multiple of ``samples_per_class``). Because the order does not depend on
the number of ranks, a checkpoint written with N ranks resumes on M ranks at the same batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from nirdml.errors import ConfigError


class ClassBalancedBatchSampler(torch.utils.data.Sampler):
    """Batch sampler of class-balanced batches; pass it as ``DataLoader(batch_sampler=...)``.

    Per batch, ``P = batch_size // samples_per_class`` distinct classes are drawn with
    probability proportional to how many of their images the epoch has not used yet (sampling
    without replacement, so an epoch covers nearly every image once; when fewer than ``P``
    classes have unused images, a new round adds all images back). Each class hands out its
    images from a shuffled queue (no repeats until the class is used up), and only a class with
    fewer than ``samples_per_class`` images repeats images within a batch. ``len(sampler)`` is
    the number of batches per epoch: ``len(labels) // batch_size`` (at least 1; rounded up when
    ``drop_last=False``). Call :meth:`set_epoch` before each epoch.

    Resuming: :meth:`state_dict` records ``epoch``, ``seed`` and how many batches of the epoch
    were consumed; after :meth:`load_state_dict` (or with ``start_batch``) the next iteration
    regenerates the epoch and skips those batches, yielding exactly the remaining ones.
    :meth:`from_batch` gives a one-off view that starts at a given batch. Note that a
    ``DataLoader`` prefetches, so the sampler's own count runs ahead of the batches the training
    loop has finished; pass the loop's count to ``state_dict(consumed_batches=...)``.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int,
                 samples_per_class: int = 2, seed: int = 0, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0, start_batch: int = 0):
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ConfigError(f"labels must be a non-empty 1-d array, got shape {labels.shape}")
        batch_size, samples_per_class = int(batch_size), int(samples_per_class)
        if batch_size <= 0 or samples_per_class <= 0 or batch_size % samples_per_class:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of "
                              f"samples_per_class ({samples_per_class})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in [0, num_replicas), got rank={rank}, "
                              f"num_replicas={num_replicas}")
        if batch_size % num_replicas or (batch_size // num_replicas) % samples_per_class:
            raise ConfigError(
                f"batch_size ({batch_size}) must split into {num_replicas} equal per-rank "
                f"batches that are multiples of samples_per_class ({samples_per_class})")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // samples_per_class
        if self.classes_per_batch > len(classes):
            raise ConfigError(
                f"a batch of {batch_size} with {samples_per_class} samples per class needs "
                f"{self.classes_per_batch} distinct classes, but the labels have only "
                f"{len(classes)}; raise samples_per_class or lower batch_size")
        order = np.argsort(inverse, kind="stable")
        sizes = np.bincount(inverse)
        self._by_class = np.split(order, np.cumsum(sizes)[:-1])
        self._weights = sizes / sizes.sum()
        self.num_samples = int(labels.size)
        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.local_batch_size = batch_size // num_replicas
        self.epoch = 0
        self.start_batch = int(start_batch)
        self._start_epoch: int | None = None  # the epoch start_batch belongs to (None: the next)
        self._consumed = 0

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Batches per epoch (the same on every rank)."""
        if self.drop_last:
            return max(1, self.num_samples // self.batch_size)
        return -(-self.num_samples // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    # ---- epochs and resume ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields. A pending offset from
        :meth:`load_state_dict` is dropped when ``epoch`` is not the epoch it was saved in; one
        given as ``start_batch`` to the constructor applies to whichever epoch comes first."""
        epoch = int(epoch)
        if self._start_epoch is not None and epoch != self._start_epoch:
            self.start_batch = 0
        if epoch != self.epoch:
            self._consumed = 0
        self.epoch = epoch

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """``epoch``, ``seed`` and ``batches_consumed`` in the current epoch (default: as many as
        the sampler has handed out, which with a prefetching DataLoader is too many)."""
        consumed = self._consumed if consumed_batches is None else int(consumed_batches)
        return {"epoch": self.epoch, "seed": self.seed, "batches_consumed": consumed,
                "batch_size": self.batch_size, "samples_per_class": self.samples_per_class}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration yields the epoch's remaining batches."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.start_batch = int(state.get("batches_consumed", 0))
        self._start_epoch = self.epoch
        self._consumed = self.start_batch

    def from_batch(self, start_batch: int) -> _BatchRange:
        """A batch sampler over the current epoch's batches ``start_batch, ..., len - 1``."""
        if not 0 <= start_batch <= self.num_batches:
            raise ConfigError(f"start_batch must be in [0, {self.num_batches}], "
                              f"got {start_batch}")
        return _BatchRange(self, int(start_batch))

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch, self._start_epoch = self.start_batch, 0, None
        return self._iterate(start)

    def _iterate(self, start: int) -> Iterator[list[int]]:
        lo = self.rank * self.local_batch_size
        hi = lo + self.local_batch_size
        self._consumed = start
        for b, batch in enumerate(self.global_batches(self.epoch)):
            if b < start:
                continue
            self._consumed = b + 1
            yield batch[lo:hi]

    def global_batches(self, epoch: int) -> Iterator[list[int]]:
        """All global batches of ``epoch`` (every rank's slices together)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        m = self.samples_per_class
        sizes = np.array([len(members) for members in self._by_class], dtype=np.int64)
        unused = sizes.copy()  # images of each class not handed out yet in this round
        queues: dict[int, np.ndarray] = {}
        for _ in range(self.num_batches):
            if np.count_nonzero(unused) < self.classes_per_batch:
                unused += sizes  # too few classes left: start a new round over all images
            classes = rng.choice(len(sizes), size=self.classes_per_batch, replace=False,
                                 p=unused / unused.sum())
            batch: list[int] = []
            for c in classes.tolist():
                members = self._by_class[c]
                if len(members) < m:  # too small a class: all of it, topped up with repeats
                    picks = np.concatenate([rng.permutation(members),
                                            rng.choice(members, m - len(members))])
                else:
                    queue = queues.get(c)
                    if queue is None or len(queue) < m:
                        fresh = rng.permutation(members)
                        if queue is not None and len(queue):
                            fresh = np.concatenate([queue, fresh[~np.isin(fresh, queue)]])
                        queue = fresh
                    picks, queues[c] = queue[:m], queue[m:]
                unused[c] = max(0, unused[c] - m)
                batch.extend(picks.tolist())
            yield batch


class _BatchRange(torch.utils.data.Sampler):
    """The batches ``start..`` of a sampler's current epoch (see ``from_batch``)."""

    def __init__(self, sampler: ClassBalancedBatchSampler, start: int):
        self.sampler = sampler
        self.start = start

    def __len__(self) -> int:
        return max(0, self.sampler.num_batches - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        self.sampler.start_batch, self.sampler._start_epoch = 0, None
        return self.sampler._iterate(self.start)
