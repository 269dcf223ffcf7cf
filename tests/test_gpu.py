"""The GPU paths, run where CUDA is available (``pytest -m gpu``; ``scripts/gpu_check.py`` runs
them on a lent GPU). Everywhere else they skip: the only skips CI allows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FAST = ["train.progress=false", "train.tensorboard=false", "model.embedding_dim=16",
        "loss.nir.subnet_width=32", "loss.nir.subnet_depth=3", "loss.nir.num_blocks=2",
        "train.probe_classes=0"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_steps_with_autocast(tmp_path, amp):
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    cfg = load_config("digits", [*FAST, "train.epochs=1", "train.device=cuda",
                                 f"train.amp={amp}"])
    trainer = Trainer(cfg, tmp_path / amp)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    x, y = next(iter(trainer._loader()))
    x, y = x.cuda(), y.cuda()
    for _ in range(3):
        assert trainer._step(x, y)
    assert all(torch.isfinite(v) for v in trainer.criterion.last_terms.values())
    flow = trainer.criterion.flow
    assert all(p.dtype == torch.float32 and p.is_cuda for p in flow.parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
        emb = trainer.model(x)
        z, log_det = flow(emb, trainer.criterion.class_proxies(emb, y))
    assert z.dtype == log_det.dtype == torch.float32


def test_cuda_checkpoint_resumes_on_the_cpu_and_back(tmp_path):
    from nirdml.training import train

    out = tmp_path / "run"
    train("digits", out, overrides=[*FAST, "train.epochs=1", "train.device=cuda"])
    train(None, out, resume=True, overrides=["train.epochs=2", "train.device=cpu"])
    final = train(None, out, resume=True, overrides=["train.epochs=3", "train.device=cuda"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    assert final["recall@1"] > 0.5


def test_gpu_evaluation_equals_the_cpu():
    from nirdml.evaluation import evaluate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 200, 6000)
    x = rng.standard_normal((200, 64))[y] + rng.standard_normal((6000, 64))
    metrics = ["recall", "map@r", "r_precision", "map@1000"]
    gpu = evaluate(x, y, metrics=metrics, backend="torch", device="cuda")
    cpu = evaluate(x, y, metrics=metrics, backend="torch", device="cpu")  # no faiss needed
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, abs=1e-6), key


def test_flow_on_cuda_equals_the_cpu():
    from nirdml.nir import ConditionalGlowFlow

    torch.manual_seed(0)
    flow = ConditionalGlowFlow(128)
    gpu_flow = ConditionalGlowFlow(128).cuda()
    gpu_flow.load_state_dict(flow.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(90, 128, generator=g), dim=1)
    cond = torch.nn.functional.normalize(torch.randn(45, 128, generator=g), dim=1)
    cond = cond.repeat_interleave(2, 0)
    a, b = x.clone().requires_grad_(), x.cuda().requires_grad_()
    nll_cpu, nll_gpu = flow.nll(a, cond), gpu_flow.nll(b, cond.cuda())
    torch.testing.assert_close(nll_gpu.cpu(), nll_cpu, rtol=1e-5, atol=1e-4)
    nll_cpu.sum().backward()
    nll_gpu.sum().backward()
    torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["release", "disc"])
def test_cuda_graphed_flow_trains_like_the_eager_flow(mode):
    from nirdml.losses import ProxyAnchorLoss
    from nirdml.nir import NIRLoss

    losses = []
    for graphs in (False, True):
        torch.manual_seed(0)
        nir = NIRLoss.from_options(ProxyAnchorLoss(100, 128), 1.0, mode=mode, per_dim=True,
                      cuda_graphs=graphs).cuda()
        head = torch.nn.Linear(32, 128).cuda()
        opt = torch.optim.Adam([*head.parameters(), *nir.parameters()], lr=1e-3)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            feats = torch.randn(90, 32, generator=g).cuda()
            labels = torch.randperm(100, generator=g)[:45].repeat_interleave(2).cuda()
            opt.zero_grad()
            loss = nir(head(feats), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if graphs:
            assert nir._graphed.graphs and not nir._graphed.disabled  # really captured
            params = [p.detach().clone() for p in nir.flow.parameters()]
        else:
            eager = [p.detach().clone() for p in nir.flow.parameters()]
    np.testing.assert_allclose(losses[5:], losses[:5], rtol=1e-5)
    for p, q in zip(params, eager):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_one_process_nccl_torchrun_digits(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun is not None
    sets = sum((["--set", s] for s in [*FAST, "train.epochs=2", "train.device=cuda"]), [])
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=1", "-m", "nirdml",
                          "train", "--out", str(tmp_path / "run"), *sets],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    final = json.loads((tmp_path / "run/final.json").read_text())
    assert final["recall@1"] > 0.5
