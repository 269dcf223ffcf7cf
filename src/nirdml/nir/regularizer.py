"""``NIRLoss``: Non-isotropy Regularization around any proxy-based loss.

Each L2-normalised embedding ``x_i`` is scored by the conditional flow given the normalised proxy
of its class, ``rho_{y_i}`` (``base_loss.class_proxies``):
``nll_i = 0.5 ||z_i||^2 / sigma^2 + D log sigma - log|det J_i|``, ``z_i = flow(x_i | rho_{y_i})``,
under the base ``N(0, sigma^2 I)`` (``sigma = 1``, the paper's, unless ``base_scale`` says so).
``u_i`` is ``nll_i``, or ``nll_i / D`` (nats per dimension) with ``per_dim=True``.
How the NIR term and the proxy loss are combined (``mode``; see ``docs/method.md`` and
``docs/nir_variants.md``):

* ``"release"``:  ``L = mean_i exp(u_i) + weight * L_proxy`` (the authors' released code, the only
  form with published weights: 0.0075 CUB200, 0.01 Cars196, 0.3 SOP); ``weight`` multiplies the
  *proxy* loss here.
* ``"paper"``:    ``L = L_proxy + weight * mean_i u_i``.
* ``"selfnorm"``: ``L = L_proxy + weight * log mean_i exp(u_i)``: the release's exp weighting,
  normalised over the batch. Its gradient gives sample i the weight ``softmax(u)_i`` (the release
  gives ``exp(u_i) / B``), so it cannot vanish when every ``u_i`` is very negative.
* ``"disc"``:     ``L = L_proxy + weight * (mean_i CE_i + nll_weight * mean_i u_i)`` with
  ``CE_i = -log softmax_c(-u_i(c))`` over the own class and ``negatives`` other classes of the
  batch (drawn per sample), ``u_i(c)`` the (per-dim) NLL of ``x_i`` given ``rho_c``: each
  embedding must be more likely under its own proxy than under others (a generative flow
  classifier). Shrinking the embeddings earns nothing under the CE. Costs ``1 + negatives`` flow
  evaluations per sample.
* ``"kl"``:       ``L = L_proxy + weight * (mean_i u_i - s * mean_i log ||x_i - x_n(i)||)``,
  ``x_n(i)`` the nearest other sample of i's class in the batch, ``s = 1`` with ``per_dim``
  else ``D`` (samples alone of their class in the batch leave the second term). The second term is
  the Kozachenko-Leonenko estimate of the within-class entropy (up to constants), so the sum
  estimates ``KL(embeddings | flow)`` instead of the paper's cross-entropy: shrinking a class
  lowers the NLL but raises the KL by as much, so collapse earns nothing and the flow's density
  must be matched by the embeddings' spread.

Options that act before the combination (all modes):

* ``noise > 0``: in training, ``x <- normalize(x + e)`` with ``e ~ N(0, noise^2 I)``
  (``noise_kind="gaussian"``) or ``U(-noise, noise)^D`` (``"uniform"``, the release's unused
  ``loss_nir_noise``). Noise bounds the density any flow can reach on the data.
* ``base_scale``: ``"standard"`` (``sigma = 1``), ``"sphere"`` (``sigma = 1 / sqrt(D)``, the
  per-coordinate spread of a unit vector, so the flow need not learn a global ``sqrt(D)``
  expansion) or ``"learned"`` (one learnt ``log sigma``, initialised at the sphere's).
* ``warmup_epochs``: for the first epochs the flow fits the *detached* embeddings and proxies
  (call :meth:`set_epoch`); only afterwards does the NIR term reach the embedding network.

With the defaults (``mode`` release or paper, ``per_dim=False``, no noise, standard base, no
warm-up) the maths is exactly the paper's / the release's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.nir.flow import ConditionalGlowFlow
from nirdml.nir.graphs import GraphedNLL
from nirdml.nir.names import BASE_SCALES, NIR_MODES, NOISE_KINDS

#: Default ``nll_cap`` of the release mode: exp(50) ~ 5e21 keeps a float32 batch mean finite.
DEFAULT_NLL_CAP = 50.0

#: A sample's NIR gradient weight counts as material above this fraction of the batch's largest.
MATERIAL_FRACTION = 1e-3


def capped_exp(nll: Tensor, cap: float | None) -> Tensor:
    """``exp(nll)``, continued linearly above ``cap``: ``exp(cap) * (1 + nll - cap)``.

    Equal to ``exp(nll)`` (value and gradient) wherever ``nll <= cap``; above the cap the value
    and gradient stay finite (gradient ``exp(cap)``, the largest of the exact branch) instead of
    overflowing to inf. ``cap=None`` is the plain ``exp``.
    """
    if cap is None:
        return torch.exp(nll)
    return torch.exp(nll.clamp(max=cap)) + math.exp(cap) * (nll - cap).clamp(min=0)


def within_class_log_nn(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_nn, has_nn)``: per sample, the log Euclidean distance to the nearest other sample of
    its class in the batch, and whether it has one (``log_nn`` is 0 where it has none).
    Distances are floored at 1e-6 so coincident samples stay finite."""
    labels = torch.as_tensor(labels, device=x.device).reshape(-1)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    norms = x.square().sum(1)
    sq = norms[:, None] + norms[None, :] - 2.0 * x @ x.T
    sq = sq.masked_fill(~same, float("inf"))
    nearest = sq.min(1).values
    has_nn = torch.isfinite(nearest)
    log_nn = 0.5 * torch.log(nearest.where(has_nn, torch.ones_like(nearest)).clamp(min=1e-12))
    return log_nn, has_nn


def _choice(name: str, value, allowed: tuple) -> str:
    if value not in allowed:
        raise ConfigError(f"unknown NIR {name} {value!r}; choose one of: {', '.join(allowed)}")
    return value


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


def _check_options(*, mode, noise_kind, base_scale, nll_cap, warmup_epochs, negatives,
                   **numbers) -> None:
    """ConfigError naming the allowed values for any option out of range."""
    _choice("mode", mode, NIR_MODES)
    _choice("noise_kind", noise_kind, NOISE_KINDS)
    _choice("base_scale", base_scale, BASE_SCALES)
    for name, value in numbers.items():
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"NIR {name} must be a finite number >= 0, got {value}")
    for name, value, low in (("warmup_epochs", warmup_epochs, 0), ("negatives", negatives, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ConfigError(f"NIR {name} must be an integer >= {low}, got {value!r}")
    if nll_cap is not None and not math.isfinite(float(nll_cap)):
        raise ConfigError(f"nll_cap must be a finite number or None, got {nll_cap}")


class NIRLoss(nn.Module):
    """A proxy loss plus the NIR regulariser, with the proxy-loss ``forward`` contract.

    Args:
        base_loss: a ``nirdml.losses.ProxyLoss`` (anything with ``proxies``, ``embedding_dim``,
            ``num_classes``, ``class_proxies``, ``param_groups`` and ``forward``).
        weight: ``omega`` of the paper-style modes (multiplies the NIR term) or ``w`` of the
            release mode (multiplies the proxy loss).
        mode: one of :data:`NIR_MODES` (default ``"release"``).
        flow: a ``ConditionalGlowFlow`` of dimension ``embedding_dim``; built from
            ``flow_kwargs`` (``ConditionalGlowFlow(embedding_dim, **flow_kwargs)``) when None.
        nll_cap: release mode only. ``exp(u)`` overflows float32 for u > 88, which an
            outlier embedding of an untrained flow can reach; above ``nll_cap`` the term is
            continued linearly (see ``capped_exp``), so the loss and its gradient stay finite.
            Below the cap the maths is exactly ``exp(u)``. ``None`` disables the cap.
        per_dim: use the NLL in nats per dimension (``nll / D``) in the combination, so that a
            weight transfers across embedding sizes.
        noise, noise_kind: input noise in training (see the module docstring); ``noise >= 0``.
        base_scale: one of :data:`BASE_SCALES`.
        warmup_epochs: epochs during which the flow only fits detached inputs.
        negatives: ``disc`` mode: other batch classes per sample (>= 1).
        nll_weight: ``disc`` mode: weight of a plain (per-dim) NLL term beside the CE (>= 0).
        flow_lr_multiplier: the flow's learning rate is ``lr * flow_lr_multiplier`` in
            :meth:`param_groups` (the release: 50, SOP 1).
        cuda_graphs: on a GPU, replay the NLL's forward and backward from CUDA graphs (the
            flow is launch-bound there); eager on the CPU and for new shapes.

    ``last_terms`` (detached): ``proxy`` (the base loss), ``nir`` (the NIR term as combined),
    ``nll`` (mean per-sample NLL in nats), ``nll_max``, ``material`` (fraction of the batch whose
    NIR gradient weight is above :data:`MATERIAL_FRACTION` of the largest), ``total``, in
    ``disc`` mode ``ce`` and ``nll_gap`` (mean NLL given a negative's proxy minus given the
    own), in ``kl`` mode ``log_nn`` (the mean log nearest-neighbour distance), with a learnt
    base ``base_log_scale``, and the base loss's own sub-terms prefixed with ``proxy_``.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        weight: float,
        mode: str = "release",
        flow: ConditionalGlowFlow | None = None,
        *,
        nll_cap: float | None = DEFAULT_NLL_CAP,
        per_dim: bool = False,
        noise: float = 0.0,
        noise_kind: str = "gaussian",
        base_scale: str = "standard",
        warmup_epochs: int = 0,
        negatives: int = 1,
        nll_weight: float = 0.0,
        flow_lr_multiplier: float = 50.0,
        cuda_graphs: bool = False,
        **flow_kwargs,
    ):
        super().__init__()
        _check_base_loss(base_loss)
        _check_options(mode=mode, noise_kind=noise_kind, base_scale=base_scale, weight=weight,
                       noise=noise, nll_weight=nll_weight,
                       flow_lr_multiplier=flow_lr_multiplier, warmup_epochs=warmup_epochs,
                       negatives=negatives, nll_cap=nll_cap)
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
        self.weight = float(weight)
        self.mode = mode
        self.nll_cap = None if nll_cap is None else float(nll_cap)
        self.per_dim = bool(per_dim)
        self.noise = float(noise)
        self.noise_kind = noise_kind
        self.base_scale = base_scale
        self.warmup_epochs = int(warmup_epochs)
        self.negatives = int(negatives)
        self.nll_weight = float(nll_weight)
        self.flow_lr_multiplier = float(flow_lr_multiplier)
        self.num_classes = base_loss.num_classes
        self.embedding_dim = base_loss.embedding_dim
        self.fitting_only = False  # True during the flow warm-up (see set_epoch)
        self.cuda_graphs = bool(cuda_graphs)
        self._graphed = GraphedNLL(self, self._nll) if self.cuda_graphs else None
        sphere = -0.5 * math.log(self.embedding_dim)
        if base_scale == "learned":
            self.base_log_scale = nn.Parameter(torch.tensor(sphere))
        else:
            self.base_log_scale = None
            self._fixed_log_scale = 0.0 if base_scale == "standard" else sphere
        self.last_terms: dict[str, Tensor] = {}

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
        normalised conditions ``cond``, under the flow and this loss's base distribution
        (replayed from CUDA graphs with ``cuda_graphs=True`` on a GPU, ``nirdml.nir.graphs``)."""
        if self._graphed is not None:
            return self._graphed(x, cond)
        return self._nll(x, cond)

    def _nll(self, x: Tensor, cond: Tensor) -> Tensor:
        if self.base_scale == "standard":
            return self.flow.nll(x, cond)
        z, log_det = self.flow(x, cond)
        log_sigma = self.base_log_scale if self.base_log_scale is not None else torch.tensor(
            self._fixed_log_scale, dtype=z.dtype, device=z.device)
        return (0.5 * z.square().sum(1) * torch.exp(-2.0 * log_sigma)
                + self.embedding_dim * log_sigma - log_det)

    def _flow_input(self, embeddings: Tensor) -> Tensor:
        emb = embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) \
            else embeddings
        x = F.normalize(emb, dim=1)
        if self.noise > 0 and self.training:
            if self.noise_kind == "gaussian":
                e = torch.randn_like(x) * self.noise
            else:
                e = (torch.rand_like(x) * 2.0 - 1.0) * self.noise
            x = F.normalize(x + e, dim=1)
        return x

    def _negative_labels(self, labels: Tensor) -> Tensor:
        """(B, K): for each sample, ``K = min(negatives, classes in batch - 1)`` distinct other
        classes of the batch, drawn uniformly (global RNG)."""
        classes = torch.unique(labels)
        k = min(self.negatives, classes.numel() - 1)
        own = torch.searchsorted(classes, labels)
        scores = torch.rand(labels.shape[0], classes.numel(), device=labels.device)
        scores[torch.arange(labels.shape[0], device=labels.device), own] = -1.0
        return classes[scores.topk(k, dim=1).indices]

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
        if self.mode == "disc":
            nir, nll, grad_weight, extra = self._disc_term(embeddings, labels, x, cond)
        else:
            nll = self.nll(x, cond)
            u = nll / self.embedding_dim if self.per_dim else nll
            nir, grad_weight, extra = self._density_term(u, x, labels)
        if self.mode == "release":
            proxy_part, nir_part = self.weight * proxy_loss, nir
        else:
            proxy_part, nir_part = proxy_loss, self.weight * nir
        material = (grad_weight > MATERIAL_FRACTION * grad_weight.max()).float().mean()
        terms = {"proxy": proxy_loss, "nir": nir, "nll": nll.mean(), "nll_max": nll.max(),
                 "material": material, **extra}
        if self.base_log_scale is not None:
            terms["base_log_scale"] = self.base_log_scale
        terms.update({f"proxy_{k}": v for k, v in base_terms.items() if k != "proxy"})
        return proxy_part, nir_part, terms

    def _density_term(self, u: Tensor, x: Tensor, labels: Tensor
                      ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The release / paper / selfnorm / kl term of the per-sample NLLs ``u``: ``(term,
        per-sample gradient weight, extra terms)``."""
        if self.mode == "release":
            # the cap only costs extra ops when a batch actually reaches it
            capped = self.nll_cap is not None and not bool(u.detach().max() <= self.nll_cap)
            per_sample = capped_exp(u, self.nll_cap) if capped else torch.exp(u)
            return per_sample.mean(), per_sample.detach(), {}
        if self.mode == "selfnorm":
            return (torch.logsumexp(u, 0) - math.log(u.shape[0]),
                    torch.softmax(u.detach(), 0), {})
        if self.mode == "kl":
            log_nn, has_nn = within_class_log_nn(x, labels)
            entropy = log_nn[has_nn].mean() if bool(has_nn.any()) else log_nn.sum() * 0.0
            term = u.mean() - (1.0 if self.per_dim else float(self.embedding_dim)) * entropy
            return term, torch.ones_like(u), {"log_nn": entropy}
        return u.mean(), torch.ones_like(u), {}  # paper

    def _disc_term(self, embeddings: Tensor, labels: Tensor, x: Tensor, cond: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """The disc term: ``(term, own-class NLL, per-sample gradient weight, extra terms)``."""
        scale = float(self.embedding_dim) if self.per_dim else 1.0
        neg = self._negative_labels(torch.as_tensor(labels, device=x.device).long())
        k = neg.shape[1]
        if k == 0:  # a batch of one class has no negatives: its CE is 0
            nll = self.nll(x, cond)
            ce = gap = torch.zeros_like(nll)
        else:
            cond_neg = self.base_loss.class_proxies(
                embeddings.repeat_interleave(k, 0), neg.reshape(-1))
            if self.fitting_only:
                cond_neg = cond_neg.detach()
            nll_all = self.nll(torch.cat([x, x.repeat_interleave(k, 0)]),
                               torch.cat([cond, cond_neg]))
            nll, nll_neg = nll_all[:x.shape[0]], nll_all[x.shape[0]:].view(-1, k)
            logits = -torch.cat([nll[:, None], nll_neg], 1) / scale
            ce = torch.logsumexp(logits, 1) - logits[:, 0]
            gap = nll_neg.mean(1) - nll
        term = ce.mean() + self.nll_weight * (nll / scale).mean()
        grad_weight = (1.0 - torch.exp(-ce.detach())) + self.nll_weight
        return term, nll, grad_weight, {"ce": ce.mean(), "nll_gap": gap.mean()}

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The combined loss (scalar) of a batch of (raw) embeddings and their class labels."""
        proxy_part, nir_part, terms = self.objective(embeddings, labels)
        # release: nir + w * proxy; the others: proxy + w * nir (float addition commutes)
        total = nir_part + proxy_part if self.mode == "release" else proxy_part + nir_part
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
        params = list(self.flow.parameters())
        if self.base_log_scale is not None:
            params.append(self.base_log_scale)
        groups.append({"name": "flow", "params": params, "lr": lr * mult, "weight_decay": 0.0})
        return groups

    def extra_repr(self) -> str:
        parts = [f"mode={self.mode!r}", f"weight={self.weight:g}"]
        if self.mode == "release":
            parts.append(f"nll_cap={self.nll_cap}")
        optional = {"per_dim": (self.per_dim, False), "noise": (self.noise, 0.0),
                    "base_scale": (self.base_scale, "standard"),
                    "warmup_epochs": (self.warmup_epochs, 0)}
        parts += [f"{k}={v!r}" for k, (v, default) in optional.items() if v != default]
        if self.mode == "disc":
            parts += [f"negatives={self.negatives}", f"nll_weight={self.nll_weight:g}"]
        return ", ".join(parts)
