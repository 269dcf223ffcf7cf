"""The training options the paper configs use: backbone warm-up, lr schedules, gradient
clipping, bf16 autocast on the CPU, the NIR flow warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from nirdml.training import Trainer, builders
from nirdml.training.config import load_config

FAST = ["train.progress=false", "train.tensorboard=false", "model.embedding_dim=16",
        "loss.nir.subnet_width=32", "loss.nir.subnet_depth=3", "loss.nir.num_blocks=2",
        "train.probe_classes=0"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (see conftest)."""


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _moved(before, params):
    return [not torch.equal(a, b) for a, b in zip(before, params)]


def test_warmup_freezes_the_backbone_bit_for_bit_and_trains_the_rest(tmp_path):
    cfg = load_config("digits", [*FAST, "train.epochs=2", "optim.warmup_epochs=1"])
    trainer = Trainer(cfg, tmp_path / "w")
    backbone = list(trainer.model.backbone_parameters())
    others = {"head": list(trainer.model.head_parameters()),
              "proxies": [trainer.criterion.proxies],
              "flow": list(trainer.criterion.flow.parameters())}
    b0 = _snapshot(backbone)
    o0 = {k: _snapshot(v) for k, v in others.items()}
    trainer._train_one_epoch()  # epoch 1: warm-up
    assert not any(_moved(b0, backbone))  # every backbone parameter bit-identical
    for name, params in others.items():
        assert any(_moved(o0[name], params)), name
    trainer.epoch, trainer.batch_in_epoch = 1, 0  # as fit() moves on
    trainer._train_one_epoch()  # epoch 2: the backbone trains
    assert all(_moved(b0, backbone))


def test_multistep_and_cosine_schedules_set_every_groups_lr():
    for sched, expect in (
        ("multistep", lambda lr0, e: lr0 * 0.5 ** sum(e >= m for m in (2, 3))),
        ("cosine", lambda lr0, e: lr0 * (1 + math.cos(math.pi * e / 4)) / 2),
    ):
        cfg = load_config("digits", [*FAST, "train.epochs=4", f"optim.scheduler={sched}",
                                     "optim.milestones=[2, 3]", "optim.gamma=0.5"])
        model = builders.build_model(cfg, in_chans=1)
        criterion = builders.build_criterion(cfg, num_classes=5)
        opt = builders.build_optimizer(cfg, model, criterion)
        scheduler = builders.build_scheduler(cfg, opt)
        initial = {g["name"]: g["lr"] for g in opt.param_groups}
        assert set(initial) == {"backbone", "head", "proxies", "flow"}
        for epoch in range(1, 5):
            opt.step()
            scheduler.step()
            for g in opt.param_groups:
                assert g["lr"] == pytest.approx(expect(initial[g["name"]], epoch), rel=1e-9,
                                                abs=1e-15), (sched, epoch, g["name"])


def test_gradient_clipping_bounds_the_global_norm(tmp_path):
    cfg = load_config("digits", [*FAST, "train.epochs=1", "optim.grad_clip=0.01"])
    trainer = Trainer(cfg, tmp_path / "c")
    norms = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        norms.append(torch.norm(torch.stack([g.norm() for g in grads])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    x, y = next(iter(trainer._loader()))
    for _ in range(3):
        assert trainer._step(x, y)
    assert len(norms) == 3 and max(norms) <= 0.01 * (1 + 1e-5)
    unclipped = Trainer(load_config("digits", [*FAST, "train.epochs=1"]), tmp_path / "u")
    unclipped._step(x, y)
    params = [p for g in unclipped.optimizer.param_groups for p in g["params"]
              if p.grad is not None]
    assert torch.norm(torch.stack([p.grad.norm() for p in params])).item() > 0.1  # it did clip


def test_bf16_autocast_training_steps_on_the_cpu(tmp_path):
    cfg = load_config("digits", [*FAST, "train.epochs=1", "train.amp=bf16"])
    trainer = Trainer(cfg, tmp_path / "b")
    before = _snapshot(trainer.model.parameters())
    x, y = next(iter(trainer._loader()))
    for _ in range(3):
        assert trainer._step(x, y)  # finite loss and gradients
    assert all(t.isfinite() for t in trainer.criterion.last_terms.values())
    assert any(_moved(before, list(trainer.model.parameters())))
    params = [*trainer.model.parameters(), *trainer.criterion.parameters()]
    assert all(p.dtype == torch.float32 for p in params)  # parameters are never cast
    with builders.autocast(trainer.device, "bf16"):
        emb = trainer.model(x)
    assert emb.dtype == torch.float32  # the model normalises in float32
    z, log_det = trainer.criterion.flow(emb, trainer.criterion.class_proxies(emb, y))
    assert z.dtype == log_det.dtype == torch.float32  # the flow runs in float32


def test_flow_warmup_switches_on_at_its_epoch(tmp_path):
    cfg = load_config("digits", [*FAST, "train.epochs=3", "loss.nir.mode=paper",
                                 "loss.nir.per_dim=true", "loss.nir.weight=1",
                                 "loss.nir.warmup_epochs=2", "train.probe_classes=5"])
    trainer = Trainer(cfg, tmp_path / "f")
    trainer.fit()
    import json

    records = [json.loads(line) for line in (tmp_path / "f/metrics.jsonl").read_text()
               .splitlines()]
    shares = [r["probe/nir_grad_share"] for r in records]
    # the probe runs after each epoch, so the switch (set before epoch 3) shows in epoch 3
    assert shares[0] == shares[1] == 0.0 and shares[2] > 0
    assert records[0]["flow/drift"] > 0  # the flow learned during the warm-up
