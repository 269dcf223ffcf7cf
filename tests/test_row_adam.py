"""RowAdam (optim.proxy_update=rows): torch's Adam where every row has a gradient; rows without
one keep their value and moments; the row update is Adam's on the rows that moved."""

from __future__ import annotations

import pytest
import torch

from nirdml.errors import ConfigError
from nirdml.training.row_adam import RowAdam, RowAdamW


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(12, 5, generator=g, dtype=torch.float64))


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 5, generator=g, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize(("ours", "torchs", "decay"), [(RowAdam, torch.optim.Adam, 0.0),
                                                       (RowAdam, torch.optim.Adam, 0.1),
                                                       (RowAdamW, torch.optim.AdamW, 0.1)])
def test_every_row_with_a_gradient_is_torch_adam(ours, torchs, decay):
    a, b, other_a, other_b = _table(), _table(), _table(2), _table(2)
    opt_a = ours([{"params": [a], "rows": True}, {"params": [other_a]}], lr=0.05,
                 weight_decay=decay)
    opt_b = torchs([{"params": [b]}, {"params": [other_b]}], lr=0.05, weight_decay=decay,
                   foreach=False)
    for grad in _grads(4):
        for p in (a, b, other_a, other_b):
            p.grad = grad.clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(other_a, other_b, rtol=0, atol=0)   # torch's own update
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key])


def test_rows_without_a_gradient_stay_and_the_others_get_adam_on_their_own():
    table = _table()
    start = table.detach().clone()
    opt = RowAdam([{"params": [table], "rows": True}], lr=0.05)
    grads = _grads(3)
    moved = [torch.tensor([0, 3, 4]), torch.tensor([3, 7]), torch.tensor([0, 1, 3])]
    for grad, rows in zip(grads, moved, strict=True):
        sparse = torch.zeros_like(grad)
        sparse[rows] = grad[rows]
        table.grad = sparse
        opt.step()
    never = [2, 5, 6, 8, 9, 10, 11]
    assert torch.equal(table[never], start[never])
    assert not opt.state[table]["exp_avg"][never].any()
    # row 3 moved at every step: torch's Adam on that row alone, the same three gradients
    row = torch.nn.Parameter(start[3:4].clone())
    ref = torch.optim.Adam([row], lr=0.05, foreach=False)
    for grad in grads:
        row.grad = grad[3:4].clone()
        ref.step()
    torch.testing.assert_close(table[3:4], row, rtol=1e-12, atol=1e-14)
    # row 7 moved once, at step 2: its moments start there, the bias correction is of step 2
    m = 0.1 * grads[1][7]
    v = 0.001 * grads[1][7] ** 2
    want = start[7] - 0.05 * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8)
    torch.testing.assert_close(table[7], want, rtol=1e-12, atol=1e-14)


def test_amsgrad_is_refused():
    table = _table()
    opt = RowAdam([{"params": [table], "rows": True}], lr=0.05, amsgrad=True)
    table.grad = torch.ones_like(table)
    with pytest.raises(ConfigError, match="plain Adam"):
        opt.step()


def test_the_config_builds_it_for_the_proxies_only():
    from nirdml.losses import build_loss
    from nirdml.models import build_model
    from nirdml.training.builders import build_optimizer
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["optim.proxy_update=rows"])
    model = build_model("small_cnn", embedding_dim=64, in_chans=1)
    opt = build_optimizer(cfg, model, build_loss("proxy_anchor", 5, 64))
    assert isinstance(opt, RowAdam)
    assert {g["name"]: g["rows"] for g in opt.param_groups}["proxies"] is True
    assert sum(g["rows"] for g in opt.param_groups) == 1
    with pytest.raises(ConfigError, match="optim.proxy_update='rows' updates class proxies"):
        load_config("digits", ["optim.proxy_update=rows", "loss.name=triplet",
                               "loss.nir.enabled=false"])
