"""Tests of nirdml.nir.ConditionalGlowFlow: parity with FrEIA 0.2 (float64: values, log-dets and
all gradients), invertibility, log-det against a brute-force Jacobian, every conditioning mode,
state-dict round trips, parameter counts, RNG hygiene, dtype policy and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import need
from nirdml.errors import ConfigError, InputError
from nirdml.nir import COND_MODES, ConditionalGlowFlow

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


def _mlp(depth, width):
    def ctor(c_in, c_out):
        layers, d = [], c_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, c_out))
        return nn.Sequential(*layers)

    return ctor


def _freia(dim, cond_blocks, num_blocks=5, depth=8, width=128):
    """The release's flow built with FrEIA; restores numpy's global RNG (FrEIA reseeds it)."""
    Ff, Fm = need("FrEIA.framework"), need("FrEIA.modules")
    state = np.random.get_state()
    try:
        inn = Ff.SequenceINN(dim)
        for k in range(num_blocks):
            inn.append(Fm.PermuteRandom, seed=k)
            kw = {"cond": 0, "cond_shape": (dim,)} if k in cond_blocks else {}
            inn.append(Fm.GLOWCouplingBlock, subnet_constructor=_mlp(depth, width), clamp=2.0,
                       clamp_activation="ATAN", **kw)
    finally:
        np.random.set_state(state)
    return inn


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _close(a, b, rtol=RTOL):
    assert a.shape == b.shape
    assert _rel(a, b) <= rtol, _rel(a, b)


def _freia_param_grads(flow, inn):
    """FrEIA's parameter gradients mapped onto our parameter layout."""
    blocks = [m for m in inn.module_list if hasattr(m, "subnet1")]
    grads = {n: torch.zeros_like(p) for n, p in flow.named_parameters()}
    for k, blk in enumerate(blocks):
        for s, net in ((2 * k, blk.subnet2), (2 * k + 1, blk.subnet1)):
            lin = [m for m in net if isinstance(m, nn.Linear)]
            n_in = flow.w_in[s].shape[1]
            grads[f"w_in.{s}"] = lin[0].weight.grad[:, :n_in]
            slot = flow._cond_slot[s]
            if slot >= 0:
                grads["cond_weight"][slot] = lin[0].weight.grad[:, n_in:]
            grads["in_bias"][s] = lin[0].bias.grad
            for i, layer in enumerate(lin[1:-1]):
                grads[f"w_hidden.{s}"][i] = layer.weight.grad
                grads[f"b_hidden.{s}"][i] = layer.bias.grad
            grads[f"w_out.{s}"] = lin[-1].weight.grad
            grads[f"b_out.{s}"] = lin[-1].bias.grad
    return grads


def _batch(dim, n=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    # repeated conditions, as in a DML batch (exercises the distinct-row path)
    proxies = torch.randn(4, dim, generator=g, dtype=dtype)
    cond = proxies[torch.tensor([0, 1, 0, 2, 3, 3, 1, 0, 2])[:n]]
    return x, cond


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize(
    "dim,mode",
    [(2, "dense"), (3, "dense"), (7, "dense"), (128, "dense"), (7, "start"), (7, "mid"),
     (7, "end")],
)
def test_parity_with_freia(dim, mode, fused):
    cond_blocks = {"dense": range(5), "start": [0], "mid": [2], "end": [4]}[mode]
    torch.manual_seed(123)
    ref = _freia(dim, list(cond_blocks)).double()
    torch.manual_seed(7)  # a different init: the weights are copied in
    flow = ConditionalGlowFlow(dim, cond_mode=mode, fused=fused).double()
    flow.load_freia_weights(ref)
    x, cond = _batch(dim)
    x1, c1 = x.clone().requires_grad_(), cond.clone().requires_grad_()
    x2, c2 = x.clone().requires_grad_(), cond.clone().requires_grad_()
    z, ld = flow(x1, c1)
    z_ref, ld_ref = ref(x2, c=[c2])
    _close(z, z_ref)
    _close(ld, ld_ref)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=z.dtype)
    v = torch.linspace(-1.0, 2.0, z.shape[0], dtype=z.dtype)
    ((z * w).sum() + (ld * v).sum()).backward()
    ((z_ref * w).sum() + (ld_ref * v).sum()).backward()
    _close(x1.grad, x2.grad)
    _close(c1.grad, c2.grad)
    ref_grads = _freia_param_grads(flow, ref)
    for name, p in flow.named_parameters():
        _close(p.grad, ref_grads[name])


def test_same_seed_gives_freias_initial_weights():
    torch.manual_seed(3)
    ref = _freia(6, range(5)).double()
    torch.manual_seed(3)
    flow = ConditionalGlowFlow(6).double()
    x, cond = _batch(6)
    z, ld = flow(x, cond)
    z_ref, ld_ref = ref(x, c=[cond])
    _close(z, z_ref)
    _close(ld, ld_ref)


def test_freia_clamp_is_the_documented_atan_form():
    Fm = need("FrEIA.modules")
    blk = Fm.GLOWCouplingBlock([(4,)], subnet_constructor=_mlp(2, 8), clamp=2.0,
                               clamp_activation="ATAN")
    u = torch.linspace(-50, 50, 101, dtype=torch.float64)
    assert blk.clamp == 2.0
    torch.testing.assert_close(blk.f_clamp(u), 0.636 * torch.atan(u), rtol=0, atol=0)
    from nirdml.nir.flow import soft_clamp

    torch.testing.assert_close(soft_clamp(u, 2.0), 2.0 * 0.636 * torch.atan(u))


def test_permutations_match_numpy_randomstate_without_touching_global_rngs():
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    np.random.seed(999)
    expected_next = np.random.rand()
    np.random.seed(999)
    flow = ConditionalGlowFlow(11, subnet_width=8, subnet_depth=2)
    assert np.random.rand() == expected_next  # construction left numpy's global RNG alone
    for k in range(5):
        assert flow.perms[k].tolist() == np.random.RandomState(k).permutation(11).tolist()
        assert torch.equal(flow.perms[k][flow.inv_perms[k]], torch.arange(11))
    x, cond = _batch(11, dtype=torch.float32)
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    flow.nll(x.requires_grad_(), cond).sum().backward()
    flow.inverse(x.detach(), cond)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_log_det_matches_brute_force_jacobian(fused):
    for dim in (4, 5, 6):
        torch.manual_seed(dim)
        flow = ConditionalGlowFlow(dim, subnet_width=32, subnet_depth=3, fused=fused).double()
        x, cond = _batch(dim, n=3, seed=dim)
        _, ld = flow(x, cond)
        for i in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(
                lambda xi, f=flow, c=cond[i:i + 1]: f(xi[None], c)[0][0], x[i]
            )
            sign, logabs = torch.linalg.slogdet(jac)
            assert abs(sign.item()) == 1.0  # couplings: det > 0; permutations: det = +-1
            torch.testing.assert_close(ld[i], logabs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", COND_MODES)
def test_every_cond_mode(mode):
    dim, n = 7, 9
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(dim, cond_mode=mode, subnet_width=16, subnet_depth=3).double()
    x, cond = _batch(dim, n=n)
    x = x.requires_grad_()
    z, ld = flow(x, cond)
    assert z.shape == (n, dim) and ld.shape == (n,)
    z2, ld2 = flow(x, cond)
    assert torch.equal(z, z2) and torch.equal(ld, ld2)  # deterministic
    # invertible; the inverse log-det cancels the forward one
    x_back, ld_inv = flow.inverse(z, cond, return_log_det=True)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-10, atol=1e-12)
    # the condition matters, in every mode
    z_other, _ = flow(x, cond.flip(0))
    assert not torch.allclose(z_other, z)
    # gradients reach the input and every parameter, finite and non-zero
    flow.nll(x, cond).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # fused and plain agree in every mode
    plain = ConditionalGlowFlow(dim, cond_mode=mode, subnet_width=16, subnet_depth=3,
                                fused=False).double()
    plain.load_state_dict(flow.state_dict())
    torch.testing.assert_close(plain(x, cond)[0], z, rtol=1e-12, atol=1e-12)
    # sampling
    s = flow.sample(cond, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (n, dim) and torch.isfinite(s).all()
    s2 = flow.sample(cond, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


def test_log_prob_and_nll():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(6, subnet_width=16, subnet_depth=3).double()
    x, cond = _batch(6)
    z, ld = flow(x, cond)
    nll = flow.nll(x, cond)
    torch.testing.assert_close(nll, 0.5 * z.square().sum(1) - ld)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + ld
    torch.testing.assert_close(flow.log_prob(x, cond), expected)


def test_flow_learns_a_conditional_density_and_uses_its_condition(one_thread):
    """Fit x = proxy_y + sigma * noise given proxy_y: the optimum NLL (constant dropped) is
    D log(sigma) + D/2 nats, reachable only through the condition (50 classes)."""
    torch.manual_seed(0)
    dim, classes, sigma = 16, 50, 0.05
    protos = nn.functional.normalize(torch.randn(classes, dim), dim=1)
    flow = ConditionalGlowFlow(dim, num_blocks=3, subnet_depth=3, subnet_width=64)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    def batch(n):
        y = torch.randint(0, classes, (n,))
        return protos[y] + sigma * torch.randn(n, dim), y

    for _ in range(300):
        x, y = batch(256)
        loss = flow.nll(x, protos[y]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(2000)
    with torch.no_grad():
        own = flow.nll(x, protos[y]).mean().item()
        other = flow.nll(x, protos[(y + 1) % classes]).mean().item()
    optimum = dim * math.log(sigma) + dim / 2  # -39.93
    assert optimum - 0.5 < own < optimum + 2.0
    # the wrong proxy explains the sample far worse (634 nats here; README: "> 500 nats"; with
    # the condition zeroed the gap is ~0)
    assert other > own + 500


def test_fused_equals_plain_and_workspaces_are_not_shared():
    torch.manual_seed(0)
    fused = ConditionalGlowFlow(9, subnet_width=24, subnet_depth=4).double()
    plain = ConditionalGlowFlow(9, subnet_width=24, subnet_depth=4, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    batches = [_batch(9, seed=s) for s in (1, 2)]

    def grads(flow, order):
        outs = [flow.nll(x.clone().requires_grad_(), c).sum() for x, c in batches]
        result = []
        for i in order:  # two graphs alive at once, backpropagated in either order
            flow.zero_grad()
            outs[i].backward()
            result.append([p.grad.clone() for p in flow.parameters()])
        return result

    ref = grads(plain, [0, 1])
    for order in ([0, 1], [1, 0]):
        got = grads(fused, order)
        for i, g in zip(order, got):
            for a, b in zip(g, ref[i]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_backward_guards_and_retain_graph():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(5, subnet_width=8, subnet_depth=3).double()
    x, cond = _batch(5)
    x.requires_grad_()
    # an in-place change of z before backward is caught
    z, ld = flow(x, cond)
    z.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (z.sum() + ld.sum()).backward()
    # backpropagating the same graph twice (retain_graph) works: the workspace is kept
    x.grad = None
    nll = flow.nll(x, cond).sum()
    nll.backward(retain_graph=True)
    g1 = x.grad.clone()
    flow.nll(x.detach() * 3, cond).sum()  # another pass in between must not clobber it
    nll.backward()
    torch.testing.assert_close(x.grad, 2 * g1, rtol=1e-12, atol=1e-14)
    # first-order only
    x.grad = None
    g, = torch.autograd.grad(flow.nll(x, cond).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()
    # double backward needs the plain implementation
    plain = ConditionalGlowFlow(5, subnet_width=8, subnet_depth=3, fused=False).double()
    g, = torch.autograd.grad(plain.nll(x, cond).sum(), x, create_graph=True)
    g.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_workspaces_are_reused_not_leaked(monkeypatch):
    import nirdml.nir._fused as fused_mod

    created = []
    original = fused_mod._Workspace.__init__

    def counting_init(self, *args, **kwargs):
        created.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fused_mod._Workspace, "__init__", counting_init)
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(6, subnet_width=8, subnet_depth=3).double()
    x, cond = _batch(6)
    x.requires_grad_()
    for _ in range(6):  # a training loop: the previous graph is alive during the next forward
        loss = flow.nll(x, cond).sum()
        loss.backward()
    assert len(created) == 2
    del loss
    assert len(flow._pool._free) == 2
    with torch.no_grad():
        flow(x, cond)
    assert len(created) == 2


def test_parameter_views_follow_a_replaced_tensor():
    # the fused pass keeps views of the parameters between passes; a parameter given a new
    # tensor (``.data = ...``, not an in-place update) must be read from its new storage
    torch.manual_seed(0)
    fused = ConditionalGlowFlow(6, subnet_width=8, subnet_depth=4).double()
    plain = ConditionalGlowFlow(6, subnet_width=8, subnet_depth=4, fused=False).double()
    x, cond = _batch(6)
    fused.nll(x, cond)
    for p in (fused.w_hidden[3], fused.b_out[0], fused.w_in[5]):
        p.data = torch.randn_like(p)
    with torch.no_grad():
        fused.w_out[2].mul_(2.0)  # in place: the same storage
    plain.load_state_dict(fused.state_dict())
    torch.testing.assert_close(fused.nll(x, cond), plain.nll(x, cond), rtol=1e-12, atol=1e-12)


def test_distinct_conditions_take_the_plain_condition_path():
    from nirdml.nir._fused import distinct_rows

    x, cond = _batch(7)
    assert distinct_rows(cond) is not None
    idx, inv = distinct_rows(cond)
    assert torch.equal(cond[idx][inv], cond)
    distinct = torch.randn(9, 7, dtype=torch.float64)
    assert distinct_rows(distinct) is None
    torch.manual_seed(0)
    fused = ConditionalGlowFlow(7, subnet_width=16, subnet_depth=3).double()
    plain = ConditionalGlowFlow(7, subnet_width=16, subnet_depth=3, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    for c in (cond, distinct):
        c1, c2 = c.clone().requires_grad_(), c.clone().requires_grad_()
        fused.nll(x, c1).sum().backward()
        plain.nll(x, c2).sum().backward()
        torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_and_frozen_calls():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(6, subnet_width=8, subnet_depth=3).double()
    x, cond = _batch(6)
    with torch.no_grad():
        z0, ld0 = flow(x, cond)
    z1, ld1 = flow(x, cond)
    assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    flow.requires_grad_(False)
    z2, _ = flow(x, cond)
    assert not z2.requires_grad and torch.equal(z2, z0)


def test_state_dict_round_trip_keeps_permutations():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(8, subnet_width=8, subnet_depth=3).double()
    sd = flow.state_dict()
    assert "perms" in sd and "inv_perms" not in sd
    custom = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(k))
                          for k in range(5)])
    sd["perms"] = custom
    torch.manual_seed(1)
    other = ConditionalGlowFlow(8, subnet_width=8, subnet_depth=3).double()
    other.load_state_dict(sd)
    assert torch.equal(other.perms, custom)
    for k in range(5):  # the inverse permutations follow the loaded ones
        assert torch.equal(other.perms[k][other.inv_perms[k]], torch.arange(8))
    x, cond = _batch(8)
    z, _ = other(x, cond)
    torch.testing.assert_close(other.inverse(z, cond), x, rtol=1e-10, atol=1e-12)
    flow.load_state_dict(sd)
    torch.testing.assert_close(flow(x, cond)[0], z, rtol=0, atol=0)


def test_parameter_counts_match_the_paper():
    def count(dim):
        return sum(p.numel() for p in ConditionalGlowFlow(dim).parameters())

    n128, n512 = count(128), count(512)
    assert n128 == 10 * ((64 + 128) * 128 + 128 + 6 * (128 * 128 + 128) + 128 * 128 + 128)
    assert n512 == 10 * ((256 + 512) * 128 + 128 + 6 * (128 * 128 + 128) + 128 * 256 * 2 + 512)
    assert round(n128 / 1e6, 2) == 1.40 and round(n512 / 1e6, 2) == 2.64


def test_split_uses_python_rounding():
    assert ConditionalGlowFlow(3, subnet_width=4, subnet_depth=2).split == (2, 1)
    assert ConditionalGlowFlow(5, subnet_width=4, subnet_depth=2).split == (2, 3)
    assert ConditionalGlowFlow(7, subnet_width=4, subnet_depth=2).split == (4, 3)


def test_low_precision_inputs_and_autocast_run_in_float32():
    torch.manual_seed(0)
    flow = ConditionalGlowFlow(8, subnet_width=16, subnet_depth=3)
    x, cond = _batch(8, dtype=torch.float32)
    z32, ld32 = flow(x, cond)
    zh, ldh = flow(x.to(torch.bfloat16), cond.to(torch.bfloat16))
    assert zh.dtype == torch.float32 and ldh.dtype == torch.float32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        za, lda = flow(x, cond)
        nll = flow.nll(x, cond)
    assert za.dtype == torch.float32 and nll.dtype == torch.float32
    torch.testing.assert_close(za, z32, rtol=0, atol=0)
    torch.testing.assert_close(lda, ld32, rtol=0, atol=0)


def test_config_errors():
    with pytest.raises(ConfigError, match="dense_embed_multi"):
        ConditionalGlowFlow(8, cond_mode="everywhere")
    with pytest.raises(ConfigError, match="dim >= 2"):
        ConditionalGlowFlow(1)
    with pytest.raises(ConfigError, match="subnet_depth"):
        ConditionalGlowFlow(8, subnet_depth=1)
    with pytest.raises(ConfigError, match="clamp"):
        ConditionalGlowFlow(8, clamp=float("nan"))
    flow = ConditionalGlowFlow(8, cond_mode="dense_embed", subnet_width=4, subnet_depth=2)
    with pytest.raises(ConfigError, match="FrEIA"):
        flow.load_freia_weights(_freia(8, range(5), depth=2, width=4))


def test_input_errors():
    flow = ConditionalGlowFlow(6, subnet_width=4, subnet_depth=2)
    x = torch.randn(4, 6)
    cond = torch.randn(4, 6)
    with pytest.raises(InputError, match=r"shape \(batch >= 1, 6\)"):
        flow(torch.randn(4, 5), cond)
    with pytest.raises(InputError, match="batch >= 1"):
        flow(torch.randn(0, 6), torch.randn(0, 6))
    with pytest.raises(InputError, match="must have shape"):
        flow(torch.randn(6), cond)
    with pytest.raises(InputError, match="pass cond"):
        flow(x)
    with pytest.raises(InputError, match=r"cond must have shape \(4, 6\)"):
        flow(x, torch.randn(3, 6))
    with pytest.raises(InputError, match="floating point"):
        flow(x.long(), cond)
    with pytest.raises(InputError, match="torch.Tensor"):
        flow(x.numpy(), cond)
    with pytest.raises(InputError, match="cond"):
        flow.sample(torch.randn(6))


def test_nll_is_finite_on_the_unit_sphere_at_init():
    torch.manual_seed(0)
    for dim in (128, 512):
        flow = ConditionalGlowFlow(dim)
        x = torch.nn.functional.normalize(torch.randn(16, dim), dim=1)
        cond = torch.nn.functional.normalize(torch.randn(16, dim), dim=1)
        nll = flow.nll(x, cond)
        assert torch.isfinite(nll).all() and nll.abs().max() < 50
        assert math.isfinite(torch.exp(nll).mean().item())
