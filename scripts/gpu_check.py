"""Everything nirdml promises on a GPU, measured in one command (under 8 minutes on an H100).

    python scripts/gpu_check.py --data-root /path/to/omniglot --out gpu_check
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/gpu_check     # ~1 min, any CPU

Parts (each timed, each failure recorded, none stops the others):

1. ``tests``: the tests marked ``gpu`` (CUDA training steps under bf16/fp16 autocast with the
   flow in float32 and GradScaler for fp16, resume of a CUDA checkpoint on the CPU and back,
   GPU evaluation equal to the CPU's, the flow on CUDA equal to the CPU's, the CUDA-graphed
   flow training like the eager one, a 1-process NCCL torchrun run).
2. ``train_step``: NIR's overhead on the paper's step: ResNet50, bf16, batch 90, 224 px, with
   and without NIR (release form, and the discriminative variant), interleaved medians.
3. ``flow``: the flow alone at batch 90, D = 128 and 512: eager (fused backward), replayed
   from CUDA graphs, and ``torch.compile(mode="reduce-overhead")``, ms per forward+backward.
4. ``evaluation``: exact evaluation of 1,000,000 x 128 embeddings of 100,000 classes
   (recall@1, MAP@R) in one float32 pass and in two passes (bfloat16 candidates on the tensor
   cores, float32 re-scoring): wall time and peak GPU memory of each, and whether every metric
   is identical (a difference fails the part).
5. ``omniglot``: one epoch of ``omniglot_pa`` and ``omniglot_pa_nir`` (``--data-root``: the
   Omniglot folder; ``../shared`` is not beside the checkout on a lent GPU machine), images/s.
6. ``classes``: ``benchmarks/bench_classes.py`` with NCCL on 2 GPUs (replicated against
   class-sharded proxies, and sharded with 10% sampled negatives, at 10^6 and 10^7 classes,
   D = 512); skipped on a machine with one GPU (--tiny: 2 gloo processes on the CPU).

Writes ``OUT/gpu_check.json`` and prints a summary. ``--tiny`` shrinks every part (a test runs
``--device cpu --tiny`` so that the script cannot rot); without CUDA the GPU-only parts say
that they were skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_tests(args, device) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device: the gpu tests need one"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                          "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-500:]
    return {"returncode": res.returncode, "summary": tail,
            "output": res.stdout[-4000:] if res.returncode else ""}


def part_train_step(args, device) -> dict:
    import bench_train_step as bts

    preset = "omniglot" if args.tiny else "resnet50"
    amp = "bf16" if device.type == "cuda" else "none"
    steps = 4 if args.tiny else 30
    out = {}
    arms = {"base": ["loss.nir.enabled=false"],
            "base + NIR (release)": ["loss.nir.enabled=true"],
            "base + NIR (disc/dim)": ["loss.nir.enabled=true", "loss.nir.mode=disc",
                                      "loss.nir.per_dim=true", "loss.nir.weight=1"]}
    if device.type == "cuda":
        arms["base + NIR (release, CUDA graphs)"] = ["loss.nir.enabled=true",
                                                     "loss.nir.cuda_graphs=true"]
    med = bts.interleaved_medians(preset, arms, device, amp, steps=steps, warmup=2)
    out["ms_per_step"] = {k: 1000 * v for k, v in med.items()}
    out["overhead_vs_base"] = {k: v / med["base"] for k, v in med.items() if k != "base"}
    out["setting"] = f"{preset}, amp {amp}, batch 90, {steps} interleaved steps"
    return out


def part_flow(args, device) -> dict:
    from nirdml.losses import ProxyAnchorLoss
    from nirdml.nir import NIRLoss

    reps = 5 if args.tiny else 50
    out = {}
    for dim in ((32,) if args.tiny else (128, 512)):
        results = {}
        variants = {"eager": {"cuda_graphs": False}}
        if device.type == "cuda":
            variants["cuda_graphs"] = {"cuda_graphs": True}
        for name, kw in variants.items():
            torch.manual_seed(0)
            nir = NIRLoss.from_options(ProxyAnchorLoss(100, dim), 1.0, mode="paper",
                                       **kw).to(device)
            x = torch.randn(90, dim, device=device, requires_grad=True)
            cond = torch.nn.functional.normalize(torch.randn(90, dim, device=device), dim=1)
            results[name] = _time(lambda nir=nir, x=x, cond=cond: nir.nll(x, cond).sum()
                                  .backward(), device, reps)
        if device.type == "cuda" and not args.tiny:
            try:
                torch.manual_seed(0)
                plain = NIRLoss.from_options(ProxyAnchorLoss(100, dim), 1.0, mode="paper",
                                fused=False).to(device)
                compiled = torch.compile(plain.nll, mode="reduce-overhead")
                x = torch.randn(90, dim, device=device, requires_grad=True)
                cond = torch.nn.functional.normalize(torch.randn(90, dim, device=device), dim=1)
                results["compile"] = _time(
                    lambda fn=compiled, x=x, cond=cond: fn(x, cond).sum().backward(), device,
                    reps, warmup=5)
            except Exception as exc:  # noqa: BLE001 - report, do not stop
                results["compile"] = f"failed: {type(exc).__name__}: {exc}"
        out[f"D={dim}"] = results
    return out


def _time(fn, device, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def part_evaluation(args, device) -> dict:
    from nirdml.evaluation import evaluate

    n, d, classes = (20_000, 64, 2_000) if args.tiny else (1_000_000, 128, 100_000)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    x = (centres[labels] + 0.8 * torch.randn(n, d, generator=g)).numpy()
    from nirdml.evaluation.knn import bf16_native

    out = {"n": n, "dim": d, "classes": classes, "flop": 2.0 * n * n * d,
           "bf16_native": bf16_native(device)}
    results = {}
    # one float32 pass, then the two-pass search (bfloat16 candidates, float32 re-scoring;
    # on sm80+ tensor cores): the same metrics, and the time of each
    for precision in ("float32", "auto"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        res = evaluate(x, labels.numpy(), metrics=["recall@1", "map@r"], device=device,
                       precision=precision)
        results[precision] = res
        key = "" if precision == "float32" else "_two_pass"
        out[f"seconds{key}"] = time.perf_counter() - t
        out[f"recall@1{key}"], out[f"map@r{key}"] = res["recall@1"], res["map@r"]
        if device.type == "cuda":
            out[f"peak_gpu_gib{key}"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["two_pass_identical"] = results["auto"] == results["float32"]
    if not out["two_pass_identical"]:
        raise RuntimeError(f"two-pass metrics differ from float32: {results}")
    return out


def part_omniglot(args, device) -> dict:
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    if args.tiny:
        configs, base = {"digits": ["loss.nir.enabled=false"],
                         "digits + NIR": ["loss.nir.enabled=true"]}, "digits"
        extra = []
    else:
        if args.data_root is None:
            return {"skipped": "no --data-root (the Omniglot folder) given"}
        configs = {"omniglot_pa": [], "omniglot_pa_nir": []}
        base, extra = None, [f"data.root={args.data_root}"]
    out = {}
    for name, overrides in configs.items():
        cfg = load_config(base or name, [*extra, *overrides, "train.epochs=1",
                                         f"train.device={device.type}", "train.progress=false",
                                         "train.tensorboard=false"])
        run = Path(args.out) / "runs" / name.replace(" ", "_").replace("+", "nir")
        trainer = Trainer(cfg, run, resume=(run / "checkpoints" / "last.pt").exists())
        final = trainer.fit()
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        out[name] = {"images_per_s": record["time/images_per_s"],
                     "epoch_s": record["time/epoch_s"], "test_recall@1": final["recall@1"]}
    return out


def part_classes(args, device) -> dict:
    import bench_classes

    out = Path(args.out) / "bench_classes.json"
    if device.type != "cuda":
        if not args.tiny:
            return {"skipped": "needs CUDA (bench_classes.py runs the CPU version itself)"}
        argv = ["--classes", "3000", "--dims", "16", "--steps", "1", "--optimizer", "adam"]
    elif torch.cuda.device_count() < 2:
        return {"skipped": f"class sharding over NCCL needs 2 GPUs; this machine has "
                           f"{torch.cuda.device_count()}"}
    else:
        argv = ["--backend", "nccl", "--device", "cuda", "--classes", "1000000", "10000000",
                "--dims", "512", "--steps", "5"]
    bench_classes.main([*argv, "--json", str(out)])
    return json.loads(out.read_text())


PARTS = {"tests": part_tests, "train_step": part_train_step, "flow": part_flow,
         "evaluation": part_evaluation, "omniglot": part_omniglot, "classes": part_classes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=None, help="the Omniglot folder")
    p.add_argument("--out", default="gpu_check")
    p.add_argument("--tiny", action="store_true", help="every part at a tiny size (CPU test)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"CPU ({torch.get_num_threads()} threads)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "tiny": args.tiny,
              "parts": {}}
    if device.type != "cuda":
        report["note"] = "no CUDA device: GPU-only parts were skipped, the rest ran on the CPU"
    for name in args.parts:
        t = time.perf_counter()
        try:
            result = PARTS[name](args, device)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other parts
            result = {"error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["wall_s"] = time.perf_counter() - t
        report["parts"][name] = result
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'traceback'})}",
              flush=True)
    failed = [n for n, r in report["parts"].items()
              if "error" in r or r.get("returncode", 0) != 0]
    print(f"gpu_check on {report['device']}: {len(args.parts) - len(failed)} parts ok"
          + (f", failed: {', '.join(failed)}" if failed else "")
          + (f" ({report['note']})" if "note" in report else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
