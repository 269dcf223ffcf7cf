"""Tests of nirdml.nir.monitor (the NIR mechanism metrics) and their per-epoch logging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nirdml.losses import ProxyAnchorLoss
from nirdml.nir import NIRLoss
from nirdml.nir.monitor import (
    collapse_metrics,
    condition_metrics,
    flow_drift,
    flow_state,
    gradient_share,
)

D = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


def test_collapse_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, D, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    got = collapse_metrics(x, y)
    xn = F.normalize(x.double(), dim=1)
    between, within = [], []
    for i in range(12):
        for j in range(12):
            if i != j:
                (within if y[i] == y[j] else between).append(float(xn[i] @ xn[j]))
    assert got["cos_between"] == pytest.approx(np.mean(between), abs=1e-12)
    assert got["cos_within"] == pytest.approx(np.mean(within), abs=1e-12)
    collapsed = collapse_metrics(torch.ones(6, D), torch.arange(6) % 3)
    assert collapsed["cos_between"] == pytest.approx(1.0)


class GaussianAroundCondition(nn.Module):
    """A stand-in flow: x ~ N(cond, s^2 I), so the NLL given each proxy is known."""

    def __init__(self, s=0.1):
        super().__init__()
        self.s = s
        self.w = nn.Parameter(torch.zeros(1))

    def nll(self, x, cond):
        return 0.5 * ((x - cond) ** 2).sum(1) / self.s**2 + D * math.log(self.s)


class StandInCriterion(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        base = ProxyAnchorLoss(num_classes, D)
        with torch.no_grad():
            base.proxies.copy_(torch.randn(num_classes, D, generator=g))
        self.base_loss, self.flow = base, GaussianAroundCondition()


def test_condition_metrics_with_a_known_density():
    crit = StandInCriterion(5)
    y = torch.arange(20) % 5
    proxies = F.normalize(crit.base_loss.proxies.detach(), dim=1)
    g = torch.Generator().manual_seed(2)
    x = F.normalize(proxies[y] + 0.02 * torch.randn(20, D, generator=g), dim=1)
    got = condition_metrics(crit, x, y, seed=3)
    own = crit.flow.nll(x, proxies[y])
    g = torch.Generator().manual_seed(3)  # the documented draw of the other class
    other = (y + torch.randint(1, 5, y.shape, generator=g)) % 5
    assert (other != y).all()
    other_nll = crit.flow.nll(x, proxies[other])
    assert got["nll_own_proxy"] == pytest.approx(own.mean().item(), rel=1e-6)
    assert got["condition_gain_nats"] == pytest.approx((other_nll - own).mean().item(), rel=1e-6)
    assert got["condition_gain_nats"] > 10  # embeddings sit at their own proxy
    assert got["class_id_acc"] == 1.0 and got["class_id_chance"] == pytest.approx(0.2)
    # embeddings placed at the *next* class's proxy: the flow identifies that class instead
    shifted = condition_metrics(crit, proxies[(y + 1) % 5], y, seed=3)
    assert shifted["class_id_acc"] == 0.0 and shifted["condition_gain_nats"] < 0


def _nir(**kw):
    torch.manual_seed(0)
    return NIRLoss.from_options(ProxyAnchorLoss(4, D), subnet_width=16, subnet_depth=3, **kw)


def test_gradient_share_against_autograd_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(4))
    nir = _nir(mode="paper", weight=0.5)
    share = gradient_share(nir, x, labels)
    a = x.clone().requires_grad_()
    nir.base_loss(a, labels).backward()
    b = x.clone().requires_grad_()
    (0.5 * nir.flow.nll(F.normalize(b, dim=1), nir.base_loss.class_proxies(b, labels)).mean()
     ).backward()
    expected = b.grad.norm() / (b.grad.norm() + a.grad.norm())
    assert share == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < share < 1
    assert gradient_share(_nir(mode="paper", weight=0.0), x, labels) == 0.0
    warming = _nir(mode="paper", weight=0.5, warmup_epochs=3)
    warming.set_epoch(0)
    assert gradient_share(warming, x, labels) == 0.0  # the warm-up keeps NIR off the embeddings


def test_flow_drift():
    nir = _nir(weight=1.0)
    start = flow_state(nir.flow)
    assert flow_drift(nir.flow, start) == {"drift": 0.0, "drift_max": 0.0}
    with torch.no_grad():
        nir.flow.in_bias[0, 0] += 0.25
    ref = math.sqrt(sum(float(v.double().square().sum()) for v in start.values()))
    got = flow_drift(nir.flow, start)
    assert got["drift_max"] == pytest.approx(0.25)
    assert got["drift"] == pytest.approx(0.25 / ref, rel=1e-6)


def _digits_run(tmp_path, name, overrides):
    from nirdml.training import train

    out = tmp_path / name
    final = train("digits", out_dir=out, overrides=[
        "train.epochs=2", "train.progress=false", "train.tensorboard=false",
        "model.embedding_dim=16", *overrides])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return final, history


@pytest.mark.slow
def test_mechanism_metrics_are_logged_and_change_nothing(tmp_path):
    """Every epoch of a NIR run logs the mechanism metrics; computing them draws no random
    numbers, so the run with them trains exactly as the run without them."""
    final, history = _digits_run(tmp_path, "probe", ["train.probe_classes=5"])
    bare, bare_history = _digits_run(tmp_path, "bare", ["train.probe_classes=0"])
    assert final["recall@1"] == bare["recall@1"] and final["map@r"] == bare["map@r"]
    assert history[-1]["train/proxy"] == bare_history[-1]["train/proxy"]
    for record in history:
        for key in ("probe/condition_gain_nats", "probe/class_id_acc", "probe/nir_grad_share",
                    "probe/cos_between", "probe/cos_within", "flow/drift", "flow/drift_max",
                    "train/nll", "train/nll_max", "train/material", "train/nir"):
            assert key in record and math.isfinite(record[key]), key
    assert history[-1]["flow/drift"] > 0  # the flow trained
    assert "probe/cos_between" not in bare_history[-1]
    _, base_history = _digits_run(tmp_path, "base", ["loss.nir.enabled=false"])
    assert "probe/cos_between" in base_history[-1] and "flow/drift" not in base_history[-1]
