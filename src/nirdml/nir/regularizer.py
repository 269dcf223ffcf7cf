"""``NIRLoss``: Non-isotropy Regularization around any proxy-based loss.

Each L2-normalised embedding ``x_i`` is scored by the conditional flow given the normalised proxy
of its class, ``rho_{y_i}`` (``base_loss.class_proxies``):
``nll_i = 0.5 ||z_i||^2 - log|det J_i|`` with ``z_i = flow(x_i | rho_{y_i})``. Two ways of
combining it with the proxy loss (see ``docs/method.md``):

* ``mode="paper"``:   ``L = L_proxy + weight * mean_i nll_i``
* ``mode="release"``: ``L = mean_i exp(nll_i) + weight * L_proxy`` (the authors' released code,
  the only form with published weights: 0.0075 CUB200, 0.01 Cars196, 0.3 SOP); note that
  ``weight`` multiplies the *proxy* loss here.

The flow, the proxies and the embedding network all get gradients from the NIR term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.nir.flow import ConditionalGlowFlow

#: How the NIR term and the proxy loss are combined (see the module docstring).
NIR_MODES = ("release", "paper")

#: Default ``nll_cap`` of the release mode: exp(50) ~ 5e21 keeps a float32 batch mean finite.
DEFAULT_NLL_CAP = 50.0


def capped_exp(nll: Tensor, cap: float | None) -> Tensor:
    """``exp(nll)``, continued linearly above ``cap``: ``exp(cap) * (1 + nll - cap)``.

    Equal to ``exp(nll)`` (value and gradient) wherever ``nll <= cap``; above the cap the value
    and gradient stay finite (gradient ``exp(cap)``, the largest of the exact branch) instead of
    overflowing to inf. ``cap=None`` is the plain ``exp``.
    """
    if cap is None:
        return torch.exp(nll)
    return torch.exp(nll.clamp(max=cap)) + math.exp(cap) * (nll - cap).clamp(min=0)


class NIRLoss(nn.Module):
    """A proxy loss plus the NIR regulariser, with the proxy-loss ``forward`` contract.

    Args:
        base_loss: a ``nirdml.losses.ProxyLoss`` (anything with ``proxies``, ``embedding_dim``,
            ``num_classes``, ``class_proxies``, ``param_groups`` and ``forward``).
        weight: ``omega`` of the paper mode (multiplies the NIR term) or ``w`` of the release
            mode (multiplies the proxy loss).
        mode: ``"release"`` (default) or ``"paper"``.
        flow: a ``ConditionalGlowFlow`` of dimension ``embedding_dim``; built from
            ``flow_kwargs`` (``ConditionalGlowFlow(embedding_dim, **flow_kwargs)``) when None.
        nll_cap: release mode only. ``exp(nll)`` overflows float32 for nll > 88, which an
            outlier embedding of an untrained flow can reach; above ``nll_cap`` the term is
            continued linearly (see ``capped_exp``), so the loss and its gradient stay finite.
            Below the cap the maths is exactly ``exp(nll)``. ``None`` disables the cap.
            ``last_terms["nll_max"]`` shows how close a batch came.

    ``last_terms`` (detached): ``proxy`` (the base loss), ``nir`` (the NIR term as used: mean
    ``exp(nll)`` or mean ``nll``), ``nll`` (mean nll), ``nll_max``, ``total``, and the base
    loss's own sub-terms prefixed with ``proxy_``.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        weight: float,
        mode: str = "release",
        flow: ConditionalGlowFlow | None = None,
        *,
        nll_cap: float | None = DEFAULT_NLL_CAP,
        **flow_kwargs,
    ):
        super().__init__()
        if mode not in NIR_MODES:
            raise ConfigError(f"unknown NIR mode {mode!r}; choose one of: {', '.join(NIR_MODES)}")
        for attr in ("proxies", "embedding_dim", "num_classes", "class_proxies", "param_groups"):
            if not hasattr(base_loss, attr):
                raise ConfigError(
                    f"NIR needs a proxy loss (a nirdml.losses.ProxyLoss); "
                    f"{type(base_loss).__name__} has no {attr!r}"
                )
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"NIR weight must be a finite number >= 0, got {weight}")
        if nll_cap is not None and not math.isfinite(float(nll_cap)):
            raise ConfigError(f"nll_cap must be a finite number or None, got {nll_cap}")
        if flow is None:
            flow = ConditionalGlowFlow(base_loss.embedding_dim, **flow_kwargs)
        elif flow_kwargs:
            raise ConfigError(
                f"pass either a flow or flow options, not both (got {sorted(flow_kwargs)})"
            )
        if flow.dim != base_loss.embedding_dim or flow.cond_dim != base_loss.embedding_dim:
            raise ConfigError(
                f"flow dimensions (dim={flow.dim}, cond_dim={flow.cond_dim}) must both equal the "
                f"loss's embedding_dim={base_loss.embedding_dim}"
            )
        self.base_loss = base_loss
        self.flow = flow
        self.weight = weight
        self.mode = mode
        self.nll_cap = None if nll_cap is None else float(nll_cap)
        self.num_classes = base_loss.num_classes
        self.embedding_dim = base_loss.embedding_dim
        self.last_terms: dict[str, Tensor] = {}

    @property
    def proxies(self) -> nn.Parameter:
        """The base loss's proxies."""
        return self.base_loss.proxies

    @property
    def proxy_lr_multiplier(self) -> float:
        """The base loss's proxy learning-rate multiplier."""
        return self.base_loss.proxy_lr_multiplier

    def class_proxies(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The base loss's ``class_proxies`` (what the flow is conditioned on)."""
        return self.base_loss.class_proxies(embeddings, labels)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The combined loss (scalar) of a batch of (raw) embeddings and their class labels."""
        proxy_loss = self.base_loss(embeddings, labels)  # validates the inputs (InputError)
        cond = self.base_loss.class_proxies(embeddings, labels)
        emb = embeddings
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()
        nll = self.flow.nll(F.normalize(emb, dim=1), cond)
        nll_mean = nll.mean()
        nll_max = nll.detach().max()
        if self.mode == "release":
            # the cap only costs extra ops when a batch actually reaches it
            capped = self.nll_cap is not None and not bool(nll_max <= self.nll_cap)
            nir = (capped_exp(nll, self.nll_cap) if capped else torch.exp(nll)).mean()
            total = nir + self.weight * proxy_loss
        else:
            nir = nll_mean
            total = proxy_loss + self.weight * nir
        terms = {
            "proxy": proxy_loss,
            "nir": nir,
            "nll": nll_mean,
            "nll_max": nll_max,
            "total": total,
        }
        terms.update(
            {f"proxy_{k}": v for k, v in self.base_loss.last_terms.items() if k != "proxy"}
        )
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def param_groups(
        self,
        lr: float,
        proxy_lr_multiplier: float | None = None,
        flow_lr_multiplier: float = 50.0,
    ) -> list[dict]:
        """The base loss's groups (proxies at ``lr * proxy_lr_multiplier``, the base loss's own
        multiplier when None) plus ``{"name": "flow", lr * flow_lr_multiplier, no decay}``."""
        groups = [dict(g) for g in self.base_loss.param_groups(lr)]
        if proxy_lr_multiplier is not None:
            for g in groups:
                if g.get("name") == "proxies":
                    g["lr"] = lr * float(proxy_lr_multiplier)
        groups.append(
            {
                "name": "flow",
                "params": list(self.flow.parameters()),
                "lr": lr * float(flow_lr_multiplier),
                "weight_decay": 0.0,
            }
        )
        return groups

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, weight={self.weight:g}, nll_cap={self.nll_cap}"
