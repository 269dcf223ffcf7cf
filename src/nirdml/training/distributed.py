"""Distributed data parallel plumbing for ``torchrun`` (one process per device).

:class:`DistContext` reads the ``torchrun`` environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``), starts the process group (NCCL on CUDA, gloo on CPU) and offers the few
collective operations the trainer needs. With one process every method is a no-op, so the
trainer has a single code path.

The proxy loss and NIR are computed on the *global* batch: :class:`GlobalBatchCriterion`
gathers embeddings and labels from every rank with :func:`gather_with_grad`, whose backward
sums the gradient that every rank's (identical) loss sends to each local slice. After DDP
averages the model gradients over ranks, the model, proxy and flow gradients equal those of a
single process on the same global batch. With ``loss.shard`` the proxies are split across
the ranks instead of replicated (``wrap_criterion``; ``nirdml.training.sharding``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.local = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks (rank order); gradients flow back to each part."""
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _scale_shard_gradient(module: nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for a sharded proxy loss: its input's gradient times the world size
    of its shard (a no-op for a copy that holds the whole table: ``sharding.dense_copy``).

    Why: a replicated loss sends every rank the whole gradient of the global batch, so the sum
    in :func:`gather_with_grad`'s backward is ``world`` times it and DDP's average over ranks
    brings the model gradient back to the single-process one. A sharded loss sends each rank
    only its shard's part, whose sum over ranks already is the whole gradient; scaling it by
    ``world`` keeps the same convention, so the DDP average again gives the single-process
    gradient (and NIR, replicated, keeps its own)."""
    world = module.shard.world
    if world == 1:
        return args
    embeddings, *rest = args
    return (_ScaleGradient.apply(embeddings, float(world)), *rest)


class GlobalBatchCriterion(nn.Module):
    """Runs a criterion on the batch gathered from every rank (equal local batch sizes)."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(gather_with_grad(embeddings), gather_no_grad(labels))


@dataclass
class DistContext:
    """The process's place in a (possibly 1-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """Join the ``torchrun`` job described by the environment, or return a 1-process one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=device)

    def end_process(self, code: int = 0) -> None:
        """End a worker process of a multi-process job, once its work is written and flushed
        (:func:`end_worker_process`). With one process this does nothing and returns.
        ``nirdml train`` calls it last; a script that trains through the Python API under
        ``torchrun`` can call it the same way."""
        if self.enabled:
            end_worker_process(code)

    # ---- wrapping -------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=True)

    def wrap_criterion(self, criterion: nn.Module) -> nn.Module:
        """``criterion`` on the global batch, its replicated parameters (flow, margin beta)
        averaged by DDP. Sharded proxies (``loss.shard``) are left out of DDP (each rank owns
        other rows and gets their exact gradient from the loss), and the proxy loss's part of
        the embedding gradient is scaled by the world size (:func:`_scale_shard_gradient`)."""
        if not self.enabled:
            return criterion
        from nirdml.training.sharding import is_sharded, proxy_loss_of

        wrapped = GlobalBatchCriterion(criterion)
        ignored = []
        if is_sharded(criterion):
            loss = proxy_loss_of(criterion)
            loss.register_forward_pre_hook(_scale_shard_gradient)
            ignored = [f"criterion.{name}" for name, p in criterion.named_parameters()
                       if p is loss.proxies]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                wrapped, ignored)
        if not any(p.requires_grad for name, p in wrapped.named_parameters()
                   if name not in ignored):
            # a pair-based loss without parameters, or a sharded proxy loss alone: nothing to
            # synchronise (and DDP refuses a module without trainable parameters); the
            # embeddings are still gathered
            return wrapped
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)

    # ---- evaluation helpers ---------------------------------------------------------------
    def shard_dataset(self, dataset):
        """This rank's strided share of ``dataset`` (rank, rank + world, ...)."""
        if not self.enabled:
            return dataset
        indices = list(range(self.rank, len(dataset), self.world_size))
        subset = torch.utils.data.Subset(dataset, indices)
        subset.labels = np.asarray(dataset.labels)[indices]
        for key in ("is_query", "is_gallery"):
            mask = getattr(dataset, key, None)
            setattr(subset, key, None if mask is None else np.asarray(mask)[indices])
        return subset

    def gather_embeddings(self, emb, total: int):
        """Reassemble strided shards from every rank into dataset order (result on all ranks)."""
        if not self.enabled:
            return emb
        parts = [None] * self.world_size
        dist.all_gather_object(parts, emb)
        out = type(emb)(
            np.empty((total, parts[0].embeddings.shape[1]), np.float32),
            np.empty(total, np.int64),
            None if emb.is_query is None else np.empty(total, bool),
            None if emb.is_gallery is None else np.empty(total, bool),
        )
        for r, part in enumerate(parts):
            out.embeddings[r::self.world_size] = part.embeddings
            out.labels[r::self.world_size] = part.labels
            if out.is_query is not None:
                out.is_query[r::self.world_size] = part.is_query
                out.is_gallery[r::self.world_size] = part.is_gallery
        return out

    def broadcast_float(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def end_worker_process(code: int = 0) -> None:
    """Every rank waits for the others, then leaves with ``os._exit`` without interpreter
    teardown (nothing to do when no process group is up).

    Measured reason: on torch 2.14 a gloo rank aborted now and then while exiting normally
    (``terminate called without an active exception``, SIGABRT, in about one of four runs of
    our test suite and one of five two-rank benchmark jobs, with or without
    ``destroy_process_group``), which turns finished work into a failure. NCCL's group is
    destroyed first, as it asks. Call it only once the rank's results are written."""
    if not dist.is_initialized():
        return
    dist.barrier()
    if dist.get_backend() == "nccl":
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
