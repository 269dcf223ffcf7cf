"""NIR's cost per training step: a full step (forward, backward, Adam) with and without NIR.

Both arms are built from the same config (``--config``, default ``omniglot_pa``: small CNN,
128-d, batch 90 of 2 per class, 868 training classes), on synthetic images of the config's size,
and timed interleaved (A, B, A, B, ...) so that a busy machine slows both alike; the medians
and their ratio are printed last. ``--preset resnet50`` measures the paper's step instead
(ResNet50, 224 px, 100 classes; use ``--device cuda --amp bf16`` on a GPU).

    python benchmarks/bench_train_step.py                         # small CNN on the CPU
    python benchmarks/bench_train_step.py --preset resnet50 --device cuda --amp bf16
    python benchmarks/bench_train_step.py --arm "NIR=loss.nir.enabled=true" \
        --arm "disc=loss.nir.enabled=true,loss.nir.mode=disc,loss.nir.per_dim=true"
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
                        extra: list[str] | None = None) -> dict[str, float]:
    """Median seconds per full training step of each arm (name -> config overrides), the arms
    stepped in turn (A, B, C, A, B, C, ...) on the same synthetic batch."""
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
    for _ in range(steps):
        for name, step in steps_by_arm.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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
    args = p.parse_args(argv)
    device = torch.device(args.device)
    arms = {"base": ["loss.nir.enabled=false"], "base + NIR": ["loss.nir.enabled=true"]}
    if args.arms:
        arms = {}
        for spec in args.arms:
            name, _, overrides = spec.partition("=")
            arms[name] = [o for o in overrides.split(",") if o]
    med = interleaved_medians(args.preset, arms, device, args.amp, args.steps, args.warmup,
                              args.extra)
    preset = PRESETS[args.preset]
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{args.preset} step ({preset['config']}, amp {args.amp}) on {label}; median of "
          f"{args.steps} interleaved steps")
    first = next(iter(med))
    for name, t in med.items():
        print(f"  {name:24s} {1000 * t:8.1f} ms/step  {t / med[first]:6.3f}x {first}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
