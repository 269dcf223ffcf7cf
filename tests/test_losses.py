"""Tests of nirdml.losses: values and gradients against pytorch-metric-learning 2.9 (float64) or
against brute-force loops written from the papers' equations, input validation, and the API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import need
from nirdml.errors import ConfigError, InputError
from nirdml.losses import (
    LOSSES,
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    ProxyLoss,
    ProxyNCALoss,
    SoftTripleLoss,
    build_loss,
)


def pml_losses():
    return need("pytorch_metric_learning.losses")


def pml_distances():
    return need("pytorch_metric_learning.distances")


C, D = 7, 6
# Unequal class counts; classes 1, 4 and 6 are absent.
LABELS = torch.tensor([0, 0, 0, 2, 3, 3, 5, 2, 0, 5, 3])
RTOL = 1e-10


def _batch(seed=0, labels=LABELS):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), D, generator=g, dtype=torch.float64), labels.clone()


def _make(cls, seed=1, **kw):
    torch.manual_seed(seed)
    return cls(C, D, **kw).double()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13)


def _compare(ours, oracle_fn, oracle_params, emb, labels):
    """Value and gradients (embeddings, proxies) of ``ours`` against ``oracle_fn``.

    ``oracle_params`` is the oracle's proxy tensor mapped to our (P, D) layout (a view is fine).
    """
    e1 = emb.clone().requires_grad_(True)
    loss = ours(e1, labels)
    loss.backward()
    e2 = emb.clone().requires_grad_(True)
    ref = oracle_fn(e2, labels)
    ref.backward()
    _close(loss, ref)
    _close(e1.grad, e2.grad)
    _close(ours.proxies.grad, oracle_params())
    return loss


# ---------------------------------------------------------------- ProxyAnchor
@pytest.mark.parametrize("seed", [0, 1])
def test_proxy_anchor_matches_pml(seed):
    # Oracle: PML ProxyAnchorLoss, same definition (positive term / classes present in batch,
    # negative term / all classes, cosine similarity, log(1 + sum exp)).
    ours = _make(ProxyAnchorLoss, alpha=32.0, delta=0.1)
    ref = pml_losses().ProxyAnchorLoss(C, D, margin=0.1, alpha=32)
    ref.proxies.data = ours.proxies.detach().clone()
    emb, labels = _batch(seed)
    _compare(ours, ref, lambda: ref.proxies.grad, emb, labels)


@pytest.mark.parametrize("alpha", [16.0, 128.0], ids=["fused", "shifted"])
def test_proxy_anchor_brute_force_and_terms(alpha):
    # Oracle: Kim et al. eq. (4) with explicit loops (alpha 128 takes the max-shifted path:
    # exp(128 * 1.2) would overflow float32 unshifted)
    ours = _make(ProxyAnchorLoss, alpha=alpha, delta=0.2)
    emb, labels = _batch(3)
    loss = ours(emb, labels)
    e = F.normalize(emb, dim=1)
    p = F.normalize(ours.proxies.detach(), dim=1)
    present = sorted(set(labels.tolist()))
    pos = neg = 0.0
    for c in range(C):
        sp = sum(
            math.exp(-alpha * (float(e[i] @ p[c]) - 0.2))
            for i in range(len(labels))
            if labels[i] == c
        )
        sn = sum(
            math.exp(alpha * (float(e[i] @ p[c]) + 0.2))
            for i in range(len(labels))
            if labels[i] != c
        )
        pos += math.log1p(sp) / len(present)
        neg += math.log1p(sn) / C
    assert loss.item() == pytest.approx(pos + neg, rel=RTOL)
    t = ours.last_terms
    assert set(t) == {"proxy", "pos", "neg"}
    assert t["pos"].item() == pytest.approx(pos, rel=RTOL)
    _close(t["pos"] + t["neg"], t["proxy"])
    assert not t["proxy"].requires_grad


def test_proxy_anchor_single_class_batch_is_finite():
    ours = _make(ProxyAnchorLoss)
    emb, _ = _batch(0)
    emb.requires_grad_(True)
    loss = ours(emb, torch.full((len(emb),), 2))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(ours.proxies.grad).all()


# ---------------------------------------------------------------- ProxyNCA
@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
@pytest.mark.parametrize("normalize_proxies", [True, False])
def test_proxy_nca_matches_pml(distance, normalize_proxies):
    # Oracle: PML ProxyNCALoss = NCA softmax over proxies with softmax_scale = 1/T (our T) and
    # LpDistance(power=2) (squared Euclidean) or CosineSimilarity. PML normalises embeddings and
    # proxies together, so for raw proxies we turn its normalisation off and hand it
    # F.normalize(embeddings) (autograd carries the gradient back through the normalisation).
    T = 1.0 / 9.0 if distance == "squared_euclidean" else 0.07
    ours = _make(
        ProxyNCALoss, temperature=T, distance=distance, normalize_proxies=normalize_proxies
    )
    if distance == "squared_euclidean":
        dist = pml_distances().LpDistance(power=2, normalize_embeddings=normalize_proxies)
    else:
        dist = pml_distances().DotProductSimilarity(normalize_embeddings=normalize_proxies)
    ref = pml_losses().ProxyNCALoss(C, D, softmax_scale=1.0 / T, distance=dist)
    ref.proxies.data = ours.proxies.detach().clone()

    def oracle(e, y):
        return ref(e if normalize_proxies else F.normalize(e, dim=1), y)

    emb, labels = _batch(4)
    _compare(ours, oracle, lambda: ref.proxies.grad, emb, labels)
    assert set(ours.last_terms) == {"proxy"}


def test_proxy_nca_distance_equivalence():
    # ||e - p||^2 = 2 - 2 cos for unit vectors: squared_euclidean at T == cosine at T / 2.
    a = _make(ProxyNCALoss, temperature=0.2)
    b = _make(ProxyNCALoss, temperature=0.1, distance="cosine")
    emb, labels = _batch(5)
    _close(a(emb, labels), b(emb, labels))


# ---------------------------------------------------------------- SoftTriple
def _soft_triple_reg_brute(proxies, k, eps=1e-5):
    # Oracle: Qian et al. eq. for R, normalised by C K (K - 1) (authors' code: pairs t < s).
    w = F.normalize(proxies, dim=1)
    total = 0.0
    for c in range(C):
        for t in range(k):
            for s in range(t + 1, k):
                cos = w[c * k + t] @ w[c * k + s]
                total = total + torch.sqrt(2.0 + eps - 2.0 * cos)
    return total / (C * k * (k - 1))


@pytest.mark.parametrize("k", [1, 3])
def test_soft_triple_matches_pml_plus_regulariser(k):
    # Oracle: PML SoftTripleLoss (its fc is D x (C*K), columns class-major: column c*K + j is
    # centre j of class c, so our proxies == fc.t()) for the cross-entropy part. PML omits the
    # paper's centre regulariser, so it is added from the loop reference above.
    tau = 0.2
    ours = _make(SoftTripleLoss, centers_per_class=k, la=20, gamma=0.1, margin=0.01, reg_weight=tau)
    assert ours.proxies.shape == (C * k, D)
    ref = pml_losses().SoftTripleLoss(C, D, centers_per_class=k, la=20, gamma=0.1, margin=0.01)
    ref.fc.data = ours.proxies.detach().t().clone()

    def oracle(e, y):
        reg = _soft_triple_reg_brute(ref.fc.t(), k) if k > 1 else 0.0
        return ref(e, y) + tau * reg

    emb, labels = _batch(6)
    _compare(ours, oracle, lambda: ref.fc.grad.t(), emb, labels)
    t = ours.last_terms
    assert set(t) == {"proxy", "ce", "reg"}
    _close(t["ce"] + t["reg"], t["proxy"])
    if k == 1:
        assert t["reg"].item() == 0.0


def test_soft_triple_class_proxies_pick_best_own_centre():
    k = 4
    ours = _make(SoftTripleLoss, centers_per_class=k)
    emb, labels = _batch(7)
    emb.requires_grad_(True)
    cp = ours.class_proxies(emb, labels)
    w = F.normalize(ours.proxies.detach(), dim=1)
    e = F.normalize(emb.detach(), dim=1)
    for i, y in enumerate(labels.tolist()):
        sims = [float(e[i] @ w[y * k + j]) for j in range(k)]
        _close(cp[i].detach(), w[y * k + max(range(k), key=sims.__getitem__)])
    cp.sum().backward()
    assert emb.grad is None  # the argmax selection carries no gradient
    assert ours.proxies.grad.abs().sum() > 0


# ---------------------------------------------------------------- NormSoftmax
def test_norm_softmax_matches_pml():
    # Oracle: PML NormalizedSoftmaxLoss (W is D x C, our proxies == W.t()); same definition.
    ours = _make(NormSoftmaxLoss, temperature=0.05)
    ref = pml_losses().NormalizedSoftmaxLoss(C, D, temperature=0.05)
    ref.W.data = ours.proxies.detach().t().clone()
    emb, labels = _batch(8)
    _compare(ours, ref, lambda: ref.W.grad.t(), emb, labels)


# ---------------------------------------------------------------- common API
NAMES = ["proxy_anchor", "proxy_nca", "soft_triple", "norm_softmax"]


def test_registry_and_build():
    # the proxy losses here; the pair-based and margin-softmax ones in test_baseline_losses.py
    assert set(NAMES) <= set(LOSSES.names())
    loss = build_loss("soft_triple", C, D, centers_per_class=2, la=None)
    assert isinstance(loss, SoftTripleLoss) and loss.la == 20.0
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss("nope", C, D)
    with pytest.raises(ConfigError, match="distance"):
        ProxyNCALoss(C, D, distance="l1")


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_and_class_proxies(name):
    torch.manual_seed(0)
    loss = build_loss(name, C, D, proxy_lr_multiplier=100.0)
    assert isinstance(loss, ProxyLoss)
    (group,) = loss.param_groups(1e-5, weight_decay=4e-4)
    assert group["name"] == "proxies" and group["params"] == [loss.proxies]
    assert group["lr"] == pytest.approx(1e-3) and group["weight_decay"] == 0.0
    assert build_loss(name, C, D).proxy_lr_multiplier == 2000.0
    emb, labels = _batch(9)
    cp = loss.class_proxies(emb.float(), labels)
    assert cp.shape == (len(labels), D)
    torch.testing.assert_close(cp.norm(dim=1), torch.ones(len(labels)))
    loss(emb.float(), labels)
    assert "proxy" in loss.last_terms


def test_proxies_init_scale():
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(200, 128)
    assert loss.proxies.std().item() == pytest.approx(1 / 8, rel=0.02)


@pytest.mark.parametrize(
    ("emb", "labels", "words"),
    [
        (torch.zeros(4, D, 1), torch.zeros(4, dtype=torch.long), ["2-D"]),
        (torch.zeros(4, D + 1), torch.zeros(4, dtype=torch.long), [str(D + 1), str(D)]),
        (torch.zeros(4, D), torch.zeros(3, dtype=torch.long), ["length", "4"]),
        (torch.zeros(4, D), torch.zeros(4), ["integer"]),
        (torch.zeros(4, D), torch.tensor([0, -1, 2, 9]), ["out of range", "-1", "9", str(C)]),
        (
            torch.tensor([[float("nan")] * D, [0.0] * D, [float("inf")] * D]),
            torch.zeros(3, dtype=torch.long),
            ["NaN", "2 of 3 rows"],
        ),
    ],
    ids=["ndim", "dim", "length", "dtype", "range", "nonfinite"],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name, emb, labels, words):
    loss = build_loss(name, C, D)
    with pytest.raises(InputError) as info:
        loss(emb, labels)
    for w in words:
        assert w in str(info.value)
    with pytest.raises(InputError):
        loss.class_proxies(emb, labels)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_cpu(name):
    torch.manual_seed(0)
    loss = build_loss(name, C, D)
    head = torch.nn.Linear(5, D)
    x = torch.randn(len(LABELS), 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = head(x)
        out = loss(emb, LABELS)
    assert emb.dtype == torch.bfloat16 and out.dtype == torch.float32
    # the loss itself runs in float32 on the bf16 embeddings: the same value as float32 on them
    assert out.item() == pytest.approx(loss(emb.float(), LABELS).item(), rel=1e-6)
    # and against a whole float32 forward: the embeddings carry bf16 rounding (8 bits of
    # mantissa, relative error <= 2^-8 per entry)
    ref = loss(head(x), LABELS)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    out.backward()
    proxy_grad, head_grad = loss.proxies.grad.clone(), head.weight.grad.clone()
    loss.proxies.grad = head.weight.grad = None
    ref.backward()
    assert torch.isfinite(proxy_grad).all() and torch.isfinite(head_grad).all()
    for got, want in ((proxy_grad, loss.proxies.grad), (head_grad, head.weight.grad)):
        assert (got - want).norm() <= 0.05 * want.norm()


def test_proxy_anchor_fused_and_shifted_forms_agree_in_value_and_gradient():
    """The fast path (own-proxy positives, fused negative term with a hand-written backward)
    against the plain max-shifted autograd form, float64, many classes absent."""
    torch.manual_seed(5)
    loss = ProxyAnchorLoss(300, 16).double()
    emb = torch.randn(40, 16, dtype=torch.float64)
    labels = torch.randint(0, 300, (40,))
    labels[:10] = labels[10:20]  # some classes twice
    results = []
    for compute in (loss._compute, loss._compute_shifted):
        e = emb.clone().requires_grad_()
        loss.proxies.grad = None
        total, terms = compute(e, labels)
        total.backward()
        results.append((total.detach(), terms["pos"].detach(), e.grad, loss.proxies.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
