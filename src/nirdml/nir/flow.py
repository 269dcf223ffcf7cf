"""``ConditionalGlowFlow``: the conditional normalizing flow of NIR (Roth et al., CVPR 2022).

Maths (see ``docs/method.md``): ``num_blocks`` blocks, each a fixed permutation of the ``dim``
coordinates (block k uses ``numpy.random.RandomState(k).permutation(dim)``) followed by a GLOW
affine coupling. With ``l1 = round(dim / 2)`` (Python rounding, half to even), ``x1 = x[:l1]``,
``x2 = x[l1:]`` and the soft clamp ``clamp(u) = C * 0.636 * atan(u)``::

    (s2, t2) = subnet_a([x2, c]);  y1 = exp(clamp(s2)) * x1 + t2
    (s1, t1) = subnet_b([y1, c]);  y2 = exp(clamp(s1)) * x2 + t1
    log_det += sum(clamp(s1)) + sum(clamp(s2))

Each subnet is an MLP of ``subnet_depth`` Linear layers (hidden width ``subnet_width``, ReLU
between them, PyTorch's default init); its output is ``[scale, shift]`` in that order. This is
the same maths as FrEIA's ``PermuteRandom(seed=k)`` + ``GLOWCouplingBlock(clamp_activation=
"ATAN")`` (FrEIA's ``subnet2`` is our first coupling ``a``, its ``subnet1`` our ``b``);
``load_freia_weights`` copies a FrEIA model in and tests use FrEIA as the numerical oracle.

Conditioning (``cond_mode``): which blocks see the condition and through which features is a
``nirdml.nir.conditioning.Conditioning`` (one class per mode, registered by name); the flow only
consumes its ``cond_blocks`` and the condition part of the conditioned subnets' first layers.

Speed (the flow runs once per training step next to a proxy loss; see
``benchmarks/bench_objective.py``):

* The first Linear of every subnet acts on ``[h, c]``; it is computed as
  ``h @ W_h^T + (c @ W_c^T + b)`` and the condition part of *all* conditioned subnets is one
  matmul per forward, on the distinct condition rows only when on the CPU (a DML batch holds
  several samples per class, so the proxies repeat). Parameters are stored split accordingly
  (``w_in`` / ``cond_weight`` / ``in_bias``); a subnet's hidden layers are one tensor.
* By default (``fused=True``) the whole flow runs inside one ``torch.autograd.Function`` with a
  hand-written backward (``nirdml.nir._fused``): no autograd graph of ~300 nodes, permutations
  by ``index_select`` (FrEIA's advanced indexing and its scatter-add backward cost more),
  activations in a workspace reused across steps, and a subnet's hidden-layer weight gradients
  from one batched matmul. The fused backward is first-order only; ``fused=False`` is the
  plain autograd implementation (double backward, e.g. gradient penalties). Both give the same
  numbers up to float rounding.

Numerics: the flow always runs in its parameters' dtype (float32 by default) with autocast
disabled: inputs are cast to it (float16/bfloat16 are upcast), outputs come back in it.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError, InputError
from nirdml.nir._fused import ATAN_SCALE, FusedFlow, Plan, WorkspacePool
from nirdml.nir.base import standard_normal_nll
from nirdml.nir.conditioning import COND_MODES, Conditioning, conditioning_class

__all__ = ["COND_MODES", "ConditionalGlowFlow", "block_permutation"]


def _autocast_off(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


def _linear_init_(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Linear.reset_parameters`` on a given (out, in) weight: same RNG draws, same order."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def soft_clamp(u: Tensor, clamp: float) -> Tensor:
    """FrEIA's "ATAN" soft clamp of the log-scales: ``clamp * 0.636 * atan(u)``."""
    return clamp * (ATAN_SCALE * torch.atan(u))


def block_permutation(dim: int, seed: int) -> np.ndarray:
    """The permutation of block ``seed``: ``RandomState(seed).permutation(dim)`` (global numpy
    RNG untouched; identical to what FrEIA's ``PermuteRandom(seed=seed)`` draws)."""
    return np.random.RandomState(seed).permutation(dim)


def _check_sizes(dim, cond_dim, num_blocks, subnet_depth, subnet_width, clamp) -> int:
    """Validate the flow's size arguments; returns ``cond_dim`` (``dim`` when None)."""
    if int(dim) < 2:
        raise ConfigError(f"the flow needs dim >= 2 (it splits x in two halves), got {dim}")
    cond_dim = int(dim) if cond_dim is None else int(cond_dim)
    checks = {
        "cond_dim": (cond_dim, 1),
        "num_blocks": (num_blocks, 1),
        "subnet_depth": (subnet_depth, 2),
        "subnet_width": (subnet_width, 1),
    }
    for name, (value, low) in checks.items():
        if isinstance(value, bool) or int(value) != value or int(value) < low:
            raise ConfigError(f"invalid value for loss.nir.{name}: {value!r}; must be an "
                              f"integer >= {low}")
    if not (math.isfinite(clamp) and clamp > 0):
        raise ConfigError(f"invalid value for loss.nir.clamp: {clamp}; must be a finite "
                          f"number > 0")
    return cond_dim


class ConditionalGlowFlow(nn.Module):
    """Conditional GLOW-coupling normalizing flow ``x -> z`` (the paper's ``tau^-1``).

    Args:
        dim: data dimension D (>= 2).
        cond_dim: condition dimension (defaults to ``dim``).
        num_blocks: number of (permutation + coupling) blocks (5).
        subnet_depth: Linear layers per subnet (8, >= 2).
        subnet_width: hidden width of the subnets (128).
        clamp: soft-clamp constant C of ``C * 0.636 * atan(s)`` (2.0).
        cond_mode: the name of a registered conditioning (``nirdml.nir.conditioning``; the
            built-in ones are ``COND_MODES``; ``"dense"``).
        cond_embed_dim: output size of the condition MLPs of the ``dense_embed*`` modes
            (defaults to ``cond_dim``); the MLPs are ``Linear(cond_dim, subnet_width) -> ReLU ->
            Linear(subnet_width, cond_embed_dim)``.
        fused: use the hand-written fused backward (default) or plain autograd.

    Parameters (S = 2 * num_blocks subnets in computation order; subnet ``2k`` is block k's
    first coupling, which transforms ``x1`` from ``[x2, c]``): ``in_bias (S, W)``,
    ``cond_weight (S_c, W, cond_in)`` for the S_c conditioned subnets, and per subnet
    ``w_in.{s} (W, n_in)``, ``w_hidden.{s} (depth-2, W, W)``, ``b_hidden.{s} (depth-2, W)``,
    ``w_out.{s} (2 n_out, W)``, ``b_out.{s}``; the conditioning module is ``cond_nets`` (its
    condition MLPs, if any: ``cond_nets.{i}.*``). The permutations are the buffer
    ``perms (num_blocks, dim)`` (saved in the state dict).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int | None = None,
        num_blocks: int = 5,
        subnet_depth: int = 8,
        subnet_width: int = 128,
        clamp: float = 2.0,
        cond_mode: str = "dense",
        *,
        cond_embed_dim: int | None = None,
        fused: bool = True,
    ):
        super().__init__()
        conditioning_cls = conditioning_class(cond_mode)
        cond_dim = _check_sizes(dim, cond_dim, num_blocks, subnet_depth, subnet_width, clamp)
        self.dim = int(dim)
        self.cond_dim = cond_dim
        self.num_blocks = int(num_blocks)
        self.subnet_depth = int(subnet_depth)
        self.subnet_width = int(subnet_width)
        self.clamp = float(clamp)
        self.cond_mode = cond_mode
        self.fused = bool(fused)
        l1 = round(self.dim / 2)  # Python round: half to even, as FrEIA's round(0.5 * D)
        self.split = (l1, self.dim - l1)

        # the conditioning first: its condition networks draw their initial weights before the
        # subnets (reset_parameters). Registered as ``cond_nets``: the keys of earlier versions.
        self.cond_nets = conditioning_cls(self.num_blocks, cond_dim, self.subnet_width,
                                          cond_embed_dim)
        self.cond_blocks = self.cond_nets.cond_blocks
        self.cond_embed_dim = self.cond_nets.feature_dim
        self._cond_slot = self.cond_nets.cond_slot
        self._pool = WorkspacePool()
        self._plan = Plan(self.num_blocks, self.split, self.subnet_depth, self.subnet_width,
                          self.clamp, self._cond_slot)

        perms = np.stack([block_permutation(self.dim, k) for k in range(self.num_blocks)])
        self.register_buffer("perms", torch.as_tensor(perms, dtype=torch.long))
        self.register_buffer("inv_perms", torch.argsort(self.perms, dim=1), persistent=False)
        self.register_load_state_dict_post_hook(ConditionalGlowFlow._refresh_inverse)
        self._create_subnet_parameters()
        self.reset_parameters()

    @property
    def conditioning(self) -> Conditioning:
        """The conditioning module (``nirdml.nir.conditioning``; registered as ``cond_nets``)."""
        return self.cond_nets

    def _create_subnet_parameters(self) -> None:
        """Empty parameters of the S = 2 * num_blocks subnets (filled by reset_parameters)."""
        width, nh, n_sub = self.subnet_width, self.subnet_depth - 2, 2 * self.num_blocks
        self.in_bias = nn.Parameter(torch.empty(n_sub, width))
        self.cond_weight = nn.Parameter(
            torch.empty(len(self.cond_nets.cond_subnets), width, self.cond_embed_dim)
        )
        self.w_in = nn.ParameterList()
        self.w_hidden = nn.ParameterList()
        self.b_hidden = nn.ParameterList()
        self.w_out = nn.ParameterList()
        self.b_out = nn.ParameterList()
        for s in range(n_sub):
            n_in, n_out = (self.split[1], self.split[0]) if s % 2 == 0 else self.split
            self.w_in.append(nn.Parameter(torch.empty(width, n_in)))
            self.w_hidden.append(nn.Parameter(torch.empty(nh, width, width)))
            self.b_hidden.append(nn.Parameter(torch.empty(nh, width)))
            self.w_out.append(nn.Parameter(torch.empty(2 * n_out, width)))
            self.b_out.append(nn.Parameter(torch.empty(2 * n_out)))

    # ------------------------------------------------------------------ setup
    def reset_parameters(self) -> None:
        """PyTorch's default Linear init, drawn in FrEIA's order (per block: its ``subnet1`` =
        our second coupling, then ``subnet2``; per subnet the layers in order), so a FrEIA model
        built after the same ``torch.manual_seed`` starts from the same weights."""
        width = self.subnet_width
        with torch.no_grad():
            for k in range(self.num_blocks):
                for s in (2 * k + 1, 2 * k):
                    slot = self._cond_slot[s]
                    n_in = self.w_in[s].shape[1]
                    n_c = self.cond_embed_dim if slot >= 0 else 0
                    first = torch.empty(width, n_in + n_c)
                    _linear_init_(first, self.in_bias[s])
                    self.w_in[s].copy_(first[:, :n_in])
                    if slot >= 0:
                        self.cond_weight[slot].copy_(first[:, n_in:])
                    for i in range(self.subnet_depth - 2):
                        _linear_init_(self.w_hidden[s][i], self.b_hidden[s][i])
                    _linear_init_(self.w_out[s], self.b_out[s])

    def _apply(self, fn, *args, **kwargs):
        self._pool.clear()  # cached workspaces have the old dtype/device
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _refresh_inverse(module: ConditionalGlowFlow, incompatible_keys) -> None:
        with torch.no_grad():
            module.inv_perms.copy_(torch.argsort(module.perms, dim=1))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, cond_dim={self.cond_dim}, num_blocks={self.num_blocks}, "
            f"subnet_depth={self.subnet_depth}, subnet_width={self.subnet_width}, "
            f"clamp={self.clamp:g}, cond_mode={self.cond_mode!r}, fused={self.fused}"
        )

    # ------------------------------------------------------------------ inputs
    def _prepare(self, x, cond, name: str = "x") -> tuple[Tensor, Tensor]:
        ref = self.in_bias
        if not isinstance(x, Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise InputError(
                f"{name} must have shape (batch >= 1, {self.dim}), got {tuple(x.shape)}"
            )
        if cond is None:
            raise InputError(
                f"the flow is conditional (cond_mode={self.cond_mode!r}): pass cond of shape "
                f"(batch, {self.cond_dim})"
            )
        if not isinstance(cond, Tensor):
            raise InputError(f"cond must be a torch.Tensor, got {type(cond).__name__}")
        if cond.ndim != 2 or cond.shape != (x.shape[0], self.cond_dim):
            raise InputError(
                f"cond must have shape ({x.shape[0]}, {self.cond_dim}) (one condition per row "
                f"of {name}), got {tuple(cond.shape)}"
            )
        for t, n in ((x, name), (cond, "cond")):
            if not t.dtype.is_floating_point:
                raise InputError(f"{n} must be floating point, got dtype {t.dtype}")
            if t.device != ref.device:
                raise InputError(
                    f"{n} is on {t.device} but the flow's parameters are on {ref.device}; "
                    "move one of them"
                )
        # compute in the parameters' dtype (float32 unless the flow was converted), so
        # float16/bfloat16 inputs are upcast
        return x.to(ref.dtype), cond.to(ref.dtype)

    def _cond_part(self, cond: Tensor, dedupe: bool = False) -> Tensor:
        """(B, S_c * W): condition contribution + bias of the first layer of each conditioned
        subnet (``Conditioning.first_layer``; on the distinct condition rows when ``dedupe``)."""
        return self.cond_nets.first_layer(cond, self.cond_weight, self.in_bias, dedupe)

    # ------------------------------------------------------------------ plain implementation
    def _subnet(self, s: int, inp: Tensor, cpart: Tensor, hidden) -> Tensor:
        slot = self._cond_slot[s]
        width = self.subnet_width
        first_bias = self.in_bias[s] if slot < 0 else cpart[:, slot * width:(slot + 1) * width]
        h = torch.relu(torch.addmm(first_bias, inp, self.w_in[s].t()))
        for w, b in zip(*hidden[s]):
            h = torch.relu(F.linear(h, w, b))
        return F.linear(h, self.w_out[s], self.b_out[s])

    def _hidden_layers(self) -> list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        """Per subnet: (weights, biases) of its hidden layers, via ``unbind`` (one autograd
        node; indexing each layer would build a full-size zero gradient per layer)."""
        return [
            (w.unbind(0), b.unbind(0))
            for w, b in zip(self.w_hidden, self.b_hidden)
        ]

    def _coupling(self, s: int, given: Tensor, active: Tensor, cpart: Tensor, hidden,
                  inverse: bool = False) -> tuple[Tensor, Tensor]:
        """One affine coupling, the only place the plain path writes its maths: subnet ``s``
        reads ``given`` and returns ``[raw, t]``; ``log_s = clamp * 0.636 * atan(raw)``;
        forward ``active -> exp(log_s) * active + t``, inverse ``(active - t) * exp(-log_s)``.
        Returns ``(transformed, log_s)``. (The fused kernel computes the same forward in place
        and its derivative by hand; tests check it against this path.)"""
        out = self._subnet(s, given, cpart, hidden)
        n = active.shape[1]
        log_s = soft_clamp(out[:, :n], self.clamp)
        if inverse:
            return (active - out[:, n:]) * torch.exp(-log_s), log_s
        return torch.exp(log_s) * active + out[:, n:], log_s

    def _forward_plain(self, x: Tensor, cpart: Tensor) -> tuple[Tensor, Tensor]:
        l1 = self.split[0]
        hidden = self._hidden_layers()
        log_det = x.new_zeros(x.shape[0])
        h = x
        for k in range(self.num_blocks):
            h = h.index_select(1, self.perms[k])
            x1, x2 = h[:, :l1], h[:, l1:]
            y1, s2 = self._coupling(2 * k, x2, x1, cpart, hidden)
            y2, s1 = self._coupling(2 * k + 1, y1, x2, cpart, hidden)
            log_det = log_det + s2.sum(1) + s1.sum(1)
            h = torch.cat([y1, y2], dim=1)
        return h, log_det

    # ------------------------------------------------------------------ public API
    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x -> (z, log_det)``: z (B, D) and the per-sample log |det dz/dx| (B,)."""
        x, cond = self._prepare(x, cond)
        with _autocast_off(x.device):
            if not self.fused:
                return self._forward_plain(x, self._cond_part(cond))
            # distinct-row trick: worth it on the CPU; on accelerators the matmul is cheap and
            # torch.unique would synchronise
            cpart = self._cond_part(cond, dedupe=x.device.type == "cpu")
            params = (self.in_bias, *self.w_in, *self.w_hidden, *self.b_hidden, *self.w_out,
                      *self.b_out)
            track = torch.is_grad_enabled() and (
                x.requires_grad or cpart.requires_grad or any(p.requires_grad for p in params)
            )
            return FusedFlow.apply(self._plan, self._pool, track, x, cpart, self.perms,
                                   self.inv_perms, *params)

    def inverse(self, z: Tensor, cond: Tensor | None = None, return_log_det: bool = False):
        """``z -> x`` (the paper's tau). With ``return_log_det`` also log |det dx/dz| (B,),
        which is minus the forward log-det at that x."""
        z, cond = self._prepare(z, cond, name="z")
        l1 = self.split[0]
        with _autocast_off(z.device):
            cpart = self._cond_part(cond)
            hidden = self._hidden_layers()
            log_det = z.new_zeros(z.shape[0])
            h = z
            for k in range(self.num_blocks - 1, -1, -1):
                y1, y2 = h[:, :l1], h[:, l1:]
                x2, s1 = self._coupling(2 * k + 1, y1, y2, cpart, hidden, inverse=True)
                x1, s2 = self._coupling(2 * k, x2, y1, cpart, hidden, inverse=True)
                log_det = log_det - s1.sum(1) - s2.sum(1)
                h = torch.cat([x1, x2], dim=1).index_select(1, self.inv_perms[k])
        return (h, log_det) if return_log_det else h

    def nll(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Per-sample ``0.5 ||z||^2 - log_det`` (B,): the NLL without the constant
        ``0.5 * D * log(2 pi)``, as in the paper."""
        return standard_normal_nll(*self(x, cond))

    def log_prob(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """Per-sample log-density of x (B,) under the flow with a standard-normal base."""
        return -self.nll(x, cond) - 0.5 * self.dim * math.log(2.0 * math.pi)

    def sample(self, cond: Tensor, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """One sample per condition row: ``inverse(temperature * N(0, I), cond)``."""
        if not isinstance(cond, Tensor) or cond.ndim != 2:
            raise InputError(
                f"cond must be a (batch, {self.cond_dim}) tensor, got "
                f"{tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__}"
            )
        ref = self.in_bias
        z = torch.randn(cond.shape[0], self.dim, generator=generator, dtype=ref.dtype,
                        device=ref.device)
        return self.inverse(z * float(temperature), cond)

    # ------------------------------------------------------------------ FrEIA interop
    def load_freia_weights(self, inn: nn.Module) -> None:
        """Copy the weights of an equivalent FrEIA ``SequenceINN`` (``PermuteRandom(seed=k)`` +
        ``GLOWCouplingBlock`` per block, subnets = ``nn.Sequential`` of Linear/ReLU) into this
        flow. Only for the raw-condition modes (``dense``, ``start``, ``mid``, ``end``)."""
        if not self.cond_nets.freia_equivalent:
            raise ConfigError(f"cond_mode {self.cond_mode!r} has no FrEIA equivalent")
        mods = list(inn.children())
        mods = list(mods[0]) if len(mods) == 1 and isinstance(mods[0], nn.ModuleList) else mods
        couplings = [m for m in mods if hasattr(m, "subnet1") and hasattr(m, "subnet2")]
        perm_mods = [m for m in mods if hasattr(m, "perm")]
        if len(couplings) != self.num_blocks or len(perm_mods) != self.num_blocks:
            raise ConfigError(
                f"expected {self.num_blocks} permutation + coupling blocks, found "
                f"{len(perm_mods)} permutations and {len(couplings)} couplings"
            )
        with torch.no_grad():
            for k, (pm, block) in enumerate(zip(perm_mods, couplings)):
                if not torch.equal(pm.perm.detach().cpu().long(), self.perms[k].cpu()):
                    raise ConfigError(f"block {k}: the FrEIA permutation differs from ours")
                for s, net in ((2 * k, block.subnet2), (2 * k + 1, block.subnet1)):
                    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
                    if len(layers) != self.subnet_depth:
                        raise ConfigError(
                            f"subnet {s}: {len(layers)} Linear layers, expected "
                            f"{self.subnet_depth}"
                        )
                    n_in = self.w_in[s].shape[1]
                    slot = self._cond_slot[s]
                    expect = n_in + (self.cond_dim if slot >= 0 else 0)
                    if layers[0].weight.shape != (self.subnet_width, expect):
                        raise ConfigError(
                            f"subnet {s}: first layer has shape "
                            f"{tuple(layers[0].weight.shape)}, expected "
                            f"{(self.subnet_width, expect)}"
                        )
                    self.w_in[s].copy_(layers[0].weight[:, :n_in])
                    if slot >= 0:
                        self.cond_weight[slot].copy_(layers[0].weight[:, n_in:])
                    self.in_bias[s].copy_(layers[0].bias)
                    for i, lin in enumerate(layers[1:-1]):
                        self.w_hidden[s][i].copy_(lin.weight)
                        self.b_hidden[s][i].copy_(lin.bias)
                    self.w_out[s].copy_(layers[-1].weight)
                    self.b_out[s].copy_(layers[-1].bias)
