"""Throughput and latency of ``nirdml serve`` with and without request batching.

A gallery of ``--items`` random unit embeddings (default 100,000) is indexed with a model
checkpoint (``--checkpoint``, or untrained models of the study's two settings, ``--models``:
the small CNN on 1 x 28 x 28 drawings and EfficientNet-Lite0 on 3 x 84 x 84 images), the real
server is started twice -- ``--batch-size 32`` and ``--batch-size 1`` (one forward pass and one
index search per upload) -- and ``--clients`` threads each send ``--requests`` image searches
(k = 10) of the same PNG. Printed: requests/s, p50 and p99 latency of each, and the
throughput ratio, measured side by side in one run (run it on a quiet machine), and the model's
forward time per image at batch 1 and 32 and the index search time per query at 1 and 32
queries, which bound what batching can give.

    python benchmarks/bench_serve.py --clients 8 --requests 40
"""


from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MODES = (("batched (32)", 32), ("one at a time", 1))
#: name -> (image size, input channels, image kind) of the study's two settings
MODELS = {"small_cnn": (28, 1, "gray_small"), "efficientnet_lite0": (84, 3, "rgb")}


def untrained_checkpoint(path: Path, name: str) -> Path:
    import torch

    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    image_size, in_chans, kind = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=128, in_chans=in_chans)
    cfg = Config.from_dict({"data": {"name": "omniglot", "image_size": image_size},
                            "model": {"name": name, "embedding_dim": 128}})
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(),
                     "in_chans": in_chans, "image_kind": kind, "epoch": 1,
                     "num_classes": 10}, path)
    return path


def stage_times(checkpoint: Path, index: Path, image_size: int, in_chans: int) -> dict:
    """Milliseconds per image of the forward pass, and per query of the index search, at
    batch 1 and 32 (in this process, the server's thread count)."""
    import torch

    from nirdml.inference import TrainedRun
    from nirdml.retrieval import GalleryIndex

    model = TrainedRun.open(checkpoint, "cpu").model.eval()
    gallery = GalleryIndex.load(index)
    out = {}
    for b in (1, 32):
        x = torch.randn(b, in_chans, image_size, image_size)
        q = np.random.default_rng(b).normal(size=(b, gallery.dim)).astype(np.float32)
        with torch.inference_mode():
            out[f"forward_ms@{b}"] = per_item(lambda x=x: model(x), b)
        out[f"search_ms@{b}"] = per_item(lambda q=q: gallery.search(q, 10), b)
    return out


def per_item(fn, batch: int, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats / batch


def build_index(checkpoint: Path, items: int, out: Path) -> None:
    from nirdml.inference import TrainedRun
    from nirdml.retrieval import Retriever
    from nirdml.retrieval.gallery import Gallery

    dim = TrainedRun.open(checkpoint, "cpu").model.embedding_dim
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(items, dim)).astype(np.float32)
    gallery = Gallery(emb / np.linalg.norm(emb, axis=1, keepdims=True),
                      np.arange(items) % 1000, None, None, {"kind": "synthetic"})
    Retriever.from_checkpoint(checkpoint, gallery, device="cpu").save(out)


def query_png(size: int, in_chans: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1)
    out = io.BytesIO()
    if in_chans == 1:
        pixels = (rng.random((size, size)) > 0.8).astype(np.uint8) * 255
    else:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def serve(index: Path, batch: int, wait_ms: float = 20.0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nirdml", "serve", "--index", str(index),
                             "--port", str(port), "--device", "cpu", "--batch-size",
                             str(batch), "--batch-wait-ms", str(wait_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).read()
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def load(base: str, png: bytes, clients: int, requests: int) -> dict:
    def one(_):
        req = urllib.request.Request(base + "/search?k=10", data=png, method="POST",
                                     headers={"Content-Type": "image/png"})
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as res:
            json.loads(res.read())
        return time.perf_counter() - start

    def batches() -> int:
        return json.loads(urllib.request.urlopen(base + "/healthz").read())["batches"]

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * 2)))  # warm-up
        before = batches()
        start = time.perf_counter()
        lat = list(pool.map(one, range(clients * requests)))
        wall = time.perf_counter() - start
    lat.sort()
    return {"requests_per_s": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "batches": batches() - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a trained checkpoint instead of --models (with --image-size)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40, help="per client")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="the batched server's --batch-wait-ms (default: serve's own, 20)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved load runs per server (the median pair is reported)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    report = {"items": args.items, "clients": args.clients, "models": {}}
    cases = [(str(args.checkpoint), None)] if args.checkpoint else [(m, m) for m in args.models]
    print(f"{args.items} items, {args.clients} clients x {args.requests} image searches (k=10)")
    for label, name in cases:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if name is None:
                from nirdml.inference import TrainedRun

                ckpt = args.checkpoint
                prep = TrainedRun.open(ckpt, "cpu").query_preprocessing
                size, chans = prep.image_size or args.image_size, prep.in_chans
            else:
                ckpt = untrained_checkpoint(tmp / "model.pt", name)
                size, chans, _ = MODELS[name]
            build_index(ckpt, args.items, tmp / "index")
            png = query_png(size, chans)
            stages = stage_times(ckpt, tmp / "index", size, chans)
            servers = {mode: serve(tmp / "index", batch, args.batch_wait_ms)
                       for mode, batch in MODES}
            runs = {mode: [] for mode, _ in MODES}
            try:  # interleaved A B, B A, ...: drifts of a shared machine hit both alike
                for rep in range(args.repeats):
                    for mode, _ in MODES[::1 if rep % 2 == 0 else -1]:
                        runs[mode].append(load(servers[mode][1], png, args.clients,
                                               args.requests))
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(timeout=20)
        ratios = [a["requests_per_s"] / b["requests_per_s"]
                  for a, b in zip(runs["batched (32)"], runs["one at a time"], strict=True)]
        ratio = statistics.median(ratios)
        results = {mode: min(rs, key=lambda r: abs(r["requests_per_s"] - statistics.median(
            x["requests_per_s"] for x in rs))) for mode, rs in runs.items()}
        print(f"\n{label} ({size} px): forward {stages['forward_ms@1']:.2f} ms/image at batch 1, "
              f"{stages['forward_ms@32']:.2f} at 32; search {stages['search_ms@1']:.2f} "
              f"ms/query alone, {stages['search_ms@32']:.2f} in 32")
        print(f"{'(median repeat)':16s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
              f"{'batches':>8s}")
        for mode, r in results.items():
            print(f"{mode:16s} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} "
                  f"{r['p99_ms']:8.1f} {r['batches']:8d}")
        print(f"throughput ratio batched / one at a time: {ratio:.2f}x (median of "
              f"{len(ratios)} interleaved pairs: " + ", ".join(f"{x:.2f}" for x in ratios) + ")")
        report["models"][label] = {**results, "ratio": ratio, "ratios": ratios,
                                   "runs": runs, "stages_ms": stages,
                                   "image_size": size}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
