"""Tests of nirdml.nir.NIRLoss: both combination modes against the documented formulas (float64),
gradient flow into embeddings / proxies / flow, last_terms, param_groups, the release-mode
overflow guard, composition with every proxy loss, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nirdml.errors import ConfigError, InputError
from nirdml.losses import (
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SoftTripleLoss,
)
from nirdml.nir import ConditionalGlowFlow, NIRLoss
from nirdml.nir.terms import capped_exp
from nirdml.nir.terms.disc import negative_labels

C, D = 6, 8
LABELS = torch.tensor([0, 0, 2, 2, 3, 3, 5, 1, 1, 0])
SMALL_FLOW = {"subnet_width": 16, "subnet_depth": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


class StandIn(nn.Module):
    """The smallest thing that satisfies the ProxyLoss contract NIRLoss relies on."""

    proxy_lr_multiplier = 10.0

    def __init__(self, num_classes, embedding_dim):
        super().__init__()
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.last_terms = {}

    def forward(self, emb, labels):
        cos = F.normalize(emb, dim=1) @ F.normalize(self.proxies, dim=1).t()
        loss = F.cross_entropy(8.0 * cos, labels)
        self.last_terms = {"proxy": loss.detach()}
        return loss

    def class_proxies(self, emb, labels):
        return F.normalize(self.proxies[labels], dim=1)

    def param_groups(self, lr):
        return [{"name": "proxies", "params": [self.proxies], "lr": lr * 10.0,
                 "weight_decay": 0.0}]


def _emb(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), D, generator=g, dtype=torch.float64)


def _nir(base_cls=ProxyAnchorLoss, mode="release", weight=0.3, seed=0, **kw):
    torch.manual_seed(seed)
    base = base_cls(C, D)
    return NIRLoss.from_options(base, weight, mode=mode, **SMALL_FLOW, **kw).double()


def _reference_total(nir, emb, weight, mode, per_dim=False, base_scale="standard",
                     nll_weight=0.0):
    """The documented formula of each mode, by hand from the pieces (no NIRLoss code)."""
    proxy = nir.base_loss(emb, LABELS)
    x = F.normalize(emb, dim=1)
    log_sigma = {"standard": 0.0, "sphere": -0.5 * math.log(D)}[base_scale]

    def nll_given(cond):
        z, log_det = nir.flow(x, cond)
        return 0.5 * z.square().sum(1) / math.exp(2 * log_sigma) + D * log_sigma - log_det

    nll = nll_given(nir.base_loss.class_proxies(emb, LABELS))
    u = nll / D if per_dim else nll
    if mode == "release":
        return torch.exp(u).mean() + weight * proxy, torch.exp(u).mean(), nll
    if mode == "paper":
        return proxy + weight * u.mean(), u.mean(), nll
    if mode == "selfnorm":
        term = torch.log(torch.exp(u).mean())
        return proxy + weight * term, term, nll
    if mode == "kl":  # Kozachenko-Leonenko: nearest other sample of the class, singletons left out
        logs = [min(torch.linalg.vector_norm(x[i] - x[j]) for j in range(len(LABELS))
                    if j != i and LABELS[j] == LABELS[i]).log()
                for i in range(len(LABELS)) if (LABELS == LABELS[i]).sum() > 1]
        term = u.mean() - (1 if per_dim else D) * torch.stack(logs).mean()
        return proxy + weight * term, term, nll
    # disc with every other batch class as a negative: CE over all classes of the batch
    classes = LABELS.unique()
    scores = torch.stack([-nll_given(nir.base_loss.class_proxies(emb, torch.full_like(LABELS, c)))
                          for c in classes], 1) / (D if per_dim else 1)
    own = (LABELS[:, None] == classes[None, :]).double().argmax(1)
    ce = F.cross_entropy(scores, own, reduction="none")
    term = ce.mean() + nll_weight * u.mean()
    return proxy + weight * term, term, nll


VARIANTS = [
    {"mode": "release"}, {"mode": "paper"}, {"mode": "selfnorm"},
    {"mode": "release", "per_dim": True}, {"mode": "paper", "per_dim": True},
    {"mode": "paper", "base_scale": "sphere"}, {"mode": "selfnorm", "per_dim": True},
    {"mode": "disc", "negatives": 10}, {"mode": "disc", "negatives": 4, "per_dim": True,
                                        "nll_weight": 0.2},
    {"mode": "kl"}, {"mode": "kl", "per_dim": True},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_modes_reduce_to_the_documented_formulas(variant):
    nir = _nir(weight=0.3, **variant)
    emb = _emb()
    total = nir(emb, LABELS)
    nir.flow.fused = False  # the reference uses the plain autograd flow
    opts = {k: v for k, v in variant.items() if k != "negatives"}
    expected, nir_term, nll = _reference_total(nir, emb, 0.3, **opts)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
    terms = nir.last_terms
    proxy = nir.base_loss(emb, LABELS)
    assert {"proxy", "nir", "nll", "nll_max", "material", "total"} <= set(terms)
    torch.testing.assert_close(terms["proxy"], proxy)
    torch.testing.assert_close(terms["nir"], nir_term, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["nll"], nll.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["nll_max"], nll.max(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["total"], total.detach())
    assert 0 < terms["material"] <= 1
    assert "proxy_pos" in terms and "proxy_neg" in terms  # ProxyAnchor's own sub-terms
    assert all(not v.requires_grad for v in terms.values())


def test_kl_mode_does_not_reward_shrinking_a_class():
    """Shrinking every class towards its mean by a factor s lowers the flow's NLL, but the
    entropy estimate falls by D log s per sample too: the KL term moves by the NLL change
    minus D log(1/s), where the paper's term takes the NLL change alone."""
    emb = F.normalize(_emb(3), dim=1)
    centres = torch.stack([emb[LABELS == c].mean(0) for c in LABELS.tolist()])
    from nirdml.nir.terms.kl import within_class_log_nn

    log_nn, has_nn = within_class_log_nn(emb, LABELS)
    shrunk = centres + 0.5 * (emb - centres)
    log_nn_s, has_nn_s = within_class_log_nn(shrunk, LABELS)
    assert has_nn.tolist() == (LABELS != 5).tolist() and torch.equal(has_nn, has_nn_s)
    assert log_nn[~has_nn].abs().max() == 0
    torch.testing.assert_close(log_nn_s[has_nn] - log_nn[has_nn],
                               torch.full((int(has_nn.sum()),), math.log(0.5),
                                          dtype=torch.float64), rtol=0, atol=1e-12)


def test_release_and_paper_defaults_are_the_exact_formulas():
    """The faithful modes with their default options: nothing of the variants leaks in."""
    for mode in ("release", "paper"):
        nir = _nir(mode=mode, weight=0.3)
        emb = _emb(7)
        nll = nir.flow.nll(F.normalize(emb, dim=1), nir.base_loss.class_proxies(emb, LABELS))
        proxy = nir.base_loss(emb, LABELS)
        expected = (torch.exp(nll).mean() + 0.3 * proxy if mode == "release"
                    else proxy + 0.3 * nll.mean())
        assert torch.equal(nir(emb, LABELS), expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_gradients_match_the_formula_and_reach_everything(variant):
    nir = _nir(weight=0.5, **variant)
    ref = _nir(weight=0.5, **variant)
    ref.flow.fused = False  # plain autograd as the reference
    emb = _emb(1)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    nir(e1, LABELS).backward()
    opts = {k: v for k, v in variant.items() if k != "negatives"}
    _reference_total(ref, e2, 0.5, **opts)[0].backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(nir.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_disc_negatives_are_other_batch_classes_drawn_uniformly():
    nir = _nir(mode="disc", negatives=2)
    labels = torch.tensor([0, 0, 1, 1, 3, 3, 4, 4, 5, 5])
    counts = torch.zeros(len(labels), C)
    torch.manual_seed(0)
    for _ in range(400):
        neg = negative_labels(labels, nir.term.negatives)
        assert neg.shape == (len(labels), 2)
        assert (neg != labels[:, None]).all() and (neg[:, 0] != neg[:, 1]).all()
        counts.scatter_add_(1, neg, torch.ones_like(neg, dtype=torch.float))
    # each of the 4 other batch classes is drawn with probability 2/4: 200 +- 3 sigma (30)
    in_batch = torch.zeros(C, dtype=torch.bool)
    in_batch[labels] = True
    others = in_batch[None, :] & (torch.arange(C)[None, :] != labels[:, None])
    assert (counts[~others] == 0).all()
    assert ((counts[others] - 200).abs() < 31).all(), counts[others]
    one_class = torch.zeros(4, dtype=torch.long)
    assert negative_labels(one_class, 2).shape == (4, 0)
    total = nir(_emb()[:4], one_class)  # no negatives: the CE is 0, the loss still finite
    assert torch.isfinite(total) and nir.last_terms["ce"] == 0


def test_noise_acts_in_training_only_and_keeps_unit_norm(monkeypatch):
    nir = _nir(mode="paper", noise=0.05, weight=1.0)
    emb = _emb(8)
    seen = []
    original = nir.nll
    monkeypatch.setattr(nir, "nll", lambda x, c: seen.append(x) or original(x, c))
    nir.eval()
    nir(emb, LABELS)
    torch.testing.assert_close(seen[-1], F.normalize(emb, dim=1))  # eval: no noise
    nir.train()
    nir(emb, LABELS)
    noisy = seen[-1]
    torch.testing.assert_close(noisy.norm(dim=1), torch.ones(len(LABELS), dtype=noisy.dtype))
    change = (noisy - F.normalize(emb, dim=1)).norm(dim=1)
    assert (change > 0.02).all() and (change < 0.5).all()  # ~ 0.05 * sqrt(8) = 0.14
    uniform = _nir(mode="paper", noise=0.05, noise_kind="uniform")
    monkeypatch.setattr(uniform.flow, "nll", lambda x, c: seen.append(x) or original(x, c))
    uniform(emb, LABELS)
    assert not torch.allclose(seen[-1], F.normalize(emb, dim=1))


def test_learned_base_scale_trains_with_the_flow():
    nir = _nir(mode="paper", base_scale="learned", weight=1.0)
    assert nir.base.log_scale.item() == pytest.approx(-0.5 * math.log(D))
    sphere = _nir(mode="paper", base_scale="sphere", weight=1.0)
    emb = _emb(9)
    torch.testing.assert_close(nir(emb, LABELS), sphere(emb, LABELS))  # same start
    nir(emb, LABELS).backward()
    assert nir.base.log_scale.grad is not None and nir.base.log_scale.grad != 0
    flow_group = {g["name"]: g for g in nir.param_groups(1e-3)}["flow"]
    assert any(p is nir.base.log_scale for p in flow_group["params"])
    assert "base_log_scale" in nir.last_terms


def test_flow_warmup_fits_the_flow_on_detached_inputs():
    nir = _nir(mode="paper", weight=1.0, warmup_epochs=2)
    emb = _emb(10).requires_grad_()
    nir.set_epoch(1)
    assert nir.fitting_only
    nir(emb, LABELS).backward()
    proxy_only = emb.grad.clone()
    flow_grad = sum(p.grad.abs().sum() for p in nir.flow.parameters())
    assert flow_grad > 0  # the flow learns
    emb.grad = None
    nir.base_loss(emb, LABELS).backward()
    torch.testing.assert_close(proxy_only, emb.grad)  # the embeddings only feel the proxy loss
    nir.set_epoch(2)
    assert not nir.fitting_only
    emb.grad = None
    nir(emb, LABELS).backward()
    assert not torch.allclose(proxy_only, emb.grad)


def test_the_flow_term_alone_moves_the_proxies():
    """The NIR term conditions on the proxies, so it must give them a gradient by itself."""
    nir = _nir(mode="paper", weight=1.0)
    emb = _emb(2).requires_grad_()
    nll = nir.flow.nll(F.normalize(emb, dim=1), nir.base_loss.class_proxies(emb, LABELS))
    nll.mean().backward()
    assert nir.proxies.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0
    present = torch.zeros(C, dtype=torch.bool)
    present[LABELS] = True
    assert (nir.proxies.grad[~present] == 0).all()  # absent classes get nothing from NIR


@pytest.mark.parametrize("base_cls", [ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss,
                                      NormSoftmaxLoss, StandIn])
def test_composes_with_every_proxy_loss(base_cls):
    torch.manual_seed(0)
    base = base_cls(C, D)
    nir = NIRLoss.from_options(base, 0.1, **SMALL_FLOW).double()
    emb = _emb(3).requires_grad_()
    total = nir(emb, LABELS)
    total.backward()
    assert torch.isfinite(total) and emb.grad.abs().sum() > 0
    assert nir.proxies is base.proxies and nir.proxies.grad.abs().sum() > 0
    assert nir.num_classes == C and nir.embedding_dim == D


def test_param_groups():
    nir = _nir()
    groups = nir.param_groups(1e-5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["proxies"]["lr"] == pytest.approx(1e-5 * nir.base_loss.proxy_lr_multiplier)
    assert by_name["proxies"]["params"] == [nir.proxies]
    assert by_name["flow"]["lr"] == pytest.approx(1e-5 * 50.0)
    assert by_name["flow"]["weight_decay"] == 0.0 and by_name["proxies"]["weight_decay"] == 0.0
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})  # nothing twice
    assert {id(p) for p in listed} == {id(p) for p in nir.parameters()}  # nothing missing
    groups = nir.param_groups(1e-5, proxy_lr_multiplier=4000, flow_lr_multiplier=1.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["proxies"]["lr"] == pytest.approx(4e-2)
    assert by_name["flow"]["lr"] == pytest.approx(1e-5)
    assert nir.base_loss.param_groups(1e-5)[0]["lr"] == pytest.approx(
        1e-5 * nir.base_loss.proxy_lr_multiplier
    )  # the override does not leak into the base loss
    torch.optim.Adam(nir.param_groups(1e-3))  # a valid optimizer spec


def test_capped_exp():
    nll = torch.tensor([-3.0, 0.0, 5.0, 9.99, 10.0, 10.5, 200.0, 1e30], dtype=torch.float64,
                       requires_grad=True)
    out = capped_exp(nll, 10.0)
    below = nll.detach() <= 10.0
    torch.testing.assert_close(out[below], torch.exp(nll.detach()[below]))
    torch.testing.assert_close(out[5], math.exp(10.0) * 1.5 * torch.ones((), dtype=torch.float64))
    assert torch.isfinite(out).all()
    out.sum().backward()
    torch.testing.assert_close(nll.grad[:4], torch.exp(nll.detach()[:4]))
    assert torch.isfinite(nll.grad).all() and (nll.grad[5:] == math.exp(10.0)).all()
    assert torch.equal(capped_exp(nll.detach(), None), torch.exp(nll.detach()))


def test_release_mode_stays_finite_when_exp_would_overflow():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(D, **SMALL_FLOW)
    with torch.no_grad():
        flow.b_out[-1][D // 2:].fill_(30.0)  # huge shifts: 0.5 ||z||^2 ~ 1800 > 88
    base = ProxyAnchorLoss(C, D)
    emb = _emb(4).float().requires_grad_()
    nir = NIRLoss.from_options(base, 0.01, flow=flow)
    total = nir(emb, LABELS)
    assert nir.last_terms["nll_max"] > 88  # plain exp() would be inf in float32
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(base.proxies.grad).all()
    uncapped = NIRLoss.from_options(base, 0.01, flow=flow, nll_cap=None)
    assert torch.isinf(uncapped(emb, LABELS))


def test_low_precision_embeddings_and_autocast():
    nir = NIRLoss.from_options(ProxyAnchorLoss(C, D), 0.01, **SMALL_FLOW)
    emb = _emb(5).float()
    ref = nir(emb, LABELS)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = nir(emb, LABELS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    half = nir(emb.to(torch.bfloat16), LABELS)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_state_dict_round_trip():
    a = _nir(seed=0)
    b = _nir(seed=1)
    b.load_state_dict(a.state_dict())
    emb = _emb(6)
    torch.testing.assert_close(a(emb, LABELS), b(emb, LABELS), rtol=0, atol=0)
    assert "flow.perms" in a.state_dict() and "base_loss.proxies" in a.state_dict()


def test_config_errors():
    base = ProxyAnchorLoss(C, D)
    with pytest.raises(ConfigError, match="disc, kl, paper, release, selfnorm"):
        NIRLoss.from_options(base, 0.1, mode="both")
    with pytest.raises(ConfigError, match=r"loss.nir.noise: -0.1; must be a finite number >= 0"):
        NIRLoss.from_options(base, 0.1, noise=-0.1)
    with pytest.raises(ConfigError, match="noise_kind 'salt'; choose one of: gaussian, uniform"):
        NIRLoss.from_options(base, 0.1, noise_kind="salt")
    with pytest.raises(ConfigError,
                       match="base_scale 'huge'; choose one of: learned, sphere, standard"):
        NIRLoss.from_options(base, 0.1, base_scale="huge")
    with pytest.raises(ConfigError, match="loss.nir.negatives: 0; must be an integer >= 1"):
        NIRLoss.from_options(base, 0.1, mode="disc", negatives=0)
    with pytest.raises(ConfigError, match="loss.nir.warmup_epochs: -1; must be an integer >= 0"):
        NIRLoss.from_options(base, 0.1, warmup_epochs=-1)
    with pytest.raises(ConfigError, match="weight"):
        NIRLoss.from_options(base, -1.0)
    with pytest.raises(ConfigError, match="embedding_dim"):
        NIRLoss.from_options(base, 0.1, flow=ConditionalGlowFlow(D + 1, **SMALL_FLOW))
    with pytest.raises(ConfigError, match="not both"):
        NIRLoss.from_options(base, 0.1, flow=ConditionalGlowFlow(D, **SMALL_FLOW), subnet_width=8)
    with pytest.raises(ConfigError, match="proxy loss"):
        NIRLoss.from_options(nn.Linear(D, D), 0.1)
    with pytest.raises(ConfigError, match="cond_mode"):
        NIRLoss.from_options(base, 0.1, cond_mode="nowhere")
    with pytest.raises(ConfigError, match="unknown NIR option.*negatives.*mode 'paper'"):
        NIRLoss.from_options(base, 0.1, mode="paper", negatives=3)  # a disc option
    with pytest.raises(ConfigError, match="term must be a NIRTerm"):
        NIRLoss(base, 0.1)


def test_input_errors_come_from_the_base_loss_checks():
    nir = _nir()
    emb = _emb()
    with pytest.raises(InputError, match="labels out of range"):
        nir(emb, torch.full_like(LABELS, C))
    with pytest.raises(InputError, match="embedding dim mismatch"):
        nir(emb[:, :-1], LABELS)
    with pytest.raises(InputError, match="labels length mismatch"):
        nir(emb, LABELS[:-1])
    bad = emb.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        nir(bad, LABELS)


def test_cuda_graphs_option_is_the_eager_path_off_the_gpu():
    """On the CPU (and without autograd) the graphed NLL is the eager one, bit for bit; the
    captured path itself is checked on a GPU (tests/test_gpu.py)."""
    a = _nir(mode="paper", weight=0.5)
    b = _nir(mode="paper", weight=0.5, cuda_graphs=True)
    emb = _emb(11)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    a(e1, LABELS).backward()
    b(e2, LABELS).backward()
    assert torch.equal(e1.grad, e2.grad) and b._graphed.graphs == {}
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_a_new_variant_is_one_class_and_one_registration():
    """A toy term (the NLL's batch maximum) registered by name is usable by name, from the
    flat options as a config gives them, with its own option, and computes what it says."""
    from nirdml.nir.terms import NIR_TERMS, NIRTerm, TermValue

    class MaxTerm(NIRTerm):
        def __init__(self, weight, *, per_dim=False, power=1.0):
            super().__init__(weight, per_dim=per_dim)
            self.power = power

        def value(self, batch):
            nll = batch.nll(batch.x, batch.cond)
            return TermValue(nll.max() ** self.power, nll, torch.ones_like(nll), {})

    NIR_TERMS.register("toy_max")(MaxTerm)
    try:
        torch.manual_seed(0)
        nir = NIRLoss.from_options(ProxyAnchorLoss(C, D).double(), 0.5, mode="toy_max",
                                   power=2.0, **SMALL_FLOW).double()
        emb = _emb()
        total = nir(emb, LABELS)
        x = F.normalize(emb, dim=1)
        nll = nir.flow.nll(x, nir.base_loss.class_proxies(emb, LABELS))
        want = nir.base_loss(emb, LABELS) + 0.5 * nll.max() ** 2
        torch.testing.assert_close(total, want, rtol=1e-12, atol=0)
        with pytest.raises(ConfigError, match="unknown NIR option.*negatives"):
            NIRLoss.from_options(ProxyAnchorLoss(C, D), 0.5, mode="toy_max", negatives=2)
    finally:
        NIR_TERMS._factories.pop("toy_max")


def test_pieces_compose_directly_as_from_options_builds_them():
    """NIRLoss(base_loss, term, flow, base=, perturbation=) is what from_options wires:
    same loss and gradients, bit for bit."""
    from nirdml.nir.base import LearnedScaleNormal
    from nirdml.nir.perturbation import UniformNoise
    from nirdml.nir.terms import DiscTerm

    results = []
    for direct in (False, True):
        torch.manual_seed(0)
        base = ProxyAnchorLoss(C, D)
        if direct:
            nir = NIRLoss(base, DiscTerm(0.2, per_dim=True, negatives=2),
                          ConditionalGlowFlow(D, **SMALL_FLOW), base=LearnedScaleNormal(D),
                          perturbation=UniformNoise(0.05))
        else:
            nir = NIRLoss.from_options(base, 0.2, mode="disc", per_dim=True, negatives=2,
                                       base_scale="learned", noise=0.05, noise_kind="uniform",
                                       **SMALL_FLOW)
        emb = _emb().float().requires_grad_(True)
        torch.manual_seed(1)
        nir(emb, LABELS).backward()
        results.append((nir.last_terms["total"], emb.grad, nir.base.log_scale.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_checkpoints_of_the_learnt_base_scale_before_the_pieces_still_load():
    nir = _nir(mode="paper", base_scale="learned")
    state = nir.state_dict()
    state["base_log_scale"] = state.pop("base.log_scale") + 1.0  # the old key
    nir.load_state_dict(state)
    assert nir.base.log_scale.item() == pytest.approx(-0.5 * math.log(D) + 1.0)
