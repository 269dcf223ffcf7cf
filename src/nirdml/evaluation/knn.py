"""Exact cosine nearest-neighbour search in memory-bounded query blocks (faiss or torch):
``knn_blocks`` yields each query block's table of gallery neighbours for the ranking metrics.

Every backend returns, for each query, gallery positions ordered by the same rule, so the two
backends give identical neighbour tables:

* the score of a pair is the inner product of the L2-normalised float32 embeddings;
* neighbours are sorted by decreasing score; scores that lie within ``tolerance`` of each other
  in float32 (``score_tolerance``: over twice the worst float32 rounding of a D-term dot
  product, whatever the backend's summation order) are re-scored in float64 (products of
  float32 numbers are exact there) and ordered by that value;
* exact ties (equal float64 scores, as for duplicate embeddings) go to the lower gallery index;
* a query never retrieves itself (matched by index, not by score; duplicates of it still count);
* the backend is asked for a few more neighbours than needed, and rows whose last retrieved
  score is not clearly (by ``tolerance``) below the k-th are searched again with a larger k, so
  that tied gallery items just past the cut-off cannot be missed.

Degenerate data (embeddings collapsed to within float32 precision) would make that exact order
cost ``N x N`` float64 scores; its work is bounded instead, with a ``DegenerateTiesWarning``:
a chain of more than ``MAX_EXACT_RUN`` near-tied neighbours is ordered by (float32 score,
index) -- exact for duplicates, arbitrary but deterministic for near-duplicates -- and a query
still tied with unretrieved items after ``max(4 k, k + DEGENERATE_TIES)`` neighbours settles
among the retrieved ones.

Only ``block x k`` results and one score tile (faiss: 4096 x up to 16384, torch: ``block x
tile``) are held at a time; the full ``N x N`` score matrix never is. Blocks and tiles are sized
from the memory the OS reports available (a quarter of it, at most 512 MiB in all;
``max_memory_bytes``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from nirdml.errors import ConfigError
from nirdml.evaluation.ties import (  # noqa: F401 - part of this module's interface
    DEGENERATE_TIES,
    MAX_EXACT_RUN,
    DegenerateTiesWarning,
    exact_scores,
    score_tolerance,
    settle_rows,
)

BACKENDS = ("auto", "faiss", "torch")
#: ``auto``: the two-pass search (bfloat16 candidates, float32 re-scoring:
#: ``nirdml.evaluation.twopass``) where the hardware multiplies bfloat16 natively; ``float32``:
#: one float32 pass. Both give the same neighbours and metrics.
PRECISIONS = ("auto", "float32")
_FAISS_GPU_MAX_K = 2048
_DEFAULT_BUDGET = 512 * 2**20


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_device(device=None):
    """The CUDA device exact search should run on: ``device`` if it is one, the current GPU when
    ``device`` is None and one is present, else None (the CPU)."""
    import torch

    if device is not None:
        device = torch.device(device)
        return device if device.type == "cuda" else None
    return torch.device("cuda") if torch.cuda.is_available() else None


def resolve_backend(backend: str, device=None) -> str:
    """Map ``"auto"`` to ``"torch"`` on a GPU (blockwise matmul + top-k there; ``device`` None
    means: the GPU when there is one), else to ``"faiss"`` when faiss imports, else ``"torch"``;
    check explicit names."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if cuda_device(device) is not None:
            return "torch"
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise ConfigError(
            "backend='faiss' but faiss is not installed; `pip install faiss-cpu` or use "
            "backend='torch'"
        )
    return backend


def available_memory_bytes() -> int:
    """Memory the OS reports as available (``MemAvailable``), or 4 GiB when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def memory_budget(max_memory_bytes: int | None = None, gpu=None) -> int:
    """Bytes the search may use for its blocks: a quarter of the available memory, at most
    512 MiB on the CPU; on a GPU (``gpu``: its device) a quarter of its free memory, at most
    8 GiB."""
    if max_memory_bytes is not None:
        return max(int(max_memory_bytes), 2**20)
    if gpu is not None:
        import torch

        free, _ = torch.cuda.mem_get_info(gpu)
        return max(min(free // 4, 8 * 2**30), 16 * 2**20)
    return max(min(available_memory_bytes() // 4, _DEFAULT_BUDGET), 16 * 2**20)


@contextlib.contextmanager
def faiss_blas_blocks(faiss, query_bs: int, database_bs: int, blas_threshold: int | None = None):
    """Temporarily enlarge faiss's BLAS tiles (its default 4096 x 1024 is 20-40% slower here)
    and, with ``blas_threshold``, score batches of at least that many queries with BLAS (faiss
    scans the gallery once per query below its default of 20: 8 queries on 100k x 128 take 2.2x
    longer that way on this CPU, 32 queries 6x with the small tiles).

    These are process-wide faiss settings: they are restored on exit (not thread-safe).
    """
    cvar = getattr(faiss, "cvar", None)
    names = ["distance_compute_blas_query_bs", "distance_compute_blas_database_bs"]
    values = [query_bs, database_bs]
    if blas_threshold is not None:
        names.append("distance_compute_blas_threshold")
        values.append(blas_threshold)
    if cvar is None or not all(hasattr(cvar, n) for n in names):
        yield
        return
    old = [getattr(cvar, n) for n in names]
    try:
        for n, v in zip(names, values):
            setattr(cvar, n, v)
        yield
    finally:
        for n, v in zip(names, old):
            setattr(cvar, n, v)


class FaissSearcher:
    """Exact inner-product search with ``faiss.IndexFlatIP`` (on GPU when faiss has one).

    On CPU, faiss scores ``query_bs x database_bs`` float32 tiles with BLAS. ``tile_bytes``
    sets the tile (4096 x 16384 = 256 MiB by default), which on a 2-core AVX-512 machine is
    ~20% faster than faiss's default 4096 x 1024 when idle and up to 40% under CPU contention.
    """

    query_bs = 4096

    def __init__(self, gallery: np.ndarray, tile_bytes: int = 256 * 2**20):
        import faiss

        self._faiss = faiss
        self.database_bs = int(np.clip(tile_bytes // (4 * self.query_bs), 1024, 16384))
        self.index = faiss.IndexFlatIP(gallery.shape[1])
        self.index.add(np.ascontiguousarray(gallery, dtype=np.float32))
        self.gpu_index = None
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            try:
                self.gpu_index = faiss.index_cpu_to_all_gpus(self.index)
            except (RuntimeError, AttributeError):  # pragma: no cover - GPU build quirks
                self.gpu_index = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, gallery positions) per query by decreasing score (ties: any order)."""
        index = self.gpu_index if (self.gpu_index is not None and k <= _FAISS_GPU_MAX_K) else None
        index = index if index is not None else self.index
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with faiss_blas_blocks(self._faiss, self.query_bs, self.database_bs):
            scores, idx = index.search(queries, int(k))
        return scores, idx.astype(np.int64, copy=False)


class TorchSearcher:
    """Exact inner-product search in torch: ``block x tile`` score tiles and a running top-k."""

    def __init__(self, gallery: np.ndarray, device=None, tile: int = 8192):
        import torch

        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.gallery = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(
            self.device
        )
        self.tile = int(max(1, tile))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, gallery positions) per query by decreasing score (ties: any order)."""
        torch = self._torch
        g = self.gallery
        n_gallery = g.shape[0]
        k = int(min(k, n_gallery))
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        best_s = best_i = None
        # Force full float32 products (no TF32 / reduced precision) for the tolerance to hold.
        old_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        buf = None  # one reused score tile: fresh allocations page-fault at every tile
        try:
            with torch.no_grad():
                for start in range(0, n_gallery, self.tile):
                    stop = min(start + self.tile, n_gallery)
                    if stop - start == self.tile:
                        if buf is None:
                            buf = torch.empty((q.shape[0], self.tile), device=self.device)
                        scores = torch.mm(q, g[start:stop].T, out=buf)
                    else:
                        scores = q @ g[start:stop].T
                    kk = min(k, stop - start)
                    s, i = torch.topk(scores, kk, dim=1, sorted=False)
                    i += start
                    if best_s is None:
                        best_s, best_i = s, i
                    else:
                        cat_s = torch.cat([best_s, s], dim=1)
                        cat_i = torch.cat([best_i, i], dim=1)
                        kk = min(k, cat_s.shape[1])
                        best_s, pos = torch.topk(cat_s, kk, dim=1, sorted=False)
                        best_i = torch.gather(cat_i, 1, pos)
            best_s, order = torch.sort(best_s, dim=1, descending=True)
            best_i = torch.gather(best_i, 1, order)
        finally:
            torch.set_float32_matmul_precision(old_precision)
        return best_s.cpu().numpy(), best_i.cpu().numpy().astype(np.int64, copy=False)


def bf16_native(device=None) -> bool:
    """Whether ``device`` (the CPU when None or "cpu") multiplies bfloat16 natively: AVX512-BF16
    or AMX on a CPU, compute capability 8.0 or later on a CUDA GPU."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}")
    return precision


def make_searcher(
    gallery: np.ndarray, backend: str, device=None, tile: int | None = None,
    tile_bytes: int = 256 * 2**20, precision: str = "auto", k: int | None = None,
):
    """A searcher over ``gallery`` (float32, L2-normalised) for a resolved backend name; with
    ``precision="auto"`` on hardware with native bfloat16, the two-pass searcher around it
    (unless ``k``, the neighbours the caller will ask for, is where it would not pay)."""
    check_precision(precision)
    if backend == "faiss":
        searcher, where = FaissSearcher(gallery, tile_bytes=tile_bytes), "cpu"
    elif backend == "torch":
        searcher = TorchSearcher(gallery, device=device, tile=tile or 8192)
        where = searcher.device
    else:
        raise ConfigError(f"unknown backend {backend!r}")
    if precision == "auto" and bf16_native(where):
        from nirdml.evaluation.twopass import TwoPassSearcher

        if k is None or TwoPassSearcher.pays(*gallery.shape, k):
            searcher = TwoPassSearcher(gallery, searcher, device=where, budget=tile_bytes)
    return searcher


def query_block_size(width: int, backend: str, budget: int, tile: int = 8192) -> int:
    """Queries per block so that the block's search and metric arrays fit in ``budget`` bytes."""
    per_query = (width + 64) * 48  # results, sort keys and float64 metric temporaries
    if backend == "torch":
        per_query += tile * 4 + 4 * (width + 64) * 12
    return int(np.clip(budget // per_query, 64, 16384))


def knn_blocks(
    queries: np.ndarray,
    gallery: np.ndarray,
    self_pos: np.ndarray,
    k: int,
    backend: str = "auto",
    block_size: int | None = None,
    device=None,
    max_memory_bytes: int | None = None,
    searcher=None,
    query_labels: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    precision: str = "auto",
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, neighbours)`` per query block in canonical order (module doc).

    ``queries`` / ``gallery``: float32 L2-normalised rows. ``self_pos[i]``: the gallery position
    of query ``i`` itself, or -1 when it is not in the gallery. ``neighbours`` is
    ``(stop - start, min(k, len(gallery)))`` int64 gallery positions, -1 where a query has fewer
    neighbours than that (only when the query is itself one of the gallery items).
    With ``query_labels`` and ``gallery_labels``, near ties between neighbours of equal relevance
    (same-class or not) are left in backend order: cheaper, and no metric can tell.
    ``precision`` (:data:`PRECISIONS`): the two-pass bfloat16 search where it pays, or float32.
    """
    backend = resolve_backend(backend, device)
    n_gallery = gallery.shape[0]
    width = int(min(k, n_gallery))
    if width < 1:
        raise ConfigError("k must be at least 1")
    tol = score_tolerance(gallery.shape[1])
    extra = 4 + width // 32
    budget = memory_budget(max_memory_bytes,
                           cuda_device(device) if backend == "torch" else None)
    tile_bytes = budget // 2  # faiss's BLAS tile; the rest for the query block
    if block_size is None:
        block_size = query_block_size(
            width, backend, budget - tile_bytes if backend == "faiss" else budget
        )
    if searcher is None:
        tile = None
        if backend == "torch":
            tile = int(np.clip(budget // (4 * max(block_size, 1) * 2), 1024, 65536))
        searcher = make_searcher(gallery, backend, device=device, tile=tile,
                                 tile_bytes=tile_bytes, precision=precision,
                                 k=width + 1 + extra)
    for start in range(0, queries.shape[0], block_size):
        stop = min(start + block_size, queries.shape[0])
        table = settle_rows(
            searcher, queries[start:stop], gallery, self_pos[start:stop], width, extra, tol,
            None if query_labels is None else query_labels[start:stop], gallery_labels,
        )
        yield start, stop, table
