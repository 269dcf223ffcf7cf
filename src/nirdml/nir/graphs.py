"""The flow's NLL step replayed from CUDA graphs (``loss.nir.cuda_graphs``).

On a GPU the flow is launch-bound: ~80 small Linear layers are a few milliseconds of kernel
launches next to a backbone step of tens of milliseconds. The class-balanced sampler gives every
training step the same batch shape, so the NLL's forward and backward can be captured once
(``torch.cuda.make_graphed_callables``) and replayed as two graph launches.

:class:`GraphedNLL` keeps one captured graph per input signature (shape, dtype, which inputs
need gradients: the flow warm-up detaches them) and runs the eager NLL everywhere else: on the
CPU, without autograd (evaluation), for a new shape once ``max_graphs`` are captured, and for
good if a capture fails (with a warning). Replays compute the same numbers as the eager path
(the same kernels on the same data; the GPU check compares them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn


class _NLLModule(nn.Module):
    """The callable that is captured: ``nll(x, cond)`` of an owner module (its parameters are
    the graph's extra inputs)."""

    def __init__(self, owner: nn.Module, nll: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.owner = owner
        self._nll = nll

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self._nll(x, cond)


class GraphedNLL:
    """``nll(x, cond)`` from CUDA graphs where possible (see the module docstring)."""

    def __init__(self, owner: nn.Module, nll: Callable[[Tensor, Tensor], Tensor],
                 max_graphs: int = 4):
        self.owner = owner
        self.nll = nll
        self.max_graphs = int(max_graphs)
        self.graphs: dict[tuple, Callable] = {}
        self.disabled = False

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        if (self.disabled or x.device.type != "cuda" or not torch.is_grad_enabled()
                or torch.is_autocast_enabled("cuda")):
            return self.nll(x, cond)
        key = (tuple(x.shape), tuple(cond.shape), x.dtype, x.requires_grad, cond.requires_grad)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_graphs:
                return self.nll(x, cond)
            graphed = self._capture(x, cond)
            if graphed is None:
                return self.nll(x, cond)
            self.graphs[key] = graphed
        return graphed(x, cond)

    def _capture(self, x: Tensor, cond: Tensor):
        sample = (x.detach().clone().requires_grad_(x.requires_grad),
                  cond.detach().clone().requires_grad_(cond.requires_grad))
        try:
            return torch.cuda.make_graphed_callables(_NLLModule(self.owner, self.nll), sample,
                                                     allow_unused_input=True)
        except Exception as exc:  # noqa: BLE001 - any capture failure: stay eager, say so
            self.disabled = True
            warnings.warn(f"CUDA graph capture of the NIR flow failed ({type(exc).__name__}: "
                          f"{exc}); the flow runs eagerly", RuntimeWarning, stacklevel=3)
            return None
