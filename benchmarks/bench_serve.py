"""Throughput and latency of ``nirdml serve`` with and without request batching.

A gallery of ``--items`` random unit embeddings (default 100,000) is indexed with a model
checkpoint (``--checkpoint``; default an untrained Omniglot-sized small CNN, 1 x 28 x 28
inputs), the real server is started twice -- ``--batch-size 32`` and ``--batch-size 1`` (one
forward pass per upload) -- and ``--clients`` threads each send ``--requests`` image searches
(k = 10) of the same PNG. Printed: requests/s, p50 and p99 latency of each, and the
throughput ratio, measured side by side in one run (run it on a quiet machine).

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


def untrained_checkpoint(path: Path, image_size: int) -> Path:
    import torch

    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=128, in_chans=1)
    cfg = Config.from_dict({"data": {"name": "omniglot", "image_size": image_size},
                            "model": {"name": "small_cnn", "embedding_dim": 128}})
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 1,
                     "image_kind": "gray_small", "epoch": 1, "num_classes": 10}, path)
    return path


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


def query_png(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1)
    out = io.BytesIO()
    Image.fromarray((rng.random((size, size)) > 0.8).astype(np.uint8) * 255).save(out, "PNG")
    return out.getvalue()


def serve(index: Path, batch: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nirdml", "serve", "--index", str(index),
                             "--port", str(port), "--device", "cpu", "--batch-size",
                             str(batch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    with ThreadPoolExecutor(clients) as pool:  # warm-up
        list(pool.map(one, range(clients * 2)))
        start = time.perf_counter()
        lat = list(pool.map(one, range(clients * requests)))
        wall = time.perf_counter() - start
    lat.sort()
    health = json.loads(urllib.request.urlopen(base + "/healthz").read())
    return {"requests_per_s": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "batches": health["batches"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40, help="per client")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint or untrained_checkpoint(tmp / "model.pt", args.image_size)
        build_index(ckpt, args.items, tmp / "index")
        png = query_png(args.image_size)
        results = {}
        for name, batch in (("batched (32)", 32), ("one at a time", 1)):
            proc, base = serve(tmp / "index", batch)
            try:
                results[name] = load(base, png, args.clients, args.requests)
            finally:
                proc.terminate()
                proc.wait(timeout=20)
    print(f"{args.items} items, {args.clients} clients x {args.requests} image searches (k=10)")
    print(f"{'':16s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'passes':>7s}")
    for name, r in results.items():
        print(f"{name:16s} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['batches']:7d}")
    ratio = results["batched (32)"]["requests_per_s"] / results["one at a time"]["requests_per_s"]
    print(f"throughput ratio batched / one at a time: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({**results, "ratio": ratio, "items": args.items,
                                        "clients": args.clients}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
