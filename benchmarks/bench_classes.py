"""Many classes on several processes: replicated proxies against class-sharded ones.

For C classes at embedding size D, ``--world`` gloo processes on this CPU (one thread each)
train ProxyAnchor's proxies on a global batch of ``--world x 90`` embeddings (45 classes x 2
per rank, classes drawn uniformly from all C), three ways, each in fresh processes:

* ``replicated``: today's default: every rank holds all C proxies and their Adam moments,
  computes the whole loss on the gathered batch, and all-reduces the dense (C, D) proxy
  gradient (what DDP does for them);
* ``sharded``: ``loss.shard``: each rank holds a contiguous class range and computes its part
  of the loss (exact; tests/test_sharded_losses.py); nothing of size C crosses the wire;
* ``sharded r=R``: ``loss.sample_rate=R``: each rank computes on the batch's classes it owns
  plus a uniform sample, R of its shard in all.

Per rank and step: the loss forward + backward (with the embeddings' all-gather), the proxy
gradient all-reduce (replicated only), the optimiser step (``--optimizer adam``: torch's dense
Adam over every row it holds; ``row_adam``: nirdml's ``RowAdam``, which updates only rows with
a gradient), and the whole step; the loss state (proxies, their gradient, Adam's two moments,
exact bytes) and the peak resident memory the run added to the process (``ru_maxrss`` minus
the RSS before the loss was built). Ratios against ``replicated`` are printed last, with the
matmul floor of the dense loss (flops of the (B, D) x (D, C) product and its two backward
products, over this machine's one-thread GEMM rate).

    python benchmarks/bench_classes.py                       # C = 1e4, 1e5, 1e6; D = 128, 512
    python benchmarks/bench_classes.py --classes 1000000 --dims 128 --steps 5
    python benchmarks/bench_classes.py --backend nccl --device cuda   # scripts/gpu_check.py

A configuration whose replicated run would not fit in a rank's memory (estimated from the
sizes; on the CPU the ranks share the machine's) runs sharded only, or is skipped when that
would not fit either.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_proxy_loss import _sync, gemm_rate

PER_RANK, PER_CLASS = 90, 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_bytes(loss, optimizer) -> int:
    """Bytes of the loss state on this rank: proxies, their gradient, the optimiser moments."""
    total = loss.proxies.numel() * loss.proxies.element_size()
    if loss.proxies.grad is not None:
        total += loss.proxies.grad.numel() * loss.proxies.grad.element_size()
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if torch.is_tensor(v) and v.ndim > 0)
    return total


def _labels(num_classes: int, world: int, step: int, device) -> torch.Tensor:
    """The global batch's labels: 45 classes x 2 per rank, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    classes = torch.randperm(num_classes, generator=g)[: world * PER_RANK // PER_CLASS]
    return classes.repeat_interleave(PER_CLASS).to(device)


def _rank(rank: int, world: int, store_path: str, job: dict, out: str) -> None:
    from nirdml.losses import ProxyAnchorLoss
    from nirdml.losses.shard import ClassShard
    from nirdml.training.distributed import end_worker_process, gather_with_grad
    from nirdml.training.row_adam import RowAdam

    torch.set_num_threads(1)
    device = torch.device(job["device"] if job["device"] == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = torch.distributed.FileStore(store_path, world)
    torch.distributed.init_process_group(job["backend"], store=store, rank=rank,
                                         world_size=world,
                                         timeout=datetime.timedelta(seconds=1800))
    try:
        C, D, mode = job["classes"], job["dim"], job["mode"]
        rss0 = _rss_bytes()
        shard = None if mode == "replicated" else ClassShard.split(C, rank, world)
        rate = job["rate"] if mode.startswith("sharded r=") else 1.0
        loss = ProxyAnchorLoss(C, D, shard=shard, sample_rate=rate, seed=0).to(device)
        if job["optimizer"] == "row_adam":
            optimizer = RowAdam([{"params": [loss.proxies], "rows": True}], lr=1e-2)
        else:
            optimizer = torch.optim.Adam([loss.proxies], lr=1e-2)
        g = torch.Generator().manual_seed(rank)
        times: dict[str, list[float]] = {"loss": [], "grad_sync": [], "optimizer": [],
                                         "step": []}
        for step in range(job["steps"] + 1):   # step 0 warms up and is not counted
            x = torch.randn(PER_RANK, D, generator=g).to(device).requires_grad_()
            labels = _labels(C, world, step, device)
            loss.set_step(step)
            _sync(device)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            value = loss(gather_with_grad(x), labels)
            value.backward()
            _sync(device)
            t1 = time.perf_counter()
            if mode == "replicated":   # what DDP does for a replicated parameter
                torch.distributed.all_reduce(loss.proxies.grad)
                loss.proxies.grad.div_(world)
            _sync(device)
            t2 = time.perf_counter()
            optimizer.step()
            _sync(device)
            t3 = time.perf_counter()
            if step:
                for key, t in (("loss", t1 - t0), ("grad_sync", t2 - t1),
                               ("optimizer", t3 - t2), ("step", t3 - t0)):
                    times[key].append(t)
            optimizer.zero_grad(set_to_none=False)
        row = {"rank": rank, "state_bytes": state_bytes(loss, optimizer),
               "peak_rss_added": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
               - rss0, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
        if device.type == "cuda":
            row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        rows = [None] * world
        torch.distributed.all_gather_object(rows, row)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    except BaseException:
        torch.distributed.destroy_process_group()
        raise
    end_worker_process()  # gloo may abort at a normal exit (see there)


def run_job(job: dict, world: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), job, out), nprocs=world,
                 join=True)
        return json.loads(Path(out).read_text())


def replicated_bytes_estimate(C: int, D: int, world: int) -> int:
    """What one replicated rank needs: proxies, gradient, two Adam moments, the all-reduce's
    buffer, and the loss's (B, C) intermediates (about six float32 matrices); a sharded rank
    needs about 1/world of it."""
    batch = world * PER_RANK
    return 5 * C * D * 4 + 6 * batch * C * 4


def room_per_rank(device: str, world: int) -> int:
    """Bytes one rank may use: its share of the machine's available memory on the CPU (the
    ranks share it), the free memory of one GPU with CUDA (a GPU a rank)."""
    if device != "cpu":
        return torch.cuda.mem_get_info(0)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"] // world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", choices=["adam", "row_adam", "both"], default="both",
                   help="the proxies' optimiser (both: every sharded mode with each)")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.device != "cpu" and torch.cuda.device_count() < args.world:
        print(f"--device {args.device} needs {args.world} GPUs", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    rate = gemm_rate(torch.device("cpu"), n=1024)
    print(f"torch {torch.__version__}; {args.world} {args.backend} processes, 1 thread each; "
          f"one-thread GEMM rate {rate:.1f} GFLOP/s; batch {args.world} x {PER_RANK}")
    modes = [("replicated", "adam")]
    optimizers = ["adam", "row_adam"] if args.optimizer == "both" else [args.optimizer]
    for opt in optimizers:
        modes += [("sharded", opt), (f"sharded r={args.rate:g}", opt)]
    results = []
    for C in args.classes:
        for D in args.dims:
            need, room = replicated_bytes_estimate(C, D, args.world), room_per_rank(
                args.device, args.world)
            fits = need <= 0.85 * room
            if not fits:   # the sharded runs need about 1/world of it
                print(f"C={C:,} D={D}: replicated skipped (a rank needs about "
                      f"{need / 2**30:.1f} GiB, {room / 2**30:.1f} GiB free a rank)")
                if need / args.world > 0.85 * room:
                    results.append({"classes": C, "dim": D, "skipped": need})
                    continue
            by_mode = {}
            for mode, opt in modes if fits else modes[1:]:
                job = {"classes": C, "dim": D, "mode": mode, "rate": args.rate,
                       "steps": args.steps, "optimizer": opt, "backend": args.backend,
                       "device": args.device}
                rows = run_job(job, args.world)
                worst = {k: max(r[k] for r in rows) for k in rows[0] if k != "rank"}
                name = mode if mode == "replicated" else f"{mode} {opt}"
                by_mode[name] = worst
                print(f"C={C:,} D={D} {name:24s} state {worst['state_bytes'] / 2**20:9.1f} MiB"
                      f"  peak RSS +{worst['peak_rss_added'] / 2**20:9.1f} MiB"
                      f"  loss {1e3 * worst['loss_s']:8.1f} ms"
                      f"  sync {1e3 * worst['grad_sync_s']:7.1f} ms"
                      f"  opt {1e3 * worst['optimizer_s']:7.1f} ms"
                      f"  step {1e3 * worst['step_s']:8.1f} ms", flush=True)
            batch = args.world * PER_RANK
            floor = 3 * 2 * batch * C * D / (rate * 1e9)
            results.append({"classes": C, "dim": D, "modes": by_mode,
                            "dense_matmul_floor_s": floor})
    print("\nratios against replicated (per rank, the worst rank; target at C=1e6, D=128: "
          "state <= 0.55x, sampled loss >= 5x faster):")
    print("| C | D | mode | state | peak RSS | loss fwd+bwd speed-up | step speed-up |"
          " replicated loss / matmul floor |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        if "skipped" in res:
            print(f"| {res['classes']:,} | {res['dim']} | skipped (a replicated rank needs "
                  f"{res['skipped'] / 2**30:.1f} GiB) | | | | | |")
            continue
        base = res["modes"].get("replicated")
        for name, m in res["modes"].items():
            if name == "replicated":
                continue
            if base is None:
                print(f"| {res['classes']:,} | {res['dim']} | {name} (replicated does not fit: "
                      f"state {m['state_bytes'] / 2**30:.2f} GiB, loss {m['loss_s']:.2f} s, "
                      f"step {m['step_s']:.2f} s) | | | | | |")
                continue
            print(f"| {res['classes']:,} | {res['dim']} | {name} | "
                  f"{m['state_bytes'] / base['state_bytes']:.2f}x | "
                  f"{m['peak_rss_added'] / max(base['peak_rss_added'], 1):.2f}x | "
                  f"{base['loss_s'] / m['loss_s']:.1f}x | {base['step_s'] / m['step_s']:.1f}x | "
                  f"{base['loss_s'] / res['dense_matmul_floor_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"gemm_gflops": rate, "world": args.world,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
