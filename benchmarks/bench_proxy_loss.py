"""ProxyAnchor at SOP scale (C = 11,318 classes, D = 128, batch 90), forward + backward.

Times, interleaved repetition by repetition (medians reported):

* ``matmul``: the physical floor of this loss, the same-shaped cosine matmul alone: normalise
  the embeddings and the proxies, ``(C, D) @ (D, B)``, backward of a linear function of it;
* ``ours``: nirdml's ``ProxyAnchorLoss`` (positives from the own proxy only, the fused negative
  term with its one-pass backward);
* ``ours-shifted``: the same loss through its generic max-shifted path (masked log-sum-exp over
  ``(B + 1, C)``), the form used before for every scale;
* ``pml``: pytorch-metric-learning's ``ProxyAnchorLoss`` (if installed).

It prints the times, ``ours / matmul`` (target <= 3) and ``pml / ours`` (target >= 3), and
the matmul's GFLOP/s against the machine's measured GEMM rate (a large square matmul).

    python benchmarks/bench_proxy_loss.py [--classes 11318] [--dim 128] [--reps 30]
                                          [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nirdml.losses import ProxyAnchorLoss

BATCH, PER_CLASS = 90, 2


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device, n: int = 2048, reps: int = 5) -> float:
    """The machine's GEMM rate in GFLOP/s (best of ``reps`` n x n x n float32 products)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=11318)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    c, d = args.classes, args.dim
    ours = ProxyAnchorLoss(c, d).to(device)
    proxies = ours.proxies
    labels = torch.randperm(c)[:BATCH // PER_CLASS].repeat_interleave(PER_CLASS).to(device)
    emb = torch.randn(BATCH, d, device=device)
    weight = torch.randn(c, BATCH, device=device)

    def run_matmul():
        x = emb.clone().requires_grad_()
        cos_t = F.normalize(proxies, dim=1) @ F.normalize(x, dim=1).t()
        (cos_t * weight).sum().backward()

    def run_ours():
        x = emb.clone().requires_grad_()
        ours(x, labels).backward()

    def run_shifted():
        x = emb.clone().requires_grad_()
        total, _ = ours._compute_shifted(x, labels)
        total.backward()

    variants = {"matmul": run_matmul, "ours": run_ours, "ours-shifted": run_shifted}
    try:
        from pytorch_metric_learning.losses import ProxyAnchorLoss as PMLProxyAnchor

        pml = PMLProxyAnchor(c, d, margin=0.1, alpha=32).to(device)
        pml.proxies.data = proxies.detach().clone()

        def run_pml():
            x = emb.clone().requires_grad_()
            pml(x, labels).backward()

        variants["pml"] = run_pml
    except ImportError:
        print("pytorch-metric-learning not installed: no pml column")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps + 3):
        for name, fn in variants.items():
            proxies.grad = None
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if rep >= 3:  # warm-up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    flop = 3 * 2 * c * d * BATCH  # forward and two backward matmuls
    rate = gemm_rate(device)
    print(f"ProxyAnchor, C={c}, D={d}, batch {BATCH}, {device}, {torch.get_num_threads()} "
          f"threads, median of {args.reps}")
    for name, ms in med.items():
        print(f"  {name:<13} {ms:8.2f} ms")
    print(f"matmul: {flop / 1e9:.2f} GFLOP in {med['matmul']:.2f} ms = "
          f"{flop / med['matmul'] / 1e6:.1f} GFLOP/s; machine GEMM rate {rate:.1f} GFLOP/s")
    print(f"ours / matmul: {med['ours'] / med['matmul']:.2f}x (target <= 3)")
    if "pml" in med:
        print(f"pml / ours: {med['pml'] / med['ours']:.2f}x (target >= 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
