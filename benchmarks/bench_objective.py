"""Benchmark one NIR training-objective step (forward + backward) on the CPU.

Per configuration (batch 90 = 45 classes x 2 samples, embedding dim D, C classes) it times:

* ``ours``: ``NIRLoss.from_options(ProxyAnchorLoss(C, D), 0.01, mode="release")``, nirdml's flow;
* ``freia``: the same objective with the same flow built from FrEIA 0.2 (``SequenceINN`` of
  ``PermuteRandom(seed=k)`` + conditional ``GLOWCouplingBlock(clamp=2.0, "ATAN")``), weights
  copied from ours; the loss values and embedding gradients are checked to agree;
* ``PA``: nirdml's ProxyAnchor loss and the class proxies alone, the part both objectives
  share (``flow only`` = (ours - PA) / (FrEIA - PA) isolates the flow);
* ``pml-pa``: pytorch-metric-learning's ``ProxyAnchorLoss`` alone (a reference proxy loss);
* ``ours-plain`` (with ``--plain``): our flow with plain autograd instead of the fused backward;
* ``ours-compiled`` (with ``--compile``): our plain-autograd flow under ``torch.compile``
  (compile time excluded: it happens in the warm-up; it is printed separately).

With ``--plain``/``--compile`` the output ends with the fused path's speedup over each: the
fused backend stays only while it is >= 1.2x faster than plain autograd (see
``nirdml.nir._fused``).

Variants run interleaved, repetition by repetition, and the medians are reported, with the
machine's load average before and after (other processes on the cores skew CPU timings, and
OpenMP threads suffer most: compare with ``--threads 1`` on a busy machine).

    python benchmarks/bench_objective.py [--quick] [--threads N] [--reps R] [--plain]
                                         [--clock wall|cpu] [--dims 128 512] [--classes ...]

The last line is ``ours/FrEIA ratio: X.XX``, the geometric mean over configurations of
``time(ours) / time(FrEIA)`` (below 1 = ours is faster; the speedup is its inverse).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nirdml.losses import ProxyAnchorLoss
from nirdml.nir import NIRLoss

BATCH, PER_CLASS, WEIGHT = 90, 2, 0.01
#: wall seconds of the first (compiling) call of ``ours-compiled``, per (D, C)
COMPILE_SECONDS: dict[tuple[int, int], float] = {}


def _subnet_constructor(depth=8, width=128):
    def ctor(c_in, c_out):
        layers, d = [], c_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, c_out))
        return nn.Sequential(*layers)

    return ctor


def build_freia_flow(dim, num_blocks=5):
    """The release's flow in FrEIA (numpy's global RNG is restored: FrEIA reseeds it)."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    state = np.random.get_state()
    try:
        inn = Ff.SequenceINN(dim)
        for k in range(num_blocks):
            inn.append(Fm.PermuteRandom, seed=k)
            inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(dim,),
                       subnet_constructor=_subnet_constructor(), clamp=2.0,
                       clamp_activation="ATAN")
    finally:
        np.random.set_state(state)
    return inn


def copy_into_freia(flow, inn):
    """Copy our flow's weights into the FrEIA model (the inverse of ``load_freia_weights``)."""
    blocks = [m for m in inn.module_list if hasattr(m, "subnet1")]
    with torch.no_grad():
        for k, blk in enumerate(blocks):
            for s, net in ((2 * k, blk.subnet2), (2 * k + 1, blk.subnet1)):
                lin = [m for m in net if isinstance(m, nn.Linear)]
                n_in = flow.w_in[s].shape[1]
                lin[0].weight[:, :n_in].copy_(flow.w_in[s])
                lin[0].weight[:, n_in:].copy_(flow.cond_weight[flow._cond_slot[s]])
                lin[0].bias.copy_(flow.in_bias[s])
                for i, layer in enumerate(lin[1:-1]):
                    layer.weight.copy_(flow.w_hidden[s][i])
                    layer.bias.copy_(flow.b_hidden[s][i])
                lin[-1].weight.copy_(flow.w_out[s])
                lin[-1].bias.copy_(flow.b_out[s])


def make_config(dim, num_classes, seed=0, keep_grads=False):
    torch.manual_seed(seed)
    nir = NIRLoss.from_options(ProxyAnchorLoss(num_classes, dim), WEIGHT, mode="release")
    pa = ProxyAnchorLoss(num_classes, dim)  # the FrEIA objective's own copy
    pa.load_state_dict(nir.base_loss.state_dict())
    inn = build_freia_flow(dim)
    copy_into_freia(nir.flow, inn)
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randperm(num_classes, generator=gen)[: BATCH // PER_CLASS]
    labels = classes.repeat_interleave(PER_CLASS)
    emb = torch.randn(BATCH, dim, generator=gen).requires_grad_(True)
    params = [emb, *nir.parameters(), *pa.parameters(), *inn.parameters()]

    def zero():
        for p in params:
            if keep_grads and p.grad is not None:
                p.grad.zero_()
            else:
                p.grad = None

    def ours():
        zero()
        loss = nir(emb, labels)
        loss.backward()
        return loss

    def freia():
        zero()
        proxy = pa(emb, labels)
        cond = pa.class_proxies(emb, labels)
        z, log_det = inn(F.normalize(emb, dim=1), c=[cond])
        loss = torch.exp(0.5 * z.square().sum(1) - log_det).mean() + WEIGHT * proxy
        loss.backward()
        return loss

    def plain():
        nir.flow.fused = False
        try:
            return ours()
        finally:
            nir.flow.fused = True

    def proxy_only():  # the part both objectives share: the proxy loss and the conditions
        zero()
        loss = pa(emb, labels) + pa.class_proxies(emb, labels).sum() * 0.0
        loss.backward()
        return loss

    compiled_nir = None

    def compiled():
        nonlocal compiled_nir
        if compiled_nir is None:  # same weights, flow compiled (the first call compiles)
            compiled_nir = NIRLoss.from_options(ProxyAnchorLoss(num_classes, dim), WEIGHT,
                                                mode="release", fused=False)
            compiled_nir.load_state_dict(nir.state_dict())
            compiled_nir.flow.forward = torch.compile(compiled_nir.flow.forward)
            params.extend(compiled_nir.parameters())
            t0 = time.perf_counter()
            zero()
            compiled_nir(emb, labels).backward()
            COMPILE_SECONDS[(dim, num_classes)] = time.perf_counter() - t0
        zero()
        loss = compiled_nir(emb, labels)
        loss.backward()
        return loss

    variants = {"ours": ours, "freia": freia, "ours-plain": plain, "pa": proxy_only,
                "ours-compiled": compiled}
    try:
        from pytorch_metric_learning.losses import ProxyAnchorLoss as PmlProxyAnchor

        pml = PmlProxyAnchor(num_classes, dim, margin=0.1, alpha=32)
        params.extend(pml.parameters())

        def pml_pa():
            zero()
            loss = pml(emb, labels)
            loss.backward()
            return loss

        variants["pml-pa"] = pml_pa
    except ImportError:
        pass

    # same numbers: loss value and embedding gradient
    l_ours = ours().item()
    g_ours = emb.grad.clone()
    l_freia = freia().item()
    g_freia = emb.grad.clone()
    assert math.isclose(l_ours, l_freia, rel_tol=2e-5), (l_ours, l_freia)
    rel = ((g_ours - g_freia).norm() / g_freia.norm()).item()
    assert rel < 1e-4, f"embedding gradients differ: relative error {rel:.2e}"
    return variants, l_ours


def bench(variants, names, reps, warmup, clock=time.perf_counter):
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            t0 = clock()
            variants[n]()
            times[n].append(clock() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 11318])
    ap.add_argument("--plain", action="store_true", help="also time the plain-autograd flow")
    ap.add_argument("--compile", action="store_true",
                    help="also time the flow under torch.compile (compiles for ~1 min per D)")
    ap.add_argument("--keep-grads", action="store_true",
                    help="zero gradients in place between steps instead of setting them to None "
                         "(optimizer.zero_grad(set_to_none=False)): no fresh gradient memory")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time (default) or the process's CPU time (steadier on a busy "
                         "machine; meaningful with --threads 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (7 if args.quick else 25)
    warmup = 2 if args.quick else 4
    names = ["ours", "freia"] + (["ours-plain"] if args.plain else [])
    names += ["ours-compiled"] if args.compile else []
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f} with "
              f"{torch.get_num_threads()} threads: OpenMP timings suffer badly from busy cores; "
              "consider --threads 1")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus "
          f"{os.cpu_count()}, reps {reps}, clock {args.clock}, "
          f"grads {'zeroed in place' if args.keep_grads else 'set to None'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    header = f"{'D':>4} {'C':>6} | " + " ".join(f"{n + ' ms':>13}" for n in names)
    header += f" {'PA ms':>7} {'pml-pa ms':>10} | {'ours/FrEIA':>10} {'speedup':>8}"
    header += f" {'flow only':>9}"
    print(header)
    print("-" * len(header))
    ratios, flow_ratios = [], []
    backend = {"ours-plain": [], "ours-compiled": []}  # time(peer) / time(fused), per config
    for dim in args.dims:
        for num_classes in args.classes:
            variants, _ = make_config(dim, num_classes, keep_grads=args.keep_grads)
            run = names + ["pa"] + (["pml-pa"] if "pml-pa" in variants else [])
            med = bench(variants, run, reps, warmup, clock)
            ratio = med["ours"] / med["freia"]
            for peer in backend:
                if peer in med:
                    backend[peer].append(med[peer] / med["ours"])
            ratios.append(ratio)
            row = f"{dim:>4} {num_classes:>6} | " + " ".join(f"{med[n]:>13.2f}" for n in names)
            flow_only = (med["ours"] - med["pa"]) / (med["freia"] - med["pa"])
            flow_ratios.append(flow_only)
            row += f" {med['pa']:>7.2f} {med.get('pml-pa', float('nan')):>10.2f} |"
            row += f" {ratio:>10.2f} {1 / ratio:>7.2f}x {flow_only:>9.2f}"
            print(row, flush=True)
    def geomean(values):
        return math.exp(sum(math.log(v) for v in values) / len(values))

    geo = geomean(ratios)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    per = ", ".join(
        f"D={d} C={c}: {r:.2f}"
        for (d, c), r in zip([(d, c) for d in args.dims for c in args.classes], ratios)
    )
    print(f"per config ours/FrEIA: {per}")
    if all(r > 0 for r in flow_ratios):
        print(f"flow part only (step minus the shared proxy loss), ours/FrEIA: "
              f"{geomean(flow_ratios):.2f} (geometric mean)")
    for (d, c), sec in COMPILE_SECONDS.items():
        print(f"torch.compile of the plain flow, first step (compiling) D={d} C={c}: {sec:.1f} s")
    for peer, values in backend.items():
        if values:  # the fused backend is kept only while it is >= 1.2x faster than its peers
            print(f"fused step speedup over {peer.removeprefix('ours-')}: "
                  f"{', '.join(f'{v:.2f}x' for v in values)} (per config; geometric mean "
                  f"{geomean(values):.2f}x)")
    print(f"ours/FrEIA ratio: {geo:.2f} (time ratio, geometric mean; speedup {1 / geo:.2f}x)")


if __name__ == "__main__":
    main()
