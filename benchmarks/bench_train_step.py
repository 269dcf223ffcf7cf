"""NIR's cost per training step: a full step (forward, backward, Adam) with and without NIR.

Both arms are built from the same config (``--config``, default ``omniglot_pa``: small CNN,
128-d, batch 90 of 2 per class, 868 training classes), on synthetic images of the config's size,
and timed interleaved (A, B, A, B, ...) so that a busy machine slows both alike; the medians
and their ratio are printed last (default arms: the base loss, NIR in the release's form and
the setting-a study winner; target: NIR adds at most 20% to the step). On the CPU the flow's
forward + backward alone is then timed against its matrix products at the same shapes, run
interleaved in the same process (:func:`flow_gemm_replay`): how close the flow is to what its
arithmetic costs (target: within 3x). Last, NIR's floor on this machine: the base step plus
the flow's matrix products plus its (memory-bound) Adam step, and the GEMM rates at the flow's
shapes against a large product, float32 and bfloat16 (how close the products already are to
the machine's limit, and whether a lower precision would help at these shapes). On the CPU the
benchmark keeps freed memory as training does (``nirdml.host_memory``) and prints
each arm's page faults per step; ``--default-malloc`` shows what glibc's defaults cost.
``--preset resnet50`` measures the paper's step instead (ResNet50, 224 px, 100 classes; use
``--device cuda --amp bf16`` on a GPU).

    python benchmarks/bench_train_step.py                         # small CNN on the CPU
    python benchmarks/bench_train_step.py --preset resnet50 --device cuda --amp bf16
    python benchmarks/bench_train_step.py --arm "NIR=loss.nir.enabled=true" \
        --arm "disc=loss.nir.enabled=true,loss.nir.mode=disc,loss.nir.per_dim=true"
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

PRESETS = {
    "omniglot": {"config": "omniglot_pa", "classes": 868, "image_size": 28, "channels": 1,
                 "overrides": []},
    "resnet50": {"config": "cub200_pa_128", "classes": 100, "image_size": 224, "channels": 3,
                 "overrides": ["model.pretrained=false"]},
}


def build_arm(preset: dict, overrides: list[str], device: torch.device, extra: list[str]):
    from nirdml.training import builders
    from nirdml.training.config import load_config

    cfg = load_config(preset["config"], [*preset["overrides"], *overrides, *extra])
    torch.manual_seed(0)
    model = builders.build_model(cfg, in_chans=preset["channels"]).to(device).train()
    criterion = builders.build_criterion(cfg, preset["classes"]).to(device).train()
    optimizer = builders.build_optimizer(cfg, model, criterion)
    return cfg, model, criterion, optimizer


def make_step(cfg, model, criterion, optimizer, x, y, device, amp):
    from nirdml.training import builders

    def step():
        optimizer.zero_grad(set_to_none=True)
        with builders.autocast(device, amp):
            emb = model(x)
        loss = criterion(emb.float(), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def interleaved_medians(preset_name: str, arms: dict[str, list[str]], device: torch.device,
                        amp: str = "none", steps: int = 30, warmup: int = 3,
                        extra: list[str] | None = None, faults: dict | None = None
                        ) -> dict[str, float]:
    """Median seconds per full training step of each arm (name -> config overrides), the arms
    stepped in turn (A, B, C, A, B, C, ...) on the same synthetic batch; ``faults``, if
    given, receives each arm's minor page faults per step (the kernel's count)."""
    preset = PRESETS[preset_name]
    steps_by_arm = {}
    for name, overrides in arms.items():
        cfg, model, criterion, optimizer = build_arm(preset, overrides, device, extra or [])
        g = torch.Generator().manual_seed(0)
        b, spc = cfg.data.batch_size, cfg.data.samples_per_class
        size = preset["image_size"]
        x = torch.randn(b, preset["channels"], size, size, generator=g).to(device)
        y = torch.randperm(preset["classes"], generator=g)[: b // spc].repeat_interleave(spc)
        steps_by_arm[name] = make_step(cfg, model, criterion, optimizer, x, y.to(device),
                                       device, amp)
    for step in steps_by_arm.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_arm}
    minflt = dict.fromkeys(steps_by_arm, 0)
    for _ in range(steps):
        for name, step in steps_by_arm.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            minflt[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if faults is not None:
        faults.update({name: n / steps for name, n in minflt.items()})
    return {name: statistics.median(t) for name, t in times.items()}


def flow_gemm_replay(flow, batch: int, distinct: int):
    """A callable running, on operands of the flow's own shapes (a separate weight per layer,
    as in the flow), every matrix product one fused forward + backward of ``flow`` performs at
    ``batch`` rows with ``distinct`` distinct conditions: the time its arithmetic costs at
    this machine's GEMM rate on these shapes, measured in the same run as the flow."""
    g = torch.Generator().manual_seed(0)
    width, nh = flow.subnet_width, flow.subnet_depth - 2
    n_sub = 2 * flow.num_blocks
    l1, l2 = flow.split

    def mk(*shape):
        return torch.randn(*shape, generator=g)
    subnets = []
    for s in range(n_sub):
        n_in, n_out = (l2, l1) if s % 2 == 0 else (l1, l2)
        subnets.append((mk(width, n_in), mk(nh, width, width), mk(2 * n_out, width),
                        mk(batch, n_in), mk(nh + 1, batch, width), mk(batch, 2 * n_out)))
    n_cond = len(flow.cond_nets.cond_subnets)
    w_cond, c_distinct = mk(n_cond * width, flow.cond_embed_dim), mk(distinct, flow.cond_dim)
    g_cond = mk(batch, n_cond * width)

    def run():
        torch.mm(c_distinct, w_cond.t())
        for w_in, w_hid, w_out, inp, acts, _ in subnets:  # forward
            torch.mm(inp, w_in.t())
            for j in range(nh):
                torch.mm(acts[j], w_hid[j].t())
            torch.mm(acts[nh], w_out.t())
        for w_in, w_hid, w_out, inp, acts, g_out in subnets:  # backward
            torch.mm(g_out.t(), acts[nh])
            torch.mm(g_out, w_out)
            for j in range(nh):
                torch.mm(acts[j], w_hid[j])
            torch.bmm(acts[:nh].transpose(1, 2), acts[1:])
            torch.mm(acts[0].t(), inp)
            torch.mm(acts[0], w_in)
        torch.mm(g_cond, w_cond)
        torch.mm(g_cond[:distinct].t(), c_distinct)
    return run


def flow_against_gemm(dim: int, batch: int, per_class: int, steps: int = 40
                      ) -> dict[str, float]:
    """Median ms of the flow's forward + backward (the paper's flow, fused path, NLL of a
    batch of unit vectors given repeated unit conditions) and of its GEMM replay
    (:func:`flow_gemm_replay`), interleaved on the CPU."""
    from nirdml.nir.flow import ConditionalGlowFlow

    torch.manual_seed(0)
    flow = ConditionalGlowFlow(dim)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    x.requires_grad_()
    distinct = batch // per_class
    conds = torch.nn.functional.normalize(torch.randn(distinct, dim, generator=g), dim=1)
    conds.requires_grad_()

    def flow_step():
        flow.zero_grad(set_to_none=True)
        x.grad = conds.grad = None
        z, log_det = flow(x, conds.repeat_interleave(per_class, 0))
        (0.5 * z.square().sum(1) - log_det).mean().backward()
    gemm = flow_gemm_replay(flow, batch, distinct)
    times: dict[str, list[float]] = {"flow": [], "gemm": []}
    for _ in range(5):
        flow_step()
        gemm()
    for _ in range(steps):
        for name, fn in (("flow", flow_step), ("gemm", gemm)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def flow_adam_ms(dim: int, steps: int = 40) -> float:
    """Median ms of one fused Adam step over the paper's flow's parameters (their gradients
    set): memory-bound work that NIR adds to every step whatever the kernels do."""
    from nirdml.nir.flow import ConditionalGlowFlow

    flow = ConditionalGlowFlow(dim)
    for p in flow.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4, fused=True)
    for _ in range(5):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def gemm_rates(batch: int, width: int, reps: int = 200) -> dict[str, float]:
    """GFLOP/s of ``(batch x width) @ (width x width)`` (the flow's hidden layer) and of a
    2048^3 product (this machine's large-GEMM rate), in float32 and bfloat16."""
    rates = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for m, k, n, name, r in ((batch, width, width, "flow", reps),
                                 (2048, 2048, 2048, "large", 3)):
            a = torch.randn(m, k).to(dtype)
            b = torch.randn(k, n).to(dtype)
            for _ in range(3):
                a @ b
            t0 = time.perf_counter()
            for _ in range(r):
                a @ b
            rates[f"{name} {tag}"] = 2 * m * k * n * r / (time.perf_counter() - t0) / 1e9
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="omniglot")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="extra", action="append", default=[],
                   help="config override for every arm")
    p.add_argument("--arm", dest="arms", action="append", default=[], metavar="NAME=K=V,K=V",
                   help="an arm and its overrides (repeatable; default: base and base + NIR), "
                        "e.g. --arm 'disc=loss.nir.enabled=true,loss.nir.mode=disc'")
    p.add_argument("--no-flow", action="store_true",
                   help="skip the flow-against-its-GEMM-time measurement (CPU only)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds alone (training on the CPU sets them: "
                        "nirdml.host_memory), to see the page faults they avoid")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    kept = False
    if device.type == "cpu" and not args.default_malloc:
        from nirdml.host_memory import keep_freed_memory

        kept = keep_freed_memory()  # as the trainer does on the CPU
    arms = {"base": ["loss.nir.enabled=false"],
            "+ NIR release": ["loss.nir.enabled=true"],
            # the setting-a winner after its flow warm-up (set_epoch is not called here)
            "+ NIR paper/dim+warmup": ["loss.nir.enabled=true", "loss.nir.mode=paper",
                                       "loss.nir.per_dim=true", "loss.nir.weight=0.3",
                                       "loss.nir.warmup_epochs=5"]}
    if args.arms:
        arms = {}
        for spec in args.arms:
            name, _, overrides = spec.partition("=")
            arms[name] = [o for o in overrides.split(",") if o]
    faults: dict[str, float] = {}
    med = interleaved_medians(args.preset, arms, device, args.amp, args.steps, args.warmup,
                              args.extra, faults)
    preset = PRESETS[args.preset]
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    malloc = "freed memory kept" if kept else "default malloc"
    print(f"{args.preset} step ({preset['config']}, amp {args.amp}) on {label}, {malloc}; "
          f"median of {args.steps} interleaved steps")
    first = next(iter(med))
    for name, t in med.items():
        print(f"  {name:24s} {1000 * t:8.1f} ms/step  {t / med[first]:6.3f}x {first}  "
              f"{faults[name]:8.0f} page faults/step")
    if device.type == "cpu" and not args.no_flow:
        from nirdml.training.config import load_config

        cfg = load_config(preset["config"], [*preset["overrides"], *args.extra])
        f = flow_against_gemm(cfg.model.embedding_dim, cfg.data.batch_size,
                              cfg.data.samples_per_class, args.steps)
        print(f"the flow alone (D={cfg.model.embedding_dim}, batch {cfg.data.batch_size}), "
              f"forward + backward: {f['flow']:.2f} ms; its matrix products at the same "
              f"shapes: {f['gemm']:.2f} ms; flow / GEMM = {f['flow'] / f['gemm']:.2f}x "
              f"(target <= 3x)")
        adam = flow_adam_ms(cfg.model.embedding_dim, args.steps)
        base = 1000 * med[first]
        floor = base + f["gemm"] + adam
        print(f"NIR's floor: the base step + the flow's matrix products + its Adam step "
              f"({adam:.2f} ms, memory-bound) = {floor:.1f} ms = {floor / base:.3f}x {first}; "
              + "; ".join(f"{name} {1000 * t - floor:+.1f} ms above it"
                          for name, t in med.items() if name != first))
        r = gemm_rates(cfg.data.batch_size, 128)
        print(f"GEMM rate (GFLOP/s) at the flow's hidden-layer shape ({cfg.data.batch_size} x "
              f"128 @ 128 x 128): fp32 {r['flow fp32']:.0f}, bf16 {r['flow bf16']:.0f}; at "
              f"2048^3: fp32 {r['large fp32']:.0f}, bf16 {r['large bf16']:.0f}: the flow's "
              f"float32 products run at {r['flow fp32'] / r['large fp32']:.0%} of this "
              f"machine's large-GEMM rate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
