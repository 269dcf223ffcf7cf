"""Adam that updates only the rows of a table that got a gradient (``optim.proxy_update: rows``).

With sampled negatives (``loss.sample_rate`` r < 1) a step touches r of the proxies, but
torch's Adam still decays both moments and moves every row of the table: at 10^6 classes that
dense update costs more than the sampled loss itself (``benchmarks/bench_classes.py``).
:class:`RowAdam` (and :class:`RowAdamW`) are torch's optimisers for every group except those
marked ``"rows": True``; in those, a row whose gradient is all zeros is skipped: its value and
both moments stay as they are ("lazy" Adam, as TensorFlow Addons' LazyAdam and torch's
SparseAdam do for sparse gradients). A row that gets a gradient gets Adam's update with the
group's step count in the bias correction.

This is a different optimiser, not a faster dense Adam: a row skipped at one step does not
coast on its momentum. When every row gets a gradient (no sampling: every proxy loss touches
every proxy) it equals Adam (tests/test_row_adam.py). The state has Adam's layout (``step``,
``exp_avg``, ``exp_avg_sq``), so sharded checkpoints gather and split it like Adam's.
torch has no such option for dense gradients (``SparseAdam`` needs sparse ones, which the
proxy losses' dense matmuls do not produce), hence this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nirdml.errors import ConfigError


class _RowUpdates:
    """The row-wise update for groups marked ``"rows": True``; torch's for the others."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        row_groups = [g for g in groups if g.get("rows")]
        self.param_groups = [g for g in groups if not g.get("rows")]
        try:
            if self.param_groups:
                super().step()
        finally:
            self.param_groups = groups
        for group in row_groups:
            self._row_step(group)
        return loss

    @torch.no_grad()
    def _row_step(self, group: dict) -> None:
        if group.get("amsgrad") or group.get("maximize"):
            raise ConfigError("optim.proxy_update=rows supports plain Adam/AdamW only "
                              "(no amsgrad, no maximize)")
        beta1, beta2 = group["betas"]
        lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
        decoupled = isinstance(self, torch.optim.AdamW) or group.get("decoupled_weight_decay")
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = float(state["step"])
            rows = _rows_with_gradient(p.grad)
            if rows.numel() == 0:
                continue
            if rows.numel() == p.shape[0]:
                rows = slice(None)   # every row: the same update on views, without copies
            grad, value = p.grad[rows], p[rows]
            if decay and not decoupled:
                grad = grad.add(value, alpha=decay)
            if decay and decoupled:
                value = value.mul(1 - lr * decay)
            # with a slice these are views, updated in place; with indices, copies written back
            exp_avg = state["exp_avg"][rows].mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad,
                                                                      value=1 - beta2)
            if not isinstance(rows, slice):
                state["exp_avg"][rows] = exp_avg
                state["exp_avg_sq"][rows] = exp_avg_sq
            bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
            denom = (exp_avg_sq.sqrt() / bias2 ** 0.5).add_(eps)
            p[rows] = value.addcdiv(exp_avg, denom, value=-lr / bias1)


def _rows_with_gradient(grad: Tensor) -> Tensor:
    """Indices of the rows (first dimension) of ``grad`` that are not all zeros."""
    return (grad.reshape(grad.shape[0], -1) != 0).any(dim=1).nonzero().flatten()


class RowAdam(_RowUpdates, torch.optim.Adam):
    """``torch.optim.Adam``; groups with ``"rows": True`` update only rows with a gradient."""


class RowAdamW(_RowUpdates, torch.optim.AdamW):
    """``torch.optim.AdamW``; groups with ``"rows": True`` update only rows with a gradient."""


__all__ = ["RowAdam", "RowAdamW"]
