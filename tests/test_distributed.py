"""Distributed data parallel on CPU with gloo, 2 processes: exact gradients, a real run, resume."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from nirdml.losses import PROXY_LOSSES, ProxyAnchorLoss, build_loss
from nirdml.models import build_model
from nirdml.nir import NIRLoss
from nirdml.training.distributed import DistContext

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _rendezvous_store():
    """A TCP store on a port the OS picks and this process keeps (no bind-release-reuse race);
    the workers join it as clients, as torchrun's workers join their agent's store."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _build(seed=0, loss="nir"):
    torch.manual_seed(seed)
    model = build_model("small_cnn", embedding_dim=8, in_chans=1).double().eval()
    if loss == "nir":
        crit = NIRLoss.from_options(ProxyAnchorLoss(6, 8), weight=0.5, num_blocks=2, subnet_depth=2,
                       subnet_width=16).double()
    else:  # pair losses: contrastive has no parameter, margin its beta (and random sampling,
        # the same draws on every rank: they share the seed)
        crit = build_loss(loss, 6, 8, class_specific_beta=True) if loss == "margin" \
            else build_loss(loss, 6, 8)
        crit = crit.double()
    return model, crit


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 3, 3, 5, 5, 1, 1])
    return x, y


def _grads(model, crit):
    out = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters()
           if p.grad is not None}
    out.update({f"crit.{n}": p.grad.clone() for n, p in crit.named_parameters()
                if p.grad is not None})
    return out


def _worker(rank, world, port, out_path, loss="nir"):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    ctx = DistContext.from_env()
    model, crit = _build(loss=loss)
    ddp_model, ddp_crit = ctx.wrap_model(model), ctx.wrap_criterion(crit)
    x, y = _batch()
    local = slice(rank * 4, (rank + 1) * 4)
    loss = ddp_crit(ddp_model(x[local]), y[local])
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": _grads(model, crit)}, out_path)
    ctx.end_process(0)  # as the train command ends


@pytest.mark.parametrize("loss", ["nir", "contrastive", "margin"])
def test_two_process_gradients_equal_single_process(tmp_path, loss):
    out = tmp_path / "ddp.pt"
    store = _rendezvous_store()
    mp.spawn(_worker, args=(2, store.port, str(out), loss), nprocs=2, join=True)
    got = torch.load(out)
    model, crit = _build(loss=loss)
    x, y = _batch()
    loss_value = crit(model(x), y)
    loss_value.backward()
    want = _grads(model, crit)
    assert torch.allclose(got["loss"], loss_value.detach(), rtol=1e-10, atol=0)
    assert got["grads"].keys() == want.keys()
    if loss == "nir":
        assert any(k.startswith("crit.flow") for k in want)
        assert any(k.startswith("crit.base_loss.proxies") for k in want)
    elif loss == "margin":
        assert "crit.beta" in want
    for k in want:
        torch.testing.assert_close(got["grads"][k], want[k], rtol=1e-6, atol=1e-9, msg=k)


FAST = ["train.epochs=2", "train.progress=false", "train.tensorboard=false",
        "model.embedding_dim=16", "loss.nir.subnet_width=32", "loss.nir.subnet_depth=3",
        "loss.nir.num_blocks=2", "data.batch_size=32", "model.freeze_bn=true",
        "data.augment=false"]


def _run(cmd, env=None):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_torchrun_digits_matches_single_process_and_resumes_on_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    sets = sum((["--set", s] for s in FAST), [])
    _run([sys.executable, "-m", "nirdml", "train", "--out", str(tmp_path / "one"), *sets])
    _run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "nirdml", "train",
          "--out", str(tmp_path / "two"), *sets],
         env={"TMPDIR": tempfile.gettempdir()})
    one = json.loads((tmp_path / "one/final.json").read_text())
    two = json.loads((tmp_path / "two/final.json").read_text())
    assert two["num_queries"] == one["num_queries"] == 896
    # Both see the same global batches and (test above) the same gradients, so with the two
    # things that legitimately differ per rank switched off -- BatchNorm batch statistics (over
    # each rank's half batch) and the augmentation draws (each rank's own RNG stream) -- the
    # runs agree up to float32 summation order in the gradient all-reduce.
    for key in ("recall@1", "map@r", "nmi"):
        assert two[key] == pytest.approx(one[key], abs=0.01), key
    assert two["recall@1"] > 0.6
    # a checkpoint written by 2 ranks resumes on 1 process
    _run([sys.executable, "-m", "nirdml", "train", "--out", str(tmp_path / "two"), "--resume",
          *sets, "--set", "train.epochs=3"])
    lines = (tmp_path / "two/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


# ---- sharded proxies (loss.shard): the same gradients as one process ------------------------
SHARD_CLASSES = 7   # not divisible by 2 or 3
SHARD_BATCHES = (
    [0, 0, 6, 6, 3, 3, 5, 5, 1, 1, 4, 4],   # classes on every shard
    [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2],   # the last shard(s) own no class of the batch
)


#: NIR around every proxy loss (SoftTriple and Sub-center ArcFace with 2 centres a class), and
#: SoftTriple without NIR
SHARD_KINDS = [f"nir+{name}" for name in PROXY_LOSSES] + ["soft_triple"]
SHARD_OPTIONS = {"soft_triple": {"centers_per_class": 2}, "subcenter_arcface": {"sub_centers": 2},
                 "arcface": {"scale": 16.0}, "cosface": {"scale": 16.0}}


def _build_sharded(kind, shard=None):
    """A criterion over SHARD_CLASSES (``SHARD_KINDS``); with ``shard``, the same parameters
    cut to that rank's shard."""
    from nirdml.training.sharding import local_states

    name = kind.removeprefix("nir+")

    def make(**kw):
        base = build_loss(name, SHARD_CLASSES, 8, **SHARD_OPTIONS.get(name, {}), **kw)
        if not kind.startswith("nir+"):
            return base.double()
        return NIRLoss.from_options(base, weight=0.5, num_blocks=2, subnet_depth=2,
                                    subnet_width=16).double()

    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=8, in_chans=1).double().eval()
    torch.manual_seed(1)
    dense = make()
    if shard is None:
        return model, dense
    crit = make(shard=shard)
    crit.load_state_dict(local_states(crit, None, dense.state_dict(), None)[0])
    return model, crit


def _sharded_batch(labels):
    g = torch.Generator().manual_seed(2)
    return torch.randn(len(labels), 1, 8, 8, generator=g, dtype=torch.float64), \
        torch.tensor(labels)


def _sharded_worker(rank, world, port, out_path):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    from nirdml.losses.shard import ClassShard
    from nirdml.training.sharding import dense_states, proxy_loss_of

    ctx = DistContext.from_env()
    results = {}
    for kind in SHARD_KINDS:
        for b, labels in enumerate(SHARD_BATCHES):
            shard = ClassShard.split(SHARD_CLASSES, rank, world)
            model, crit = _build_sharded(kind, shard)
            ddp_model, ddp_crit = ctx.wrap_model(model), ctx.wrap_criterion(crit)
            x, y = _sharded_batch(labels)
            n = len(labels) // world
            local = slice(rank * n, (rank + 1) * n)
            loss = ddp_crit(ddp_model(x[local]), y[local])
            loss.backward()
            grads = _grads(model, crit)
            # the proxy gradient in the dense layout, gathered like a checkpoint's proxies
            proxies = proxy_loss_of(crit).proxies
            full = dense_states(crit)[0]
            grads = {k: v for k, v in grads.items() if "proxies" not in k}
            grads["proxies"] = shard.gather_rows(proxies.grad,
                                                 per_class=proxy_loss_of(crit).proxies_per_class)
            results[(kind, b)] = {"loss": loss.detach(), "grads": grads,
                                  "proxies": next(v for k, v in full.items()
                                                  if k.endswith("proxies"))}
    if rank == 0:
        torch.save(results, out_path)
    ctx.end_process(0)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_proxies_give_single_process_gradients(tmp_path, world):
    """loss.shard under DDP (gloo): loss, model, flow and proxy gradients equal one process's
    on the same global batch, for NIR around every proxy loss and for SoftTriple alone, with
    C = 7 not divisible by the world size and a batch whose classes all lie on one shard."""
    out = tmp_path / "shard.pt"
    store = _rendezvous_store()
    mp.spawn(_sharded_worker, args=(world, store.port, str(out)), nprocs=world, join=True)
    got = torch.load(out)
    bad = []
    for kind in SHARD_KINDS:
        for b, labels in enumerate(SHARD_BATCHES):
            model, crit = _build_sharded(kind)
            x, y = _sharded_batch(labels)
            loss = crit(model(x), y)
            loss.backward()
            want = _grads(model, crit)
            want_proxies = next(v for k, v in want.items() if k.endswith("proxies"))
            want = {k: v for k, v in want.items() if "proxies" not in k}
            want["proxies"] = want_proxies
            case = got[(kind, b)]
            torch.testing.assert_close(case["loss"], loss.detach(), rtol=1e-10, atol=0)
            assert case["grads"].keys() == want.keys(), (kind, b)
            if kind.startswith("nir+"):
                assert any(k.startswith("crit.flow") for k in want)
            torch.testing.assert_close(case["proxies"], next(
                v for k, v in crit.state_dict().items() if k.endswith("proxies")))
            for k in want:
                # the loss's parameters (proxies, flow) to float64 precision; the model's
                # backward to float32's, as in the replicated test (relative to the tensor)
                if want[k].numel() == 0:
                    continue
                err = float((case["grads"][k] - want[k]).abs().max()
                            / want[k].abs().max().clamp(min=1e-300))
                if err > (1e-6 if k.startswith("model.") else 1e-10):
                    bad.append((kind, b, k, err))
    assert not bad, bad


# ---- a sharded torchrun run: resumed on another world size, it ends where it would have -------
#: digits with 7 training classes (not divisible by 2 or 3) and a global batch of 36 = 6 classes
#: x 6 samples, which splits into equal per-rank batches of whole classes on 1, 2 and 3 ranks
SHARD_RUN = [*FAST, "train.epochs=2", "data.options.train_digits=7", "data.batch_size=36",
             "data.samples_per_class=6", "loss.shard=true"]


def _final(folder):
    final = json.loads((folder / "final.json").read_text())
    epochs = [json.loads(x)["epoch"] for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return final, epochs


@pytest.mark.slow
def test_sharded_torchrun_run_resumes_on_one_and_on_three_processes(tmp_path):
    """A 2-rank run with loss.shard (ProxyAnchor + NIR) stopped after epoch 1 and resumed on
    1 process and on 3 ends with the final metrics of the uninterrupted 2-rank run: the
    checkpoint holds the whole proxy table and its Adam moments (dense layout), each world
    size takes its own rows back."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not found next to the interpreter")
    sets = sum((["--set", s] for s in SHARD_RUN), [])
    env = {"TMPDIR": tempfile.gettempdir()}

    def train(nproc, out, *extra):
        launcher = [sys.executable] if nproc == 1 else [
            torchrun, "--standalone", f"--nproc_per_node={nproc}"]
        _run([*launcher, "-m", "nirdml", "train", "--out", str(out), *sets, *extra], env=env)

    train(2, tmp_path / "whole")
    train(2, tmp_path / "on1", "--set", "train.epochs=1")
    shutil.copytree(tmp_path / "on1", tmp_path / "on3")
    train(1, tmp_path / "on1", "--resume")
    train(3, tmp_path / "on3", "--resume")
    want, epochs = _final(tmp_path / "whole")
    assert epochs == [1, 2] and want["recall@1"] > 0.6
    from nirdml.training.checkpoint import load_checkpoint

    whole = load_checkpoint(tmp_path / "whole/checkpoints/last.pt")
    for name in ("on1", "on3"):
        got, epochs = _final(tmp_path / name)
        assert epochs == [1, 2], name
        # the same global batches and gradients; only float32 summation order differs
        for key in ("recall@1", "map@r", "nmi"):
            assert got[key] == pytest.approx(want[key], abs=0.01), (name, key)
        resumed = load_checkpoint(tmp_path / name / "checkpoints/last.pt")
        key = next(k for k in whole["criterion"] if k.endswith("proxies"))
        assert resumed["criterion"][key].shape == (7, 16)
        torch.testing.assert_close(resumed["criterion"][key], whole["criterion"][key],
                                   rtol=1e-3, atol=1e-4, msg=name)
