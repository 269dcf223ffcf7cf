"""Throughput of embedding and of gallery search on this machine.

Embedding: images/s of ``small_cnn`` (1x32x32, the digits/omniglot setting) and ``resnet50``
(3x224x224 from 300x300 sources, the CUB/Cars/SOP setting) with random weights on synthetic
images, through the same pipeline as ``nirdml embed`` (PIL image -> eval transform -> DataLoader
-> model), varying batch size, DataLoader workers, channels-last and ``torch.compile``. "model"
rows time the network alone on a ready tensor batch.

Search: queries/s of faiss over an N x 128 gallery of synthetic embeddings (class clusters on
a 24-d subspace), exact (``IndexFlatIP``), IVF-flat and IVF-PQ (nlist ~ 4*sqrt(N), 8 bits,
m = 16/32/64 bytes per vector; nirdml's default is m = dim/4 = 32) at several ``nprobe``, with
recall@1 (the exact nearest neighbour ranked first) and recall@10 (found in the top 10) against
exact search.

    python benchmarks/bench_embed.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/bench_embed.py                  # 1M gallery, more settings
    python benchmarks/bench_embed.py --skip-embed --gallery 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


# ---------------------------------------------------------------------------------- embedding
class SyntheticImages(torch.utils.data.Dataset):
    """Random uint8 PIL images pushed through an eval-style transform."""

    def __init__(self, n: int, mode: str, source: int, out: int):
        from torchvision import transforms as T

        self.n, self.mode, self.source = n, mode, source
        ops = [] if source == out else [T.Resize(int(out * 256 / 224)), T.CenterCrop(out)]
        norm = T.Normalize([0.5] * (1 if mode == "L" else 3), [0.25] * (1 if mode == "L" else 3))
        self.transform = T.Compose([*ops, T.ToTensor(), norm])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image

        rng = np.random.default_rng(i)
        shape = (self.source, self.source) + (() if self.mode == "L" else (3,))
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), self.mode)
        return self.transform(img), 0


def build(name: str, channels_last: bool, compile_: bool):
    from nirdml.models import build_model

    in_chans = 1 if name == "small_cnn" else 3
    model = build_model(name, embedding_dim=128, pretrained=False, in_chans=in_chans).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    return model


@torch.no_grad()
def bench_embedding(name: str, n: int, batch: int, workers: int, channels_last: bool,
                    compile_: bool, model_only: bool = False) -> dict:
    mode, source, size = ("L", 32, 32) if name == "small_cnn" else ("RGB", 300, 224)
    t0 = time.perf_counter()
    model = build(name, channels_last, compile_)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    warm = torch.randn(batch, 1 if mode == "L" else 3, size, size).to(memory_format=fmt)
    model(warm)  # warm-up (and compilation)
    setup = time.perf_counter() - t0
    if model_only:
        reps = max(1, n // batch)
        start = time.perf_counter()
        for _ in range(reps):
            model(warm)
        seconds, images = time.perf_counter() - start, reps * batch
    else:
        loader = torch.utils.data.DataLoader(SyntheticImages(n, mode, source, size),
                                             batch_size=batch, num_workers=workers)
        start = time.perf_counter()
        images = 0
        for x, _ in loader:
            model(x.to(memory_format=fmt))
            images += x.shape[0]
        seconds = time.perf_counter() - start
    return {"model": name, "input": f"{1 if mode == 'L' else 3}x{size}x{size}",
            "what": "model" if model_only else "pipeline", "batch": batch,
            "workers": workers, "channels_last": channels_last, "compile": compile_,
            "images": images, "images_per_s": images / seconds, "setup_s": setup}


def embedding_grid(quick: bool, compile_models: list[str]) -> list[dict]:
    n_small, n_big = (2048, 48) if quick else (8192, 256)
    runs = []
    for batch in ([64, 256] if quick else [16, 64, 256, 1024]):
        runs.append(("small_cnn", n_small, batch, 0, False, False, False))
    runs += [("small_cnn", n_small, 256, 0, False, False, True),
             ("small_cnn", n_small, 256, 2, False, False, False),
             ("small_cnn", n_small, 256, 0, True, False, False)]
    if "small_cnn" in compile_models:
        runs.append(("small_cnn", n_small, 256, 0, False, True, False))
    for batch in ([16] if quick else [8, 32]):
        runs.append(("resnet50", n_big, batch, 0, False, False, False))
    runs += [("resnet50", n_big, 16, 0, False, False, True),
             ("resnet50", n_big, 16, 2, False, False, False),
             ("resnet50", n_big, 16, 0, True, False, False)]
    if "resnet50" in compile_models:
        runs.append(("resnet50", n_big, 16, 0, True, True, False))
    out = []
    for name, n, batch, workers, cl, comp, model_only in runs:
        res = bench_embedding(name, n, batch, workers, cl, comp, model_only)
        print(f"  {res['model']:<9} {res['input']:<9} {res['what']:<8} batch {batch:>4}  "
              f"workers {workers}  channels_last {str(cl):<5}  compile {str(comp):<5}  "
              f"{res['images_per_s']:9.1f} img/s  (setup {res['setup_s']:.1f}s)", flush=True)
        out.append(res)
    return out


# ---------------------------------------------------------------------------------- search
def synthetic_embeddings(n: int, num_queries: int, dim: int = 128, latent: int = 24,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors shaped like learned embeddings: class clusters on a ``latent``-dim subspace
    plus a little isotropic noise (fully isotropic data would make every neighbour a tie)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, latent)))[0].T.astype(np.float32)
    centres = rng.normal(size=(max(10, n // 1000), latent)).astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):  # chunks keep the peak memory low
            e = min(m, s + 100_000)
            z = centres[rng.integers(0, len(centres), e - s)] + 0.5 * rng.standard_normal(
                (e - s, latent), dtype=np.float32)
            out[s:e] = z @ basis + 0.05 * rng.standard_normal((e - s, dim), dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return draw(n), draw(num_queries)


def bench_search(n: int, dim: int, num_queries: int, ms: list[int], nprobes: list[int],
                 nlist: int | None = None) -> list[dict]:
    import faiss

    from nirdml.retrieval.faiss_index import IndexSpec, build_index

    x, q = synthetic_embeddings(n, num_queries, dim)
    rows = []
    t0 = time.perf_counter()
    exact, _ = build_index(x, IndexSpec("flat"))
    build_s = time.perf_counter() - t0
    start = time.perf_counter()
    _, truth = exact.search(q, 10)
    seconds = time.perf_counter() - start
    rows.append({"index": "flat", "n": n, "dim": dim, "build_s": build_s,
                 "queries_per_s": len(q) / seconds, "recall@1": 1.0, "recall@10": 1.0,
                 "bytes_per_vector": dim * 4})
    print(f"  flat     N={n:>8}  build {build_s:6.1f}s  {rows[-1]['queries_per_s']:9.1f} q/s  "
          f"{dim * 4} B/vector", flush=True)
    del exact
    for m in ms:  # m = 0 stands for IVF-flat (full vectors in the cells)
        t0 = time.perf_counter()
        spec = IndexSpec("ivfpq", nlist=nlist, m=m) if m else IndexSpec("ivf", nlist=nlist)
        index, spec = build_index(x, spec)
        build_s = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        for nprobe in nprobes:
            if nprobe > spec.nlist:
                continue
            ivf.nprobe = nprobe
            start = time.perf_counter()
            _, ids = index.search(q, 10)
            seconds = time.perf_counter() - start
            r1 = float((ids[:, 0] == truth[:, 0]).mean())
            r10 = float((ids == truth[:, :1]).any(axis=1).mean())
            nbytes = spec.m * spec.nbits // 8 if m else dim * 4
            rows.append({"index": spec.type, "n": n, "dim": dim, "nlist": spec.nlist,
                         "m": spec.m, "nbits": spec.nbits, "nprobe": nprobe, "build_s": build_s,
                         "queries_per_s": len(q) / seconds, "recall@1": r1, "recall@10": r10,
                         "bytes_per_vector": nbytes})
            print(f"  {spec.type:<8} N={n:>8}  build {build_s:6.1f}s  nlist {spec.nlist} "
                  f"m {spec.m or '-':>2}  nprobe {nprobe:>3}  "
                  f"{rows[-1]['queries_per_s']:9.1f} q/s  recall@1 {r1:.3f}  "
                  f"recall@10 {r10:.3f}  {nbytes} B/vector", flush=True)
        del index
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--gallery", type=int, default=None,
                   help="search gallery size (default 1,000,000; --quick 100,000)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--m", type=int, nargs="+", default=None,
                   help="IVF-PQ sub-quantisers to try, 0 = IVF-flat (default 0 16 32 64; "
                        "nirdml's default is 32)")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4*sqrt(N))")
    p.add_argument("--compile", nargs="*", default=None, metavar="MODEL",
                   help="models to also run with torch.compile (default: small_cnn with "
                        "--quick, both otherwise)")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    args = p.parse_args()
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.platform()}
    print(f"machine: {info}")
    results: dict = {"info": info}
    if not args.skip_embed:
        compile_models = args.compile if args.compile is not None else (
            ["small_cnn"] if args.quick else ["small_cnn", "resnet50"])
        print("embedding throughput:")
        results["embedding"] = embedding_grid(args.quick, compile_models)
    if not args.skip_search:
        n = args.gallery or (100_000 if args.quick else 1_000_000)
        print("search throughput (1000 queries, k=10):" if args.queries == 1000
              else f"search throughput ({args.queries} queries, k=10):")
        results["search"] = bench_search(n, 128, args.queries, args.m or [0, 16, 32, 64],
                                         [1, 4, 16, 64], args.nlist)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
