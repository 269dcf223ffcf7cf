"""Tests of nirdml.nir.conditioning: a new conditioning scheme is one class plus its registration
(a toy class defined here drives the flow, fused and plain, and is accepted by the config),
and ``nirdml.nir`` itself imports without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from nirdml.errors import ConfigError
from nirdml.nir import COND_MODES, ConditionalGlowFlow
from nirdml.nir import conditioning as cmod


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


class GatedEveryOtherBlock(cmod.Conditioning):
    """Toy scheme: blocks 0, 2, 4, ... see the condition scaled by a learnt per-feature gain."""

    name = "toy_gated_every_other"

    def __init__(self, num_blocks, cond_dim, width, embed_dim=None):
        super().__init__(num_blocks, cond_dim, width, embed_dim)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, cond_dim))

    def conditioned_blocks(self, num_blocks):
        return range(0, num_blocks, 2)

    def features(self, cond: Tensor) -> Tensor:
        return cond * self.gain


@pytest.fixture
def toy_mode():
    cmod.register_conditioning(GatedEveryOtherBlock)
    yield GatedEveryOtherBlock.name
    del cmod.CONDITIONINGS[GatedEveryOtherBlock.name]


def _batch(dim, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    proxies = torch.randn(4, dim, generator=g, dtype=torch.float64)
    return x, proxies[torch.tensor([0, 1, 0, 2, 3, 3, 1, 0, 2])[:n]]  # repeated conditions


def test_a_registered_toy_conditioning_drives_the_flow(toy_mode):
    torch.manual_seed(0)
    kw = {"cond_mode": toy_mode, "subnet_width": 16, "subnet_depth": 3}
    flow = ConditionalGlowFlow(7, **kw).double()
    assert isinstance(flow.conditioning, GatedEveryOtherBlock)
    assert flow.cond_blocks == (0, 2, 4)
    assert flow._cond_slot == (0, 1, -1, -1, 2, 3, -1, -1, 4, 5)
    assert flow.cond_weight.shape == (6, 16, 7)
    assert "cond_nets.gain" in flow.state_dict()
    x, cond = _batch(7)
    x = x.requires_grad_()
    z, ld = flow(x, cond)
    x_back, ld_inv = flow.inverse(z, cond, return_log_det=True)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(flow(x, cond.flip(0))[0], z)  # the condition matters
    # fused (distinct-row path) and plain agree, values and every gradient (the gain's too)
    plain = ConditionalGlowFlow(7, fused=False, **kw).double()
    plain.load_state_dict(flow.state_dict())
    for f in (flow, plain):
        f.nll(x, cond).sum().backward()
    for (name, p), q in zip(flow.named_parameters(), plain.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert flow.cond_nets.gain.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="FrEIA"):  # not declared freia_equivalent
        flow.load_freia_weights(nn.Sequential())


def test_registry_errors(toy_mode):
    class Clash(cmod.Conditioning):
        name = toy_mode

    with pytest.raises(ConfigError, match="already registered"):
        cmod.register_conditioning(Clash)
    with pytest.raises(ConfigError, match="non-empty class attribute"):
        cmod.register_conditioning(type("Nameless", (cmod.Conditioning,), {}))
    with pytest.raises(ConfigError, match=toy_mode):  # the choices include registered modes
        ConditionalGlowFlow(8, cond_mode="everywhere")

    class Outside(cmod.Conditioning):
        def conditioned_blocks(self, num_blocks):
            return (num_blocks,)

    with pytest.raises(ConfigError, match="conditioned blocks"):
        Outside(3, 4, 8)


def test_builtin_registry_matches_the_names():
    assert tuple(cmod.CONDITIONINGS)[:len(COND_MODES)] == COND_MODES
    for name in COND_MODES:
        assert cmod.conditioning_class(name).name == name
    blocks = {m: ConditionalGlowFlow(6, cond_mode=m, num_blocks=4, subnet_width=4,
                                     subnet_depth=2).cond_blocks for m in COND_MODES}
    assert blocks == {"dense": (0, 1, 2, 3), "dense_embed": (0, 1, 2, 3),
                      "dense_embed_multi": (0, 1, 2, 3), "start": (0,), "mid": (2,),
                      "end": (3,)}


def test_the_config_accepts_the_registered_modes_and_names_them_all():
    from nirdml.training.config import load_config

    with pytest.raises(ConfigError, match="loss.nir.cond_mode: 'nowhere'; allowed values: "
                                          + ", ".join(map(repr, cmod.CONDITIONINGS))):
        load_config("digits", ["loss.nir.cond_mode=nowhere"])

    @cmod.register_conditioning
    class FirstOnly(cmod.StartConditioning):
        name = "toy_first_only"

    try:
        cfg = load_config("digits", ["loss.nir.cond_mode=toy_first_only"])
        assert cfg.loss.nir.cond_mode == "toy_first_only"
    finally:
        cmod.CONDITIONINGS.pop("toy_first_only")


def test_the_nir_package_imports_without_torch():
    import nirdml

    src = str(Path(nirdml.__file__).resolve().parents[1])  # this checkout's nirdml
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, nirdml.nir; "
            f"assert nirdml.__file__.startswith({src!r}), nirdml.__file__; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
