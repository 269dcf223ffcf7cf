"""How ``ConditionalGlowFlow`` feeds its condition to the coupling subnets: one class per mode.

The flow's couplings are conditioned only through the first Linear layer of their subnets, which
acts on ``[h, c_feat]`` and is computed as ``h @ W_h^T + (c_feat @ W_c^T + b)``. A
:class:`Conditioning` decides which blocks are conditioned (``cond_blocks``), the width of the
condition features (``feature_dim``), how they are computed from the raw condition (optionally
with learnt networks, a "hyper network" in zuko's terms) and returns the condition part
``c_feat @ W_c^T + b`` of every conditioned subnet (:meth:`Conditioning.first_layer`); the flow
and its fused kernel (``nirdml.nir._fused``) only consume that part, whatever the mode.

A new scheme is one subclass with a unique ``name``, registered with
:func:`register_conditioning`; ``ConditionalGlowFlow(..., cond_mode=name)`` then uses it (and
it is also what ``loss.nir.cond_mode`` accepts, checked by ``Config.validate``).

The flow keeps ``W_c`` (``cond_weight``) and ``b`` (``in_bias``) itself and registers the
conditioning as its ``cond_nets`` submodule, so the state-dict keys are those of earlier
versions: ``cond_weight``, ``in_bias``, and ``cond_nets.{i}.{0,2}.{weight,bias}`` for the
condition MLPs of the ``dense_embed*`` modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.nir._fused import DedupLinear, distinct_rows

__all__ = [
    "COND_MODES", "CONDITIONINGS", "Conditioning", "DenseConditioning", "DenseEmbedConditioning",
    "DenseEmbedMultiConditioning", "EndConditioning", "MidConditioning", "StartConditioning",
    "conditioning_class", "register_conditioning",
]

#: Registered conditioning classes by name (``cond_mode``); see :func:`register_conditioning`.
CONDITIONINGS: dict[str, type[Conditioning]] = {}


def register_conditioning(cls: type[Conditioning]) -> type[Conditioning]:
    """Class decorator: make ``cls`` available as ``cond_mode=cls.name``."""
    name = getattr(cls, "name", "")
    if not (isinstance(name, str) and name):
        raise ConfigError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if name in CONDITIONINGS and CONDITIONINGS[name] is not cls:
        raise ConfigError(
            f"cond_mode {name!r} is already registered ({CONDITIONINGS[name].__name__})"
        )
    CONDITIONINGS[name] = cls
    return cls


def conditioning_class(name: str) -> type[Conditioning]:
    """The class registered as ``name``; a ``ConfigError`` listing the choices otherwise."""
    if name not in CONDITIONINGS:
        raise ConfigError(
            f"unknown cond_mode {name!r}; choose one of: {', '.join(CONDITIONINGS)}"
        )
    return CONDITIONINGS[name]


class Conditioning(nn.Module):
    """Base class: the raw condition, as is, into the first layer of every subnet of the blocks
    that :meth:`conditioned_blocks` returns (all by default).

    Subnets are numbered in computation order (subnet ``2k`` is block k's first coupling, ``2k +
    1`` its second); the conditioned ones, in that order, are ``cond_subnets``, and ``cond_slot``
    gives for every subnet its index among them (-1 if unconditioned), which is also its slot
    in ``cond_weight`` and in :meth:`first_layer`'s output.

    Subclasses override :meth:`conditioned_blocks`, :meth:`features` (setting ``feature_dim``
    in ``__init__`` when the features are not the raw condition) or, for anything else,
    :meth:`first_layer`. Parameters created in ``__init__`` are drawn before the flow's own
    (the flow builds its conditioning first).
    """

    #: The ``cond_mode`` this class is registered under.
    name: ClassVar[str] = ""
    #: Whether the flow is FrEIA's ``GLOWCouplingBlock(cond=0)`` on the conditioned blocks (the
    #: raw condition, no learnt features), so that ``load_freia_weights`` applies.
    freia_equivalent: ClassVar[bool] = False

    def __init__(self, num_blocks: int, cond_dim: int, width: int,
                 embed_dim: int | None = None):
        super().__init__()
        del width, embed_dim  # for subclasses with condition networks
        self.cond_dim = int(cond_dim)
        #: Width of the condition features that enter the first layers (``cond_weight``'s
        #: last dimension); the raw condition's by default.
        self.feature_dim = self.cond_dim
        blocks = tuple(int(k) for k in self.conditioned_blocks(int(num_blocks)))
        if not blocks or list(blocks) != sorted(set(blocks)) or not (
            0 <= blocks[0] and blocks[-1] < num_blocks
        ):
            raise ConfigError(
                f"{type(self).__name__}: conditioned blocks must be distinct, sorted and in "
                f"[0, {num_blocks}), got {blocks}"
            )
        self.cond_blocks = blocks
        self.cond_subnets = tuple(s for s in range(2 * num_blocks) if s // 2 in blocks)
        self.cond_slot = tuple(
            self.cond_subnets.index(s) if s in self.cond_subnets else -1
            for s in range(2 * num_blocks)
        )

    def conditioned_blocks(self, num_blocks: int) -> Sequence[int]:
        """The indices of the conditioned blocks (sorted)."""
        return range(num_blocks)

    def features(self, cond: Tensor) -> Tensor:
        """(B, feature_dim): what every conditioned subnet sees of the condition (B, cond_dim)."""
        return cond

    def first_layer(self, cond: Tensor, weight: Tensor, bias: Tensor,
                    dedupe: bool = False) -> Tensor:
        """(B, S_c * W): condition contribution + bias of the first layer of each conditioned
        subnet, all subnets in one matmul (on the distinct feature rows when ``dedupe``: a DML
        batch repeats its proxies).

        ``weight`` is the flow's ``cond_weight (S_c, W, feature_dim)``, ``bias`` its ``in_bias
        (S, W)`` (the first-layer biases of all S subnets)."""
        feat = self.features(cond)
        n_cs, width = weight.shape[0], weight.shape[1]
        if n_cs == bias.shape[0]:
            bias = bias.view(-1)
        else:
            bias = bias[list(self.cond_subnets)].reshape(-1)
        weight = weight.view(n_cs * width, -1)
        groups = distinct_rows(feat) if dedupe and feat.shape[0] > 1 else None
        if groups is None:
            return F.linear(feat, weight, bias)
        return DedupLinear.apply(feat, weight, bias, *groups)

    def extra_repr(self) -> str:
        return f"cond_blocks={self.cond_blocks}, feature_dim={self.feature_dim}"


@register_conditioning
class DenseConditioning(Conditioning):
    """``dense``: the raw condition into every block (the release's flow)."""

    name = "dense"
    freia_equivalent = True


def condition_mlp(cond_dim: int, width: int, embed_dim: int) -> nn.Sequential:
    """``Linear(cond_dim, width) -> ReLU -> Linear(width, embed_dim)`` (PyTorch's init)."""
    return nn.Sequential(nn.Linear(cond_dim, width), nn.ReLU(), nn.Linear(width, embed_dim))


@register_conditioning
class DenseEmbedConditioning(Conditioning):
    """``dense_embed``: one shared condition MLP (:func:`condition_mlp`, output ``embed_dim``,
    default ``cond_dim``) whose output enters every block. The MLPs are this module's children
    ``"0"``, ``"1"``, ... (state-dict keys ``cond_nets.{i}.*`` in the flow)."""

    name = "dense_embed"

    def __init__(self, num_blocks: int, cond_dim: int, width: int,
                 embed_dim: int | None = None):
        super().__init__(num_blocks, cond_dim, width)
        self.feature_dim = self.cond_dim if embed_dim is None else int(embed_dim)
        for i in range(self.num_nets()):
            self.add_module(str(i), condition_mlp(self.cond_dim, int(width), self.feature_dim))

    def num_nets(self) -> int:
        return 1

    @property
    def nets(self) -> list[nn.Module]:
        return [self._modules[str(i)] for i in range(self.num_nets())]

    def features(self, cond: Tensor) -> Tensor:
        return self.nets[0](cond)


@register_conditioning
class DenseEmbedMultiConditioning(DenseEmbedConditioning):
    """``dense_embed_multi``: every conditioned block has its own condition MLP."""

    name = "dense_embed_multi"

    def num_nets(self) -> int:
        return len(self.cond_blocks)

    def first_layer(self, cond: Tensor, weight: Tensor, bias: Tensor,
                    dedupe: bool = False) -> Tensor:
        """As :meth:`Conditioning.first_layer`, one matmul per block (no distinct-row path)."""
        width = weight.shape[1]
        parts = []
        for i, (net, k) in enumerate(zip(self.nets, self.cond_blocks)):
            w = weight[2 * i:2 * i + 2].reshape(2 * width, -1)
            parts.append(F.linear(net(cond), w, bias[2 * k:2 * k + 2].reshape(-1)))
        return torch.cat(parts, dim=1)


class _SingleBlockConditioning(Conditioning):
    """The raw condition into one block only; the others are unconditional."""

    freia_equivalent = True

    def block(self, num_blocks: int) -> int:
        raise NotImplementedError

    def conditioned_blocks(self, num_blocks: int) -> Sequence[int]:
        return (self.block(num_blocks),)


@register_conditioning
class StartConditioning(_SingleBlockConditioning):
    """``start``: only the first block is conditioned."""

    name = "start"

    def block(self, num_blocks: int) -> int:
        return 0


@register_conditioning
class MidConditioning(_SingleBlockConditioning):
    """``mid``: only block ``num_blocks // 2`` is conditioned."""

    name = "mid"

    def block(self, num_blocks: int) -> int:
        return num_blocks // 2


@register_conditioning
class EndConditioning(_SingleBlockConditioning):
    """``end``: only the last block is conditioned."""

    name = "end"

    def block(self, num_blocks: int) -> int:
        return num_blocks - 1


#: The built-in conditioning modes, in registration order.
COND_MODES = tuple(CONDITIONINGS)
