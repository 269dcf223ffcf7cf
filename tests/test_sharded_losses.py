"""Sharded proxy losses on one process: the one-shard case is the dense loss, and a sampled
step equals the dense loss of the sub-problem made of the kept classes (Partial FC's rule).
The multi-rank cases (2 and 3 gloo ranks under DDP) are in tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from nirdml.errors import ConfigError
from nirdml.losses import PROXY_LOSSES, build_loss
from nirdml.losses.shard import ClassShard, NegativeSampler
from nirdml.training.distributed import end_worker_process

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


@pytest.mark.parametrize("rate", [0.0, 1.5, -1, float("nan")])
def test_sample_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ConfigError, match=r"sample_rate must be in \(0, 1\]"):
        build_loss("proxy_anchor", C, D, sample_rate=rate)


# ---- several gloo ranks: each loss on its own, float64 and float32 ---------------------------
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: per world size: C (not divisible by it) and two batches with absent classes; in the first,
#: the last rank (classes [4, 7) of 7, [8, 11) of 11) owns no class of the batch
SHARDED = {
    2: (7, [[0, 0, 3, 1, 3, 0, 1, 3], [0, 2, 4, 6, 6, 2, 0, 4, 4]]),
    3: (11, [[0, 3, 5, 7, 3, 5, 0, 0], [1, 2, 5, 9, 10, 5, 1, 6, 6]]),
}
#: sampling: 40 classes; in world 3 the middle rank ([14, 27)) owns no class of the batch
SAMPLED_C = 40
SAMPLED_LABELS = [1, 5, 1, 30, 5, 30, 33, 1]
#: losses and options: ProxyAnchor also on its shifted path (alpha > 72), ProxyNCA also with the
#: cosine distance, the angular-margin losses at a scale that keeps float32 well conditioned
LOSS_CASES = {name: {} for name in PROXY_LOSSES}
LOSS_CASES.update({"proxy_anchor alpha=100": {"alpha": 100.0},
                   "proxy_nca cosine": {"distance": "cosine", "temperature": 0.1},
                   "soft_triple": {"centers_per_class": 3},
                   "arcface": {"scale": 16.0}, "cosface": {"scale": 16.0},
                   "subcenter_arcface": {"scale": 16.0}})


def _loss(case, num_classes, dtype, **kw):
    return build_loss(case.split()[0], num_classes, D, **LOSS_CASES[case], **kw).to(dtype)


def _relative(got, want):
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _all_sum(t):
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t


def _batch_of(labels, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), D, generator=g, dtype=dtype), torch.tensor(labels)


def _sharded_cases(rank, world, bad):
    num_classes, batches = SHARDED[world]
    shard = ClassShard.split(num_classes, rank, world)
    for case in LOSS_CASES:
        for dtype in TOL:
            ours = _loss(case, num_classes, dtype, shard=shard, seed=3)
            k = ours.proxies_per_class
            full = shard.gather_rows(ours.proxies, per_class=k)
            dense = _loss(case, num_classes, dtype)
            with torch.no_grad():
                dense.proxies.copy_(full)
            for b, labels in enumerate(batches):
                x, y = _batch_of(labels, dtype, seed=b)
                ours.proxies.grad = dense.proxies.grad = None
                got, want = _value_and_grads(ours, x, y), _value_and_grads(dense, x, y)
                pairs = {"value": (got[0], want[0]),
                         # each rank's embedding gradient is its shard's part of the dense one
                         "embedding grad": (_all_sum(got[1]), want[1]),
                         "proxy grad": (got[2], shard.slice_rows(want[2], k)),
                         "class_proxies": (ours.class_proxies(x, y), dense.class_proxies(x, y))}
                for what, (a, w) in pairs.items():
                    if _relative(a, w) > TOL[dtype]:
                        bad.append((case, str(dtype), world, rank, b, what, _relative(a, w)))


def _sampled_cases(rank, world, bad):
    shard = ClassShard.split(SAMPLED_C, rank, world)
    x, y = _batch_of(SAMPLED_LABELS, torch.float64, seed=4)
    for rate in (0.5, 0.2):
        kept = NegativeSampler(rate, seed=7).kept(shard, y, 3) + shard.lo
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, kept.tolist())
        all_kept = torch.tensor([c for part in everyone for c in part])
        for case in LOSS_CASES:
            ours = _loss(case, SAMPLED_C, torch.float64, shard=shard, sample_rate=rate, seed=7)
            ours.set_step(3)
            k = ours.proxies_per_class
            # the oracle: the dense loss of every rank's kept classes, labels renumbered
            rows = (all_kept[:, None] * k + torch.arange(k)).flatten()
            oracle = _loss(case, len(all_kept), torch.float64)
            with torch.no_grad():
                oracle.proxies.copy_(shard.gather_rows(ours.proxies, per_class=k)[rows])
            got = _value_and_grads(ours, x, y)
            want = _value_and_grads(oracle, x, torch.searchsorted(all_kept, y))
            local_rows = ((kept - shard.lo)[:, None] * k + torch.arange(k)).flatten()
            offset = sum(len(part) for part in everyone[:rank]) * k
            pairs = {"value": (got[0], want[0]),
                     "embedding grad": (_all_sum(got[1]), want[1]),
                     "proxy grad": (got[2][local_rows],
                                    want[2][offset: offset + len(local_rows)])}
            for what, (a, w) in pairs.items():
                if _relative(a, w) > 1e-10:
                    bad.append((case, rate, world, rank, what, _relative(a, w)))
            unkept = torch.ones(len(got[2]), dtype=torch.bool)
            unkept[local_rows] = False
            if got[2][unkept].any():
                bad.append((case, rate, world, rank, "gradient on an unkept proxy"))


def _rank_main(rank, world, store_path, out_path):
    import datetime

    torch.set_num_threads(1)
    store = torch.distributed.FileStore(store_path, world)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    bad: list = []
    try:
        _sharded_cases(rank, world, bad)
        _sampled_cases(rank, world, bad)
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, bad)
        if rank == 0:
            torch.save([b for part in everyone for b in part], out_path)
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    end_worker_process()  # gloo may abort at a normal exit (see there)


@pytest.mark.skipif(not torch.distributed.is_available(),
                    reason="torch.distributed is not available")
@pytest.mark.parametrize("world", sorted(SHARDED))
def test_sharded_losses_equal_the_dense_loss_on_gloo_ranks(world, tmp_path, monkeypatch):
    """Every proxy loss split over 2 and 3 gloo ranks: value, embedding gradient (summed over
    ranks), each rank's proxy gradient and the NIR condition equal the dense loss's on the
    gathered table (float64 to 1e-10 relative, float32 to 1e-5), with C not divisible by the
    world size, classes absent from the batch and a rank that owns none of its classes; a
    sampled step equals the dense loss of every rank's kept classes, and unkept proxies get
    no gradient."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bad.pt"
    mp.spawn(_rank_main, args=(world, str(tmp_path / "store"), str(out)), nprocs=world,
             join=True)
    bad = torch.load(out)
    assert not bad, bad
