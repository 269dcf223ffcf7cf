"""NIR's cost per training step: a full step (forward, backward, Adam) with and without NIR.

Both arms are built from the same config (``--config``, default ``omniglot_pa``: small CNN,
128-d, batch 90 of 2 per class, 868 training classes), on synthetic images of the config's size,
and timed interleaved (A, B, A, B, ...) so that a busy machine slows both alike; the medians
and their ratio are printed last. ``--preset resnet50`` measures the paper's step instead
(ResNet50, 224 px, 100 classes; use ``--device cuda --amp bf16`` on a GPU).

    python benchmarks/bench_train_step.py                         # small CNN on the CPU
    python benchmarks/bench_train_step.py --preset resnet50 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PRESETS = {
    "omniglot": {"config": "omniglot_pa", "classes": 868, "image_size": 28, "channels": 1,
                 "overrides": []},
    "resnet50": {"config": "cub200_pa_128", "classes": 100, "image_size": 224, "channels": 3,
                 "overrides": ["model.pretrained=false"]},
}


def build_arm(preset: dict, nir: bool, device: torch.device, extra: list[str]):
    from nirdml.training import builders
    from nirdml.training.config import load_config

    cfg = load_config(preset["config"], [*preset["overrides"], f"loss.nir.enabled={nir}",
                                         *extra])
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="omniglot")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", dest="extra", action="append", default=[])
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    arms = {}
    for name, nir in (("base", False), ("base + NIR", True)):
        cfg, model, criterion, optimizer = build_arm(preset, nir, device, args.extra)
        g = torch.Generator().manual_seed(0)
        b, spc = cfg.data.batch_size, cfg.data.samples_per_class
        size = preset["image_size"]
        x = torch.randn(b, preset["channels"], size, size, generator=g).to(device)
        y = torch.randperm(preset["classes"], generator=g)[: b // spc].repeat_interleave(spc)
        arms[name] = make_step(cfg, model, criterion, optimizer, x, y.to(device), device,
                               args.amp)
    for step in arms.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.steps):
        for name, step in arms.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{args.preset} step ({preset['config']}, batch {cfg.data.batch_size}, "
          f"amp {args.amp}) on {label}; median of {args.steps} interleaved steps")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"  {name:12s} {1000 * t:8.1f} ms/step  {cfg.data.batch_size / t:8.0f} img/s")
    print(f"NIR step-time overhead: {med['base + NIR'] / med['base']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
