"""``NIRLoss``: Non-isotropy Regularization around any proxy-based loss, wired from pieces.

Each L2-normalised embedding ``x_i`` is scored by the conditional flow given the normalised proxy
of its class, ``rho_{y_i}`` (``base_loss.class_proxies``): ``z_i = flow(x_i | rho_{y_i})`` and
``nll_i`` is measured under a base distribution (``nirdml.nir.base``: ``N(0, I)``, the paper's,
or a fixed or learnt scale). ``NIRLoss`` only wires four pieces:

* the flow (``nirdml.nir.flow.ConditionalGlowFlow``) and its base distribution;
* a term (``nirdml.nir.terms``, one class per ``loss.nir.mode``: release, paper, selfnorm, disc,
  kl) that turns the NLLs into a loss term and says how it combines with the proxy loss;
* an optional input perturbation in training (``nirdml.nir.perturbation``: gaussian, uniform);
* the flow warm-up: for the first ``warmup_epochs`` the flow fits the *detached* embeddings and
  proxies (call :meth:`set_epoch`); only afterwards does the NIR term reach the embedding
  network.

``NIRLoss.from_options`` builds the pieces from the flat option names of the config section
``loss.nir`` (``docs/method.md``, ``docs/nir_variants.md``). With the defaults (release or paper,
``per_dim=False``, no noise, standard base, no warm-up) the maths is exactly the release's / the
paper's.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.nir.base import BASE_DISTRIBUTIONS, BaseDistribution, StandardNormal
from nirdml.nir.flow import ConditionalGlowFlow
from nirdml.nir.graphs import GraphedNLL
from nirdml.nir.perturbation import PERTURBATIONS, Perturbation
from nirdml.nir.terms import NIR_TERMS, FlowBatch, NIRTerm

#: A sample's NIR gradient weight counts as material above this fraction of the batch's largest.
MATERIAL_FRACTION = 1e-3

#: ``from_options`` arguments that configure NIRLoss itself (the rest: term, flow, base, noise)
_WIRING_OPTIONS = ("warmup_epochs", "flow_lr_multiplier", "cuda_graphs")


def _check_base_loss(base_loss: nn.Module) -> None:
    for attr in ("proxies", "embedding_dim", "num_classes", "class_proxies", "param_groups"):
        if not hasattr(base_loss, attr):
            from nirdml.losses import PROXY_LOSSES

            raise ConfigError(
                f"NIR needs class proxies to condition its flow on, but "
                f"{type(base_loss).__name__} has no {attr!r} (pair-based losses have no "
                f"proxies); use a proxy loss ({', '.join(PROXY_LOSSES)}) or turn NIR off "
                f"(loss.nir.enabled=false)"
            )


def _check_count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise ConfigError(f"invalid value for loss.nir.{name}: {value!r}; must be an integer "
                          f">= {low}")
    return int(value)


def term_options(term_cls: type) -> set[str]:
    """The keyword options a term class takes (its constructor's, minus the weight)."""
    params = inspect.signature(term_cls).parameters
    return {n for n, p in params.items()
            if n != term_cls.weight_option and p.kind is p.KEYWORD_ONLY}


def other_term_options(mode: str) -> set[str]:
    """Options that some registered term takes but mode ``mode``'s does not (e.g. ``negatives``
    for ``paper``): a config may leave them at their defaults only."""
    every = set().union(*(term_options(NIR_TERMS.get(n)) for n in NIR_TERMS.names()))
    return every - term_options(NIR_TERMS.get(mode))


class NIRLoss(nn.Module):
    """A proxy loss plus the NIR regulariser, with the proxy-loss ``forward`` contract.

    Args:
        base_loss: a ``nirdml.losses.ProxyLoss`` (anything with ``proxies``, ``embedding_dim``,
            ``num_classes``, ``class_proxies``, ``param_groups`` and ``forward``).
        term: a :class:`~nirdml.nir.terms.NIRTerm` (e.g. ``ReleaseTerm(proxy_weight=0.0075)``,
            ``PaperTerm(weight=0.01)``): the NIR term and how it joins the proxy loss.
        flow: a ``ConditionalGlowFlow`` of dimension ``embedding_dim`` (default: the paper's,
            ``ConditionalGlowFlow(embedding_dim)``).
        base: the flow's base distribution (default ``StandardNormal``, the paper's).
        perturbation: input noise in training (default none).
        warmup_epochs: epochs during which the flow only fits detached inputs.
        flow_lr_multiplier: the flow's learning rate is ``lr * flow_lr_multiplier`` in
            :meth:`param_groups` (the release: 50, SOP 1).
        cuda_graphs: on a GPU, replay the NLL's forward and backward from CUDA graphs (the
            flow is launch-bound there); eager on the CPU and for new shapes.

    ``last_terms`` (detached): ``proxy`` (the base loss), ``nir`` (the NIR term as combined),
    ``nll`` (mean per-sample NLL in nats), ``nll_max``, ``material`` (fraction of the batch whose
    NIR gradient weight is above :data:`MATERIAL_FRACTION` of the largest), ``total``, the
    term's own records (``ce``, ``nll_gap``, ``log_nn``), with a learnt base
    ``base_log_scale``, and the base loss's own sub-terms prefixed with ``proxy_``.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        term: NIRTerm,
        flow: ConditionalGlowFlow | None = None,
        *,
        base: BaseDistribution | None = None,
        perturbation: Perturbation | None = None,
        warmup_epochs: int = 0,
        flow_lr_multiplier: float = 50.0,
        cuda_graphs: bool = False,
    ):
        super().__init__()
        _check_base_loss(base_loss)
        if not isinstance(term, NIRTerm):
            raise ConfigError(f"term must be a NIRTerm (nirdml.nir.terms), got "
                              f"{type(term).__name__}; NIRLoss.from_options builds one by name")
        if flow is None:
            flow = ConditionalGlowFlow(base_loss.embedding_dim)
        if flow.dim != base_loss.embedding_dim or flow.cond_dim != base_loss.embedding_dim:
            raise ConfigError(
                f"flow dimensions (dim={flow.dim}, cond_dim={flow.cond_dim}) must both equal the "
                f"loss's embedding_dim={base_loss.embedding_dim}"
            )
        self.base_loss = base_loss
        self.flow = flow
        self.term = term
        self.base = StandardNormal(flow.dim) if base is None else base
        self.perturbation = perturbation
        self.warmup_epochs = _check_count("warmup_epochs", warmup_epochs, 0)
        self.flow_lr_multiplier = float(flow_lr_multiplier)
        if not (math.isfinite(self.flow_lr_multiplier) and self.flow_lr_multiplier >= 0):
            raise ConfigError(f"invalid value for loss.nir.flow_lr_multiplier: "
                              f"{flow_lr_multiplier}; must be a finite number >= 0")
        self.num_classes = base_loss.num_classes
        self.embedding_dim = base_loss.embedding_dim
        self.fitting_only = False  # True during the flow warm-up (see set_epoch)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphed = GraphedNLL(self, self._nll) if self.cuda_graphs else None
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    @classmethod
    def from_options(cls, base_loss: nn.Module, weight: float, mode: str = "release",
                     flow: ConditionalGlowFlow | None = None, *, noise: float = 0.0,
                     noise_kind: str = "gaussian", base_scale: str = "standard",
                     **options) -> NIRLoss:
        """Build the pieces from the flat options of the config section ``loss.nir``.

        ``weight`` goes to the term's weight option (``ReleaseTerm``: its ``proxy_weight``);
        ``mode``, ``base_scale`` and ``noise_kind`` are registered names (``NIR_TERMS``,
        ``BASE_DISTRIBUTIONS``, ``PERTURBATIONS``); ``noise`` is the perturbation's scale (0:
        none). The other ``options`` are the term's own (``per_dim``, ``negatives``,
        ``nll_weight``, ``nll_cap``), NIRLoss's (``warmup_epochs``, ``flow_lr_multiplier``,
        ``cuda_graphs``) and, without ``flow``, the flow's (``num_blocks``, ...,
        ``cond_mode``). An option that none of them takes is a ConfigError.
        """
        _check_base_loss(base_loss)
        term_cls = NIR_TERMS.get(mode)
        wiring = {k: options.pop(k) for k in _WIRING_OPTIONS if k in options}
        own = term_options(term_cls)
        term_kw = {k: options.pop(k) for k in list(options) if k in own}
        flow_kw = {k: options.pop(k) for k in list(options)
                   if k in inspect.signature(ConditionalGlowFlow).parameters}
        if options:
            raise ConfigError(
                f"unknown NIR option(s) {', '.join(sorted(options))} for mode {mode!r}; it takes "
                f"{', '.join(sorted(own | set(_WIRING_OPTIONS)))} and the flow's sizes")
        if flow is None:
            flow = ConditionalGlowFlow(base_loss.embedding_dim, **flow_kw)
        elif flow_kw:
            raise ConfigError(
                f"pass either a flow or flow options, not both (got {sorted(flow_kw)})"
            )
        term = term_cls(**{term_cls.weight_option: weight}, **term_kw)
        perturbation_cls = PERTURBATIONS.get(noise_kind)
        perturbation = perturbation_cls(noise)
        base = BASE_DISTRIBUTIONS.get(base_scale)(flow.dim)
        return cls(base_loss, term, flow, base=base,
                   perturbation=perturbation if perturbation.scale > 0 else None, **wiring)

    # ------------------------------------------------------------------ the base loss's API
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

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch (0-based): the flow warm-up switch."""
        self.fitting_only = epoch < self.warmup_epochs

    # ------------------------------------------------------------------ the NLL
    def nll(self, x: Tensor, cond: Tensor) -> Tensor:
        """Per-sample NLL in nats (constant ``D/2 log 2 pi`` dropped) of unit vectors ``x`` given
        normalised conditions ``cond``, under the flow and its base distribution (replayed from
        CUDA graphs with ``cuda_graphs=True`` on a GPU, ``nirdml.nir.graphs``)."""
        if self._graphed is not None:
            return self._graphed(x, cond)
        return self._nll(x, cond)

    def _nll(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.base.nll(*self.flow(x, cond))

    def _flow_input(self, embeddings: Tensor) -> Tensor:
        emb = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) \
            else embeddings
        x = F.normalize(emb, dim=1)
        if self.perturbation is not None and self.training:
            x = self.perturbation(x)
        return x

    def _other_proxies(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cond = self.base_loss.class_proxies(embeddings, labels)
        return cond.detach() if self.fitting_only else cond

    # ------------------------------------------------------------------ the objective
    def objective(self, embeddings: Tensor, labels: Tensor
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(proxy_part, nir_part, terms)`` with ``loss = proxy_part + nir_part``, each part
        carrying its own weight (as :meth:`forward` combines them); ``terms`` are undetached."""
        proxy_loss = self.base_loss(embeddings, labels)  # validates the inputs (InputError)
        base_terms = dict(self.base_loss.last_terms)
        cond = self.base_loss.class_proxies(embeddings, labels)
        x = self._flow_input(embeddings)
        if self.fitting_only:
            x, cond = x.detach(), cond.detach()
        batch = FlowBatch(embeddings, labels, x, cond, self.nll, self._other_proxies)
        nir, nll, grad_weight, extra = self.term.value(batch)
        proxy_part, nir_part = self.term.combine(proxy_loss, nir)
        material = (grad_weight > MATERIAL_FRACTION * grad_weight.max()).float().mean()
        terms = {"proxy": proxy_loss, "nir": nir, "nll": nll.mean(), "nll_max": nll.max(),
                 "material": material, **extra}
        if self.base.learnt_scale is not None:
            terms["base_log_scale"] = self.base.learnt_scale
        terms.update({f"proxy_{k}": v for k, v in base_terms.items() if k != "proxy"})
        return proxy_part, nir_part, terms

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The combined loss (scalar) of a batch of (raw) embeddings and their class labels."""
        proxy_part, nir_part, terms = self.objective(embeddings, labels)
        total = nir_part + proxy_part  # float addition commutes: the order is immaterial
        terms["total"] = total
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def param_groups(
        self,
        lr: float,
        proxy_lr_multiplier: float | None = None,
        flow_lr_multiplier: float | None = None,
    ) -> list[dict]:
        """The base loss's groups (proxies at ``lr * proxy_lr_multiplier``, the base loss's own
        multiplier when None) plus ``{"name": "flow", lr * flow_lr_multiplier, no decay}``
        (this loss's ``flow_lr_multiplier`` when None; a learnt base scale trains with it)."""
        groups = [dict(g) for g in self.base_loss.param_groups(lr)]
        if proxy_lr_multiplier is not None:
            for g in groups:
                if g.get("name") == "proxies":
                    g["lr"] = lr * float(proxy_lr_multiplier)
        mult = self.flow_lr_multiplier if flow_lr_multiplier is None else float(flow_lr_multiplier)
        params = [*self.flow.parameters(), *self.base.parameters()]
        groups.append({"name": "flow", "params": params, "lr": lr * mult, "weight_decay": 0.0})
        return groups

    def extra_repr(self) -> str:
        parts = [f"term={self.term!r}"]
        if self.perturbation is not None:
            parts.append(f"perturbation={self.perturbation!r}")
        if self.warmup_epochs:
            parts.append(f"warmup_epochs={self.warmup_epochs}")
        return ", ".join(parts)


def _rename_old_keys(state_dict, prefix, *args) -> None:
    """Checkpoints of nirdml 0.1 before the pieces held a learnt base scale as
    ``base_log_scale``; it is now ``base.log_scale``."""
    old = prefix + "base_log_scale"
    if old in state_dict:
        state_dict[prefix + "base.log_scale"] = state_dict.pop(old)
