"""The baseline losses of Musgrave et al.'s protocol: pair-based losses with their miners
(multi-similarity, margin with distance-weighted sampling, triplet with semi-hard mining,
contrastive) and the margin-softmax proxy losses (ArcFace, CosFace, Sub-center ArcFace).

Values and gradients against pytorch-metric-learning 2.9 in float64 (relative 1e-10) where the
definitions agree; brute-force loops from the papers' equations where they do not (the margin
loss's sampling: its distribution, tested statistically with fixed generators)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import need
from nirdml.errors import ConfigError, InputError
from nirdml.losses import (
    LOSSES,
    PROXY_LOSSES,
    ArcFaceLoss,
    ContrastiveLoss,
    CosFaceLoss,
    MarginLoss,
    MultiSimilarityLoss,
    PairLoss,
    ProxyLoss,
    SubCenterArcFaceLoss,
    TripletLoss,
    build_loss,
)
from nirdml.losses.margin import distance_weighted_probabilities, distance_weighted_sampling
from nirdml.losses.multi_similarity import multi_similarity_mining
from nirdml.losses.pairs import pairwise_distance

C, D = 7, 6
# unequal class counts, one singleton class (3), classes 4 and 6 absent
LABELS = torch.tensor([0, 0, 0, 2, 1, 1, 5, 2, 0, 5, 1, 3, 2, 5])
RTOL = 1e-10
PAIR_LOSSES = ["contrastive", "triplet", "multi_similarity", "margin"]
MARGIN_SOFTMAX = ["arcface", "cosface", "subcenter_arcface"]


def pml_losses():
    return need("pytorch_metric_learning.losses")


def pml_miners():
    return need("pytorch_metric_learning.miners")


def _batch(seed=0, labels=LABELS, spread=0.8, dim=D):
    """Class-clustered float64 embeddings (so that every miner finds pairs of every kind)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, dim, generator=g, dtype=torch.float64)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g,
                                                  dtype=torch.float64), labels.clone()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13)


def _compare(ours, oracle, emb, labels, params=()):
    """Value and embedding gradient of ``ours`` against ``oracle(embeddings, labels)``, and
    the gradients of ``params``: pairs ``(our parameter, oracle's gradient getter)``."""
    e1 = emb.clone().requires_grad_(True)
    loss = ours(e1, labels)
    loss.backward()
    e2 = emb.clone().requires_grad_(True)
    ref = oracle(e2, labels)
    ref.backward()
    assert ref.item() != 0.0
    _close(loss, ref)
    _close(e1.grad, e2.grad)
    for mine, theirs in params:
        _close(mine.grad, theirs())
    return loss


# ---------------------------------------------------------------- multi-similarity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_matches_pml(seed):
    # Oracle: PML MultiSimilarityLoss(alpha, beta, base) on the pairs of MultiSimilarityMiner
    # (epsilon): the same mining (eq. 5-6) and loss (eq. 9), mean over the batch.
    ours = MultiSimilarityLoss(C, D)
    ref = pml_losses().MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
    miner = pml_miners().MultiSimilarityMiner(epsilon=0.1)
    emb, labels = _batch(seed)
    _compare(ours, lambda e, y: ref(e, y, miner(e, y)), emb, labels)
    assert set(ours.last_terms) == {"proxy", "pos", "neg", "mined_pairs"}
    _close(ours.last_terms["pos"] + ours.last_terms["neg"], ours.last_terms["proxy"])


def test_multi_similarity_brute_force():
    # Oracle: the release's per-anchor loop (mining by value, skip anchors without pairs)
    alpha, beta, lam, eps = 2.0, 40.0, 0.5, 0.1
    emb, labels = _batch(4)
    loss = MultiSimilarityLoss(C, D, alpha=alpha, beta=beta, base=lam, epsilon=eps)(emb, labels)
    x = F.normalize(emb, dim=1)
    sim = (x @ x.t()).tolist()
    y = labels.tolist()
    total = 0.0
    for i in range(len(y)):
        pos = [sim[i][j] for j in range(len(y)) if y[j] == y[i] and j != i]
        neg = [sim[i][j] for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        hard_neg = [s for s in neg if s + eps > min(pos)]
        hard_pos = [s for s in pos if s - eps < max(neg)]
        if not hard_neg or not hard_pos:
            continue
        total += math.log1p(sum(math.exp(-alpha * (s - lam)) for s in hard_pos)) / alpha
        total += math.log1p(sum(math.exp(beta * (s - lam)) for s in hard_neg)) / beta
    assert loss.item() == pytest.approx(total / len(y), rel=RTOL)


def test_multi_similarity_mining_keeps_both_kinds_or_neither():
    emb, labels = _batch(5, spread=2.0)
    x = F.normalize(emb, dim=1)
    hard_pos, hard_neg = multi_similarity_mining(x @ x.t(), labels, 0.1)
    assert torch.equal(hard_pos.any(dim=1), hard_neg.any(dim=1))
    assert not hard_pos[labels == 3].any()  # the singleton class has no positive pair


# ---------------------------------------------------------------- triplet
@pytest.mark.parametrize("mining", ["semihard", "all"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_matches_pml(mining, seed):
    # Oracle: PML TripletMarginLoss(margin) on TripletMarginMiner(margin, type_of_triplets)
    # triplets: Euclidean distance of normalised embeddings, mean over the non-zero terms.
    ours = TripletLoss(C, D, margin=0.2, mining=mining)
    ref = pml_losses().TripletMarginLoss(margin=0.2)
    miner = pml_miners().TripletMarginMiner(margin=0.2, type_of_triplets=mining)
    emb, labels = _batch(seed)
    _compare(ours, lambda e, y: ref(e, y, miner(e, y)), emb, labels)


def test_triplet_semihard_brute_force():
    emb, labels = _batch(3)
    loss = TripletLoss(C, D, margin=0.2)(emb, labels)
    x = F.normalize(emb, dim=1)
    d = torch.cdist(x, x).tolist()
    y = labels.tolist()
    terms = [d[a][p] - d[a][n] + 0.2
             for a in range(len(y)) for p in range(len(y)) for n in range(len(y))
             if y[p] == y[a] and p != a and y[n] != y[a] and 0 < d[a][n] - d[a][p] <= 0.2]
    assert terms and loss.item() == pytest.approx(sum(terms) / len(terms), rel=RTOL)


# ---------------------------------------------------------------- contrastive
@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_pml(seed):
    # Oracle: PML ContrastiveLoss(pos_margin=0, neg_margin=1), all pairs, each part averaged
    # over its non-zero terms.
    ours = ContrastiveLoss(C, D)
    ref = pml_losses().ContrastiveLoss(pos_margin=0, neg_margin=1)
    emb, labels = _batch(seed)
    _compare(ours, ref, emb, labels)


# ---------------------------------------------------------------- margin
@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_margin_matches_pml_on_the_sampled_triplets(class_specific, seed):
    # Oracle: PML MarginLoss(margin, beta, learn_beta) on *our* sampled triplets (PML's
    # sampler draws one random positive per anchor and skips weightless anchors; the paper's
    # code, which we follow, takes every positive pair and falls back to uniform negatives).
    g = torch.Generator().manual_seed(seed)
    ours = MarginLoss(C, D, margin=0.2, beta=1.2, class_specific_beta=class_specific,
                      generator=g)
    with torch.no_grad():
        ours.beta.add_(torch.linspace(-0.3, 0.3, len(ours.beta)))  # distinct class betas
    ref = pml_losses().MarginLoss(margin=0.2, beta=1.2, learn_beta=True,
                                  num_classes=C if class_specific else None)
    ref.beta.data = ours.beta.detach().double().clone()
    emb, labels = _batch(seed, spread=0.5)
    _compare(ours, lambda e, y: ref(e, y, ours.last_triplets), emb.float().double(), labels,
             params=[(ours.beta, lambda: ref.beta.grad.float())])
    assert ours.beta.grad.abs().sum() > 0
    a, p, n = ours.last_triplets
    assert len(a) == int((labels[:, None] == labels[None]).sum() - len(labels))


def test_margin_brute_force_and_zero_case():
    g = torch.Generator().manual_seed(0)
    loss_fn = MarginLoss(C, D, generator=g).double()
    emb, labels = _batch(2)
    loss = loss_fn(emb, labels)
    a, p, n = (t.tolist() for t in loss_fn.last_triplets)
    x = F.normalize(emb, dim=1)
    d = torch.cdist(x, x).tolist()
    beta = loss_fn.beta.item()  # 1.2 in float32
    pos = [max(d[i][j] - beta + 0.2, 0.0) for i, j in zip(a, p)]
    neg = [max(beta - d[i][k] + 0.2, 0.0) for i, k in zip(a, n)]
    active = sum(v > 0 for v in pos + neg)
    assert loss.item() == pytest.approx((sum(pos) + sum(neg)) / active, rel=RTOL)
    # one sample per class: no positive pair, no triplet, a zero loss that still backpropagates
    e = emb[:5].clone().requires_grad_(True)
    out = loss_fn(e, torch.arange(5))
    out.backward()
    assert out.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def _log_q(d, n):
    """log q(d) of the paper: d^(n-2) (1 - d^2/4)^((n-3)/2), up to a constant."""
    return (n - 2) * math.log(d) + (n - 3) / 2 * math.log(1 - d * d / 4)


def test_distance_weighted_probabilities_follow_the_inverse_sphere_density():
    n = 16
    emb, labels = _batch(1, spread=0.4, dim=n)
    dist = pairwise_distance(emb)
    probs = distance_weighted_probabilities(dist, labels, n)
    y, d = labels.tolist(), dist.tolist()
    for i in range(len(y)):
        weights = [0.0 if y[j] == y[i] or d[i][j] >= 1.4 else
                   math.exp(-_log_q(max(d[i][j], 0.5), n)) for j in range(len(y))]
        if sum(weights) == 0:  # the paper's fallback: uniform over the negatives
            weights = [float(y[j] != y[i]) for j in range(len(y))]
        expected = [w / sum(weights) for w in weights]
        torch.testing.assert_close(probs[i], torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-15)


def test_distance_weighted_sampling_is_reproducible_and_draws_from_its_distribution():
    emb, labels = _batch(6, spread=1.0)

    def draw(seed):
        return distance_weighted_sampling(emb, labels, generator=torch.Generator().manual_seed(
            seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not torch.equal(first[2], other[2])
    a, p, n = first
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    # many draws for one anchor: frequencies against the probabilities (chi-square, fixed seed)
    probs = distance_weighted_probabilities(pairwise_distance(emb), labels, D)
    anchor = 0
    draws = torch.multinomial(probs[anchor].expand(1, -1), 20000, replacement=True,
                              generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(draws[0], minlength=len(labels)).double()
    support = probs[anchor] > 0
    expected = 20000 * probs[anchor][support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.chi2.sf(chi2, int(support.sum()) - 1) > 1e-3
    assert counts[~support].sum() == 0
    # and the sampler itself: its negatives for that anchor follow the same probabilities
    got = torch.zeros(len(labels), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    for _ in range(300):
        a, _, n = distance_weighted_sampling(emb, labels, generator=g)
        got += torch.bincount(n[a == anchor], minlength=len(labels)).double()
    expected = got.sum() * probs[anchor][support]
    chi2 = ((got[support] - expected) ** 2 / expected).sum().item()
    assert scipy_stats.chi2.sf(chi2, int(support.sum()) - 1) > 1e-3


def test_distance_weighted_sampling_spreads_distances_evenly_on_the_sphere():
    # The paper's point (fig. 3): for points uniform on the sphere, negatives drawn with weight
    # 1/q(d) have distances spread evenly over [cutoff, nonzero_loss_cutoff), while the raw
    # pairwise distances crowd near sqrt(2).
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 8
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(600, n, generator=g, dtype=torch.float64)
    labels = torch.arange(300).repeat_interleave(2)
    a, _, neg = distance_weighted_sampling(emb, labels, generator=g)
    dist = pairwise_distance(emb)
    sampled = dist[a, neg].numpy()
    inside = sampled[(sampled >= 0.5) & (sampled < 1.4)]
    uniform = scipy_stats.kstest(inside, "uniform", args=(0.5, 0.9))
    assert uniform.pvalue > 1e-3, uniform
    raw = dist[labels[:, None] != labels[None]].numpy()
    raw = raw[(raw >= 0.5) & (raw < 1.4)]
    assert scipy_stats.kstest(raw, "uniform", args=(0.5, 0.9)).pvalue < 1e-6


def test_margin_param_groups_and_beta_learning_rate():
    loss = build_loss("margin", C, D, beta_lr_multiplier=100.0)
    (group,) = loss.param_groups(1e-3, weight_decay=4e-4)
    assert group["params"] == [loss.beta] and group["lr"] == pytest.approx(0.1)
    assert group["weight_decay"] == 0.0 and loss.beta.item() == pytest.approx(1.2)
    assert MarginLoss(C, D).beta_lr_multiplier == 1000.0
    assert MarginLoss(C, D, class_specific_beta=True).beta.shape == (C,)


# ---------------------------------------------------------------- margin-softmax proxy losses
@pytest.mark.parametrize("scale", [64.0, 16.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_arcface_matches_pml(scale, seed):
    # Oracle: PML ArcFaceLoss (margin in degrees, W stored D x C): cos(theta + m) for the own
    # class while theta <= pi - m, cos(theta) - m sin(m) beyond; cross-entropy of s * logits.
    torch.manual_seed(seed)
    ours = ArcFaceLoss(C, D, scale=scale, margin=0.5).double()
    ref = pml_losses().ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=scale)
    ref.W.data = ours.proxies.detach().t().clone()
    emb, labels = _batch(seed, spread=2.0)
    _compare(ours, ref, emb, labels, params=[(ours.proxies, lambda: ref.W.grad.t())])


def test_arcface_beyond_pi_minus_m_takes_the_monotone_branch():
    # a sample almost opposite its class weight: theta > pi - m
    torch.manual_seed(0)
    ours = ArcFaceLoss(2, D, scale=16.0, margin=0.5).double()
    ref = pml_losses().ArcFaceLoss(2, D, margin=math.degrees(0.5), scale=16.0)
    ref.W.data = ours.proxies.detach().t().clone()
    w = F.normalize(ours.proxies.detach()[0], dim=0)
    emb = torch.stack([-w + 0.05 * torch.randn(D, dtype=torch.float64), w])
    labels = torch.tensor([0, 1])
    assert (F.normalize(emb[0], dim=0) @ w).item() < -math.cos(0.5)
    _compare(ours, ref, emb, labels, params=[(ours.proxies, lambda: ref.W.grad.t())])


@pytest.mark.parametrize("seed", [0, 1])
def test_cosface_matches_pml(seed):
    torch.manual_seed(seed)
    ours = CosFaceLoss(C, D).double()
    assert (ours.scale, ours.margin) == (64.0, 0.35)
    ref = pml_losses().CosFaceLoss(C, D, margin=0.35, scale=64)
    ref.W.data = ours.proxies.detach().t().clone()
    emb, labels = _batch(seed, spread=2.0)
    _compare(ours, ref, emb, labels, params=[(ours.proxies, lambda: ref.W.grad.t())])


@pytest.mark.parametrize("k", [1, 3])
def test_subcenter_arcface_matches_pml(k):
    # Oracle: PML SubCenterArcFaceLoss: class-major sub-centres (column c*K + j), the best
    # sub-centre's cosine per class, then ArcFace.
    torch.manual_seed(k)
    ours = SubCenterArcFaceLoss(C, D, sub_centers=k, scale=32.0).double()
    ref = pml_losses().SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=k,
                                            margin=math.degrees(0.5), scale=32.0)
    ref.W.data = ours.proxies.detach().t().clone()
    emb, labels = _batch(k, spread=2.0)
    _compare(ours, ref, emb, labels, params=[(ours.proxies, lambda: ref.W.grad.t())])


def test_subcenter_class_proxies_pick_the_best_own_sub_centre():
    torch.manual_seed(0)
    loss = SubCenterArcFaceLoss(C, D, sub_centers=3)
    emb, labels = _batch(0)
    emb = emb.float()
    picked = loss.class_proxies(emb, labels)
    centres = F.normalize(loss.proxies.detach(), dim=1).view(C, 3, D)
    x = F.normalize(emb, dim=1)
    for i, c in enumerate(labels.tolist()):
        best = centres[c][(centres[c] @ x[i]).argmax()]
        torch.testing.assert_close(picked[i], best)


@pytest.mark.parametrize("name", MARGIN_SOFTMAX)
def test_margin_softmax_losses_are_proxy_losses_nir_wraps(name):
    from nirdml.nir import NIRLoss

    torch.manual_seed(0)
    base = build_loss(name, C, D, proxy_lr_multiplier=10.0)
    assert isinstance(base, ProxyLoss) and name in PROXY_LOSSES
    nir = NIRLoss.from_options(base, 0.1, num_blocks=1, subnet_depth=2, subnet_width=8)
    emb, labels = _batch(0)
    out = nir(emb.float().requires_grad_(True), labels)
    out.backward()
    assert torch.isfinite(out) and base.proxies.grad is not None
    assert {"proxy", "nir", "total"} <= set(nir.last_terms)


# ---------------------------------------------------------------- common API
def test_registry_lists_every_baseline():
    assert set(PAIR_LOSSES + MARGIN_SOFTMAX) <= set(LOSSES.names())
    assert not set(PAIR_LOSSES) & set(PROXY_LOSSES)
    with pytest.raises(ConfigError, match="mining"):
        TripletLoss(C, D, mining="hardest")
    with pytest.raises(ConfigError, match="scale"):
        ArcFaceLoss(C, D, scale=0)
    with pytest.raises(ConfigError, match="pos_margin"):
        ContrastiveLoss(C, D, pos_margin=1.0, neg_margin=0.5)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pair_losses_contract(name):
    torch.manual_seed(0)
    loss = build_loss(name, C, D)
    assert isinstance(loss, PairLoss) and not hasattr(loss, "proxies")
    groups = loss.param_groups(1e-3)
    assert [p for g in groups for p in g["params"]] == list(loss.parameters())
    emb, labels = _batch(0)
    e = emb.float().requires_grad_(True)
    out = loss(e, labels)
    out.backward()
    assert out.dtype == torch.float32 and out.item() > 0 and torch.isfinite(e.grad).all()
    assert "proxy" in loss.last_terms and not loss.last_terms["proxy"].requires_grad
    _close(loss.last_terms["proxy"].double(), out.detach().double())
    # no pair to learn from (a batch of one): a zero loss that backpropagates
    e = emb[:1].float().requires_grad_(True)
    zero = loss(e, torch.tensor([2]))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pair_losses_reuse_the_input_checks_and_dtype_policy(name):
    loss = build_loss(name, C, D)
    with pytest.raises(InputError, match="out of range"):
        loss(torch.randn(3, D), torch.tensor([0, 1, C]))
    with pytest.raises(InputError, match="embedding dim mismatch"):
        loss(torch.randn(3, D + 1), torch.tensor([0, 1, 1]))
    with pytest.raises(InputError, match="NaN"):
        loss(torch.full((3, D), float("nan")), torch.tensor([0, 1, 1]))
    head = torch.nn.Linear(5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = head(torch.randn(len(LABELS), 5))
        out = loss(emb, LABELS)
    assert emb.dtype == torch.bfloat16 and out.dtype == torch.float32


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_nir_refuses_losses_without_proxies(name):
    from nirdml.nir import NIRLoss

    with pytest.raises(ConfigError) as err:
        NIRLoss.from_options(build_loss(name, C, D), 0.1)
    message = str(err.value)
    assert "NIR needs class proxies" in message and "proxy loss" in message
    for proxy_loss in ("proxy_anchor", "arcface", "soft_triple"):
        assert proxy_loss in message


def test_a_config_with_nir_around_a_pair_loss_is_a_one_line_error(capsys):
    from nirdml.cli import main
    from nirdml.training.config import load_config

    with pytest.raises(ConfigError, match="class proxies"):
        load_config("digits", ["loss.name=triplet", "loss.nir.enabled=true"])
    assert main(["train", "--set", "loss.name=triplet", "--set", "loss.nir.enabled=true",
                 "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs class proxies" in err and "proxy_anchor" in err
    with pytest.raises(ConfigError, match="proxy_lr_multiplier"):
        load_config("omniglot_pa", ["loss.name=contrastive"])


@pytest.mark.parametrize("name", ["contrastive", "margin"])
def test_the_trainer_builds_an_optimiser_for_losses_without_proxies(name):
    from nirdml.models import build_model as build_net
    from nirdml.training import builders
    from nirdml.training.config import load_config

    cfg = load_config("digits", [f"loss.name={name}", "loss.nir.enabled=false",
                                 "loss.proxy_lr_multiplier=null"])
    criterion = builders.build_criterion(cfg, 5)
    model = build_net("small_cnn", embedding_dim=cfg.model.embedding_dim, in_chans=1)
    optimizer = builders.build_optimizer(cfg, model, criterion)
    names = [g["name"] for g in optimizer.param_groups]
    assert set(names) == {"backbone", "head"} | ({"beta"} if name == "margin" else set())
    if name == "margin":
        assert optimizer.param_groups[-1]["params"] == [criterion.beta]


def test_triplet_mining_in_blocks_equals_one_pass(monkeypatch):
    import nirdml.losses.triplet as triplet

    emb, labels = _batch(7, spread=1.0)
    dist = pairwise_distance(emb)
    whole = triplet.mine_triplets(dist, labels, 0.2)
    monkeypatch.setattr(triplet, "_BLOCK_ENTRIES", 3 * len(labels) ** 2)  # blocks of 3 anchors
    blocks = triplet.mine_triplets(dist, labels, 0.2)
    assert len(whole[0]) > 0 and all(torch.equal(u, v) for u, v in zip(whole, blocks))
