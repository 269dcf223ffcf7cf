"""Sharded proxy losses on one process: the one-shard case is the dense loss, and a sampled
step equals the dense loss of the sub-problem made of the kept classes (Partial FC's rule).
The multi-rank cases (2 and 3 gloo ranks under DDP) are in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from nirdml.errors import ConfigError
from nirdml.losses import PROXY_LOSSES, build_loss
from nirdml.losses.shard import ClassShard, NegativeSampler

C, D = 13, 8
LABELS = torch.tensor([0, 0, 3, 3, 5, 5, 12, 12, 7, 7])


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(len(LABELS), D, generator=g, dtype=torch.float64)


def _value_and_grads(loss, x, labels):
    x = x.clone().requires_grad_(True)
    value = loss(x, labels)
    value.backward()
    return value.detach(), x.grad, loss.proxies.grad


def test_ranges_cover_every_class_once():
    for world in (1, 2, 3, 5):
        ranges = ClassShard.ranges(C, world)
        assert ranges[0][0] == 0 and ranges[-1][1] == C
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(h - lo for lo, h in ranges) - min(h - lo for lo, h in ranges) <= 1
    assert ClassShard.split(C, 0, 1).is_whole


@pytest.mark.parametrize("name", PROXY_LOSSES)
def test_one_shard_is_the_dense_loss(name):
    dense = build_loss(name, C, D).double()
    whole = build_loss(name, C, D, shard=ClassShard.whole(C)).double()
    whole.load_state_dict(dense.state_dict())
    x = _batch()
    for a, b in zip(_value_and_grads(dense, x, LABELS), _value_and_grads(whole, x, LABELS),
                    strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dense.class_proxies(x, LABELS), whole.class_proxies(x, LABELS))


def test_block_init_is_the_same_on_any_world_size():
    full = build_loss("proxy_anchor", 2500, D, shard=ClassShard.whole(2500), seed=4).proxies
    for world in (2, 3):
        parts = [build_loss("proxy_anchor", 2500, D, shard=ClassShard(2500, lo, hi), seed=4)
                 .proxies for lo, hi in ClassShard.ranges(2500, world)]
        assert torch.equal(torch.cat(parts), full)
    assert 0.11 < float(full.detach().std()) < 0.14  # N(0, 1) / 8


def test_the_sample_depends_on_seed_step_and_rank_only():
    shard = ClassShard.whole(C)
    sampler = NegativeSampler(0.5, seed=1)
    a, b = sampler.kept(shard, LABELS, 7), sampler.kept(shard, LABELS, 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, sampler.kept(shard, LABELS, 8))
    assert set(LABELS.tolist()) <= set(a.tolist())
    assert len(a) == max(len(set(LABELS.tolist())), int(0.5 * C))
    assert len(NegativeSampler(0.1).kept(shard, LABELS, 0)) == len(set(LABELS.tolist()))
    assert torch.equal(NegativeSampler(1.0).kept(shard, LABELS, 0), torch.arange(C))


@pytest.mark.parametrize("name", PROXY_LOSSES)
@pytest.mark.parametrize("rate", [0.7, 0.2])
def test_a_sampled_step_is_the_dense_loss_of_the_kept_classes(name, rate):
    sampled = build_loss(name, C, D, sample_rate=rate, seed=2).double()
    sampled.set_step(5)
    kept = sampled.sampler.kept(ClassShard.whole(C), LABELS, 5)
    k = sampled.proxies_per_class
    rows = (kept[:, None] * k + torch.arange(k)).flatten()
    sub = build_loss(name, len(kept), D).double()
    with torch.no_grad():
        sub.proxies.copy_(sampled.proxies[rows])
    renumbered = torch.searchsorted(kept, LABELS)
    x = _batch()
    value, x_grad, p_grad = _value_and_grads(sampled, x, LABELS)
    want_value, want_x_grad, want_p_grad = _value_and_grads(sub, x, renumbered)
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(p_grad[rows], want_p_grad, rtol=1e-10, atol=1e-14)
    dropped = torch.ones(len(p_grad), dtype=torch.bool)
    dropped[rows] = False
    assert dropped.any() and not p_grad[dropped].any()  # unkept proxies: no gradient


@pytest.mark.parametrize("rate", [0.0, 1.5, -1])
def test_sample_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        build_loss("proxy_anchor", C, D, sample_rate=rate)
