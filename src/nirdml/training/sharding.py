"""Class-sharded proxies in a training run (``loss.shard``, ``loss.sample_rate``).

The losses do the maths (``nirdml.losses.shard``: each rank holds the proxies of a contiguous
class range and computes its part of the loss on the gathered global batch). This module is
what the trainer needs around it:

* :func:`proxy_loss_options`: the ``shard`` / ``sample_rate`` / ``seed`` arguments a proxy loss
  gets from the config and the process group;
* :func:`proxy_loss_of` / :func:`is_sharded`: the proxy loss inside a criterion (NIR wraps one);
* :func:`dense_states` and :func:`local_states`: a checkpoint always holds the *whole* proxy
  table and its Adam moments, in the dense layout (gathered from the owners when saved, the
  owned rows taken back when loaded), so a checkpoint written by N ranks resumes on M ranks
  or on one process, and every reader after training (``analyze``) sees a dense loss;
* :func:`dense_copy`: a single-process copy of a sharded criterion on every rank, for the
  per-epoch mechanism probe, which runs on the main rank alone.

Everything here is a no-op for a criterion whose proxies are not split across ranks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def proxy_loss_options(cfg, num_classes: int, dist=None) -> dict[str, Any]:
    """The keyword arguments ``cfg.loss`` adds to a proxy loss: ``shard`` (this rank's
    ``ClassShard`` under ``torchrun`` with ``loss.shard``; the whole table on one process),
    ``sample_rate`` and the ``seed`` of the negative sample and the block-wise init. None for a
    pair loss or a run without either setting (the loss is then built exactly as before)."""
    from nirdml.losses import PROXY_LOSSES
    from nirdml.losses.shard import ClassShard

    loss = cfg.loss
    if loss.name not in PROXY_LOSSES or (not loss.shard and loss.sample_rate == 1.0):
        return {}
    options: dict[str, Any] = {"sample_rate": loss.sample_rate, "seed": cfg.seed}
    if loss.shard:
        world = dist.world_size if dist is not None and dist.enabled else 1
        options["shard"] = (ClassShard.split(num_classes, dist.rank, world) if world > 1
                            else ClassShard.whole(num_classes))
    return options


def proxy_loss_of(criterion: nn.Module):
    """The ``ProxyLoss`` of ``criterion`` (itself, or the loss NIR wraps); None for a pair
    loss."""
    from nirdml.losses import ProxyLoss

    for candidate in (criterion, getattr(criterion, "base_loss", None)):
        if isinstance(candidate, ProxyLoss):
            return candidate
    return None


def is_sharded(criterion: nn.Module) -> bool:
    """Whether the proxies of ``criterion`` are split across more than one rank."""
    loss = proxy_loss_of(criterion)
    shard = getattr(loss, "shard", None)
    return shard is not None and shard.world > 1


def _proxy_name(criterion: nn.Module, proxies: nn.Parameter) -> str:
    return next(name for name, p in criterion.named_parameters() if p is proxies)


def _optimizer_index(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> int:
    """The index of ``param`` in ``optimizer.state_dict()`` (params numbered across groups)."""
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(flat) if p is param)


def _convert(criterion: nn.Module, optimizer, criterion_state: dict, optimizer_state: dict | None,
             rows) -> tuple[dict, dict | None]:
    """``criterion_state`` and ``optimizer_state`` with the proxy rows (and every per-row
    optimiser moment) replaced by ``rows(tensor)``; everything else as it is."""
    loss = proxy_loss_of(criterion)
    name = _proxy_name(criterion, loss.proxies)
    criterion_state = dict(criterion_state)
    criterion_state[name] = rows(criterion_state[name])
    if optimizer is None or optimizer_state is None:
        return criterion_state, optimizer_state
    index = _optimizer_index(optimizer, loss.proxies)
    moments = optimizer_state["state"].get(index)
    if moments is not None:
        optimizer_state = {**optimizer_state, "state": dict(optimizer_state["state"])}
        optimizer_state["state"][index] = {
            key: rows(value) if torch.is_tensor(value) and value.ndim == 2 else value
            for key, value in moments.items()}
    return criterion_state, optimizer_state


def dense_states(criterion: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """The criterion's (and optimiser's) state dict in the dense layout: the whole proxy table
    and its Adam moments, gathered from their owners. Collective: every rank calls it."""
    criterion_state = criterion.state_dict()
    optimizer_state = None if optimizer is None else optimizer.state_dict()
    if not is_sharded(criterion):
        return criterion_state, optimizer_state
    loss = proxy_loss_of(criterion)

    def gathered(rows: torch.Tensor) -> torch.Tensor:
        return loss.shard.gather_rows(rows, per_class=loss.proxies_per_class)

    return _convert(criterion, optimizer, criterion_state, optimizer_state, gathered)


def local_states(criterion: nn.Module, optimizer, criterion_state: dict,
                 optimizer_state: dict | None) -> tuple[dict, dict | None]:
    """A dense-layout state (``dense_states``) cut to this rank's shard: the owned proxy rows
    and their moments. Identity when the proxies are not split."""
    if not is_sharded(criterion):
        return criterion_state, optimizer_state
    loss = proxy_loss_of(criterion)
    k = loss.proxies_per_class

    def own(full: torch.Tensor) -> torch.Tensor:
        return loss.shard.slice_rows(full, per_class=k)

    return _convert(criterion, optimizer, criterion_state, optimizer_state, own)


def dense_copy(criterion: nn.Module) -> nn.Module:
    """A copy of ``criterion`` that computes on one process: its proxy loss holds the whole
    table (gathered; collective, so every rank calls it) and samples no negatives. The
    original is not touched."""
    if not is_sharded(criterion):
        return criterion
    from nirdml.losses.shard import ClassShard

    loss = proxy_loss_of(criterion)
    full = nn.Parameter(loss.shard.gather_rows(loss.proxies, per_class=loss.proxies_per_class),
                        requires_grad=loss.proxies.requires_grad)
    memo = {id(loss.shard): ClassShard.whole(loss.num_classes), id(loss.proxies): full}
    dense = copy.deepcopy(criterion, memo)
    proxy_loss_of(dense).sample_rate = 1.0
    return dense


__all__ = ["dense_copy", "dense_states", "is_sharded", "local_states", "proxy_loss_of",
           "proxy_loss_options"]
