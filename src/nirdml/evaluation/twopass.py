"""Exact top-k inner-product search below the float32 floor: bfloat16 candidates, then float32.

``TwoPassSearcher`` has the searcher contract of ``nirdml.evaluation.knn`` (the top-``k``
positions by float32 score, with float32 scores) and returns what the float32 backends return,
while doing the bulk of the arithmetic in bfloat16, which this class of hardware multiplies
about twice as fast as float32 (AVX512-BF16 / AMX on CPUs, tensor cores on GPUs):

1. **bfloat16 scores, reduced in cache.** A block of queries is multiplied with the gallery in
   chunks small enough for the product to stay in cache, each reduced at once to the maxima
   of blocks of consecutive gallery items; the ``k`` largest block maxima give ``beta``,
   reached by at least ``k`` distinct items.
2. **A proven bound.** For unit float32 vectors ``q, g`` with bfloat16 roundings ``q~, g~``
   (residuals ``r_q = q - q~``, ``r_g = g - g~``), ``q.g = q~.g~ + q~.r_g + r_q.g~ + r_q.r_g``,
   so by Cauchy-Schwarz ``|q.g - q~.g~| <= |q~| R + |r_q| A + |r_q| R`` with ``R = max |r_g|``,
   ``A = max |g~|`` over the gallery (residual norms computed exactly, in float64). The float32
   accumulation of the (exact) bfloat16 products adds at most ``gamma_D |q~| A`` (``gamma_D =
   D u / (1 - D u)``, ``u = 2^-24``), and rounding the result ``v`` to bfloat16 at most ``2^-8
   |v|``. So an item whose bfloat16 score is ``o`` has an exact score within ``E_q + c |o|``
   of it (``c = 2^-8 / (1 - 2^-8)``; ``E_q`` per query, 1% slack). The ``k`` items reaching
   ``beta`` score exactly at least ``beta - c |beta| - E_q``, and an item can beat that only if
   ``o >= theta_q = (beta - c |beta| - 2 E_q) / (1 + c)``.
3. **Exact re-scoring.** The items with ``o >= theta_q`` -- a superset of the top-``k``, read
   from the blocks whose maximum reaches ``theta_q`` -- are re-scored in float32 from the
   original vectors, and their top-``k`` is the answer: the scores are float32 inner products
   as the float32 backends compute them (within their rounding of each other, which
   ``nirdml.evaluation.ties`` resolves in float64 the same way for every backend), so no
   metric changes. Every re-scored candidate is checked against its bound: a kernel that does
   not accumulate in float32 raises instead of answering wrongly (``check_bound`` measures it).

What goes to the exact float32 ``fallback`` searcher: searches whose ``k`` is large against
the gallery (``k > N D / 2^15``: re-scoring about ``1.3 k`` candidates a query then costs more
than bfloat16 saves -- measured on this CPU, ``benchmarks/bench_evaluation.py``), galleries
under ``8 * chunk`` items, and rows whose threshold is not positive (bfloat16 bit patterns
order like integers only for positive numbers) or whose candidates exceed ``max_candidates``
(near-collapsed embeddings).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: bfloat16's unit roundoff (8 significant bits)
BF16_U = 2.0**-8
#: float32's unit roundoff
F32_U = 2.0**-24
#: bfloat16 pays while k <= N * D / BF16_CROSSOVER (re-scoring against the product's savings,
#: measured on a 2-core AVX512-BF16 CPU: benchmarks/bench_evaluation.py)
BF16_CROSSOVER = 2**15


def _bf16_key_floor(theta: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of the largest bfloat16 numbers <= ``theta`` (float32, > 0)."""
    key = theta.to(torch.bfloat16)
    above = key.float() > theta
    key = key.view(torch.int16).clone()
    key[above] -= 1  # one bfloat16 ulp down (positive numbers order like their bits)
    return key


def _monotone(keys: torch.Tensor) -> torch.Tensor:
    """bfloat16 bit patterns (int16) <-> int16 keys ordered as the numbers are (an involution:
    a negative number's magnitude bits are flipped)."""
    return keys ^ ((keys >> 15) & 0x7FFF)


class TwoPassSearcher:
    """Exact top-``k`` inner-product search: bfloat16 candidates, float32 re-scoring (module
    doc). ``gallery``: float32 ``(N, D)`` L2-normalised rows; ``fallback``: an exact float32
    searcher over the same gallery (a ``FaissSearcher`` or ``TorchSearcher``) for what this one
    hands over; ``device``: where the products run; ``budget``: bytes of bfloat16 scores held
    at a time; ``always``: screen every search (tests), not only those where it pays."""

    #: gallery items per matrix product (its output stays in cache for the block maxima)
    chunk = 2048

    def __init__(self, gallery: np.ndarray, fallback, device=None, budget: int = 128 * 2**20,
                 max_candidates: int = 65536, always: bool = False):
        self.fallback = fallback
        self.device = torch.device(device or "cpu")
        #: NumPy for the index work on the CPU (several times torch's speed there); the torch
        #: path serves other devices (tests switch it on for the CPU)
        self.numpy = self.device.type == "cpu"
        g32 = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32))
        self.n, self.dim = g32.shape
        self.budget, self.max_candidates, self.always = int(budget), int(max_candidates), always
        gb = g32.to(torch.bfloat16)
        self.gamma = self.dim * F32_U / (1.0 - self.dim * F32_U)
        self.r_max, self.a_max = self._gallery_norms(g32, gb)
        self.g32 = g32.to(self.device)
        # zero rows pad the gallery to whole chunks: they score 0, below every usable threshold
        self.gb = torch.cat([gb, gb.new_zeros(-self.n % self.chunk, self.dim)]).to(self.device)
        #: rows answered by the fallback, and all rows (reports and tests)
        self.fallback_rows = 0
        self.rows = 0

    def _gallery_norms(self, g32: torch.Tensor, gb: torch.Tensor) -> tuple[float, float]:
        """``(R, A)``: upper bounds on the largest residual norm ``|g - g~|`` and the largest
        rounded norm ``|g~|``. A float32 number minus its bfloat16 rounding is exact in
        float32, and a float32 sum of D squares is within ``gamma_{D+1}`` (relative) of the
        exact one, which the factor ``1 + 2 gamma_D`` (applied twice) covers. Computed in
        float32 chunks: float64 copies of a 1M x 128 gallery cost 2 s and 2 GB."""
        r_max = a_max = 0.0
        for s in range(0, self.n, 65536):
            g, b = g32[s:s + 65536], gb[s:s + 65536].float()
            r_max = max(r_max, float((g - b).square().sum(1).max()))
            a_max = max(a_max, float(b.square().sum(1).max()))
        grow = 1.0 + 2.0 * self.gamma
        return math.sqrt(r_max * grow) * grow, math.sqrt(a_max * grow) * grow

    # ------------------------------------------------------------------ choices
    def handles(self, k: int) -> bool:
        """Whether a search for ``k`` is screened here (else wholly the fallback's)."""
        return self.pays(self.n, self.dim, k, self.chunk, self.always)

    @staticmethod
    def pays(n: int, dim: int, k: int, chunk: int | None = None, always: bool = False) -> bool:
        """Whether searching ``k`` neighbours among ``n`` items of ``dim`` goes two ways: a
        gallery of at least 8 chunks, ``k <= n / 8``, and (unless ``always``) ``k <= n dim /
        BF16_CROSSOVER``."""
        chunk = TwoPassSearcher.chunk if chunk is None else chunk
        if not (n >= 8 * chunk and 0 < k <= n // 8):
            return False
        return always or k * BF16_CROSSOVER <= n * dim

    def block_for(self, k: int) -> int:
        """Items per block of maxima: 64, or fewer when ``k`` needs more blocks."""
        block = 64
        while block > 4 and self.n // block < 4 * k:
            block //= 2
        return block

    def _layout(self, k: int) -> tuple[int, int]:
        """(queries per block, chunks per span): a span of the gallery at least ``4 k`` blocks
        of maxima wide (all of it when the budget allows 1024 queries), then as many queries
        as fit."""
        n_chunks = self.gb.shape[0] // self.chunk
        need = min(n_chunks, -(-4 * k * self.block_for(k) // self.chunk))
        per_query = 2 * self.chunk
        span = max(need, min(n_chunks, self.budget // (1024 * per_query)))
        queries = int(np.clip(self.budget // (span * per_query), 64, 1024))
        return queries, span

    def input_bound(self, q32: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        """``E_q`` (float64, per query): the rounding of the inputs to bfloat16 and the float32
        accumulation, with 1% slack and 1e-7 for kernels that flush subnormals."""
        q_t = qb.double().norm(dim=1)
        r_q = (q32.double() - qb.double()).norm(dim=1)
        e = q_t * self.r_max + r_q * self.a_max + r_q * self.r_max + self.gamma * q_t * self.a_max
        return 1.01 * e + 1e-7

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (float32 scores, gallery positions) per query by decreasing score."""
        k = int(min(k, self.n))
        nq = queries.shape[0]
        self.rows += nq
        if not self.handles(k):
            self.fallback_rows += nq
            return self.fallback.search(queries, k)
        scores = np.empty((nq, k), dtype=np.float32)
        idx = np.empty((nq, k), dtype=np.int64)
        step, span = self._layout(k)
        for start in range(0, nq, step):
            stop = min(start + step, nq)
            s, i, hand_over = self._search_block(queries[start:stop], k, span)
            scores[start:stop], idx[start:stop] = s, i
            if hand_over.size:
                self.fallback_rows += hand_over.size
                fs, fi = self.fallback.search(queries[start:stop][hand_over], k)
                scores[start + hand_over], idx[start + hand_over] = fs, fi
        return scores, idx

    def _search_block(self, queries: np.ndarray, k: int, span: int):
        dev = self.device
        q32 = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
        qb = q32.to(torch.bfloat16)
        nq = q32.shape[0]
        e_q = self.input_bound(q32, qb)
        block = self.block_for(k)
        per_chunk = self.chunk // block
        n_chunks = self.gb.shape[0] // self.chunk
        top = torch.full((nq, k), -32768, dtype=torch.int16, device=dev)  # monotone keys
        unusable = torch.zeros(nq, dtype=torch.bool, device=dev)
        counts = torch.zeros(nq, dtype=torch.long, device=dev)
        found = []  # (rows, positions, columns, bfloat16 keys) per span
        scores, maxima = self._buffers(span, nq, per_chunk)
        keys = scores.view(torch.int16)  # bfloat16 bit patterns: compared as int16 (> 0 only)
        for c0 in range(0, n_chunks, span):
            c1 = min(c0 + span, n_chunks)
            for c in range(c0, c1):  # products reduced to block maxima while in cache
                torch.mm(qb, self.gb[c * self.chunk:(c + 1) * self.chunk].t(),
                         out=scores[c - c0])
                torch.amax(keys[c - c0].view(nq, per_chunk, block), dim=2,
                           out=maxima[:, c - c0])
            bm = maxima[:, :c1 - c0].reshape(nq, -1)
            top = self._largest(torch.cat([top, _monotone(bm)], dim=1), k)
            theta, usable = self._threshold(top, e_q)
            unusable |= ~usable
            rows, cols, vals = self._candidates(keys[:c1 - c0], bm, theta, block, c0)
            new = torch.bincount(rows, minlength=nq)
            first = torch.cumsum(new, 0) - new  # candidates come in row order
            pos = counts.index_select(0, rows) + torch.arange(rows.numel(), device=dev) \
                - first.index_select(0, rows)
            counts += new
            found.append((rows, pos, cols, vals))
        rows, pos, cols, vals = (torch.cat(parts) for parts in zip(*found))
        hand_over = unusable | (counts < k) | (counts > self.max_candidates)
        take = ~hand_over.index_select(0, rows) & (cols < self.n)
        rows, pos, cols, vals = rows[take], pos[take], cols[take], vals[take]
        served = ~hand_over
        width = max(int(counts[served].max()) if bool(served.any()) else 0, k)
        table = torch.zeros((nq, width), dtype=torch.long, device=dev)
        table[rows, pos] = cols
        exact = self._rescore(q32, table, counts.masked_fill(hand_over, 0))
        self._check(exact[rows, pos], vals, e_q.index_select(0, rows))
        if self.numpy:
            ex, tab = exact.numpy(), table.numpy()
            at = np.argsort(-ex, axis=1)[:, :k]
            best, ids = np.take_along_axis(ex, at, 1), np.take_along_axis(tab, at, 1)
        else:
            best, at = torch.topk(exact, k, dim=1, sorted=True)
            best, ids = best.cpu().numpy(), torch.gather(table, 1, at).cpu().numpy()
        return best, ids, torch.nonzero(hand_over).flatten().cpu().numpy()

    # ------------------------------------------------------------------ pieces
    def _largest(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` largest of each row, any order (NumPy's introselect on the CPU)."""
        m = values.shape[1]
        if self.numpy:
            part = np.partition(values.numpy(), m - k, axis=1)[:, m - k:]
            return torch.from_numpy(np.ascontiguousarray(part))
        return torch.topk(values.int(), k, dim=1, sorted=False).values.short()

    def _threshold(self, top: torch.Tensor, e_q: torch.Tensor):
        """``(theta key, usable)`` per row from the k largest block maxima so far (monotone
        keys): ``beta``, their minimum, is reached by k items, whose exact scores are then >=
        ``beta - c |beta| - E``; an item can be that good only if ``o + c |o| + E >= ...``,
        i.e. ``o >= theta``. Unusable where theta <= 0 (or not k blocks seen)."""
        c = BF16_U / (1.0 - BF16_U)
        low = top.min(dim=1).values
        beta = _monotone(low).view(torch.bfloat16).double()
        theta = (beta - c * beta.abs() - 2 * e_q) / (1.0 + c)
        usable = (low > -32768) & torch.isfinite(beta) & (theta > 0)
        safe = torch.where(usable, theta, torch.ones_like(theta)).float()
        return _bf16_key_floor(safe), usable

    def _candidates(self, keys: torch.Tensor, bm: torch.Tensor, theta: torch.Tensor,
                    block: int, c0: int):
        """``(rows, columns, keys)`` of the span's items reaching their row's ``theta``, in row
        order: ``keys`` ``(chunks, nq, chunk)`` are the span's bfloat16 bit patterns, ``bm``
        ``(nq, blocks)`` their block maxima. Where few blocks reach theta only those are read;
        otherwise every score is compared."""
        nq, n_blocks = bm.shape
        per_chunk = self.chunk // block
        if not self.numpy:
            r, b = torch.nonzero(bm >= theta[:, None], as_tuple=True)
            chunk_of, block_in = b // per_chunk, b % per_chunk
            base = (chunk_of * nq + r) * self.chunk + block_in * block
            vals = keys.reshape(-1)[base[:, None] + torch.arange(block, device=keys.device)]
            which, off = torch.nonzero(vals >= theta[r][:, None], as_tuple=True)
            cols = (chunk_of + c0) * self.chunk + block_in * block
            return r[which], cols[which] + off, vals[which, off]
        k_np, th = keys.numpy(), theta.numpy()
        hits = np.flatnonzero(bm.numpy() >= th[:, None])
        if hits.size * block * 4 < k_np.size:  # few blocks: read only those
            r, b = np.divmod(hits, n_blocks)
            chunk_of, block_in = np.divmod(b, per_chunk)
            blocks = k_np.reshape(k_np.shape[0], nq, per_chunk, block)
            vals = blocks[chunk_of, r, block_in]  # (hits, block): whole blocks at once
            which, off = np.divmod(np.flatnonzero(vals >= th[r][:, None]), block)
            rows, vals = r[which], vals[which, off]
            cols = (chunk_of[which] + c0) * self.chunk + block_in[which] * block + off
        else:  # compare every score; (row, chunk, column) order
            flat = np.flatnonzero((k_np >= th[None, :, None]).transpose(1, 0, 2))
            rows, rest = np.divmod(flat, k_np.shape[0] * self.chunk)
            chunk_of, col = np.divmod(rest, self.chunk)
            vals = k_np[chunk_of, rows, col]
            cols = (chunk_of + c0) * self.chunk + col
        return torch.from_numpy(rows), torch.from_numpy(cols), torch.from_numpy(vals)

    def _rescore(self, q32: torch.Tensor, table: torch.Tensor, counts: torch.Tensor
                 ) -> torch.Tensor:
        """float32 inner products of each query with the gallery items of its row of ``table``
        (the first ``counts[i]`` entries; -inf elsewhere). On the CPU faiss computes them from
        the fallback's index (10x torch's gathers on this CPU), else torch gathers the rows."""
        nq, width = table.shape
        valid = torch.arange(width, device=table.device)[None, :] < counts[:, None]
        index = getattr(self.fallback, "index", None)
        if self.numpy and hasattr(index, "compute_distance_subset"):
            import faiss

            labels = np.ascontiguousarray(table.numpy())
            q = np.ascontiguousarray(q32.numpy())
            out = np.empty((nq, width), dtype=np.float32)
            index.compute_distance_subset(nq, faiss.swig_ptr(q), width, faiss.swig_ptr(out),
                                          faiss.swig_ptr(labels))
            exact = torch.from_numpy(out)
        else:
            exact = torch.empty((nq, width), device=table.device)
            for r0 in range(0, nq, 64):
                rows = slice(r0, r0 + 64)
                exact[rows] = torch.bmm(self.g32[table[rows]], q32[rows, :, None])[:, :, 0]
        return exact.masked_fill_(~valid, -math.inf)

    def _buffers(self, span: int, nq: int, per_chunk: int):
        """The span's bfloat16 scores and block maxima, kept between blocks and searches: a
        fresh buffer of this size costs page faults at every first touch (the products then
        ran at 60% of their rate)."""
        size, m_size = span * nq * self.chunk, nq * span * per_chunk
        if getattr(self, "_scores", None) is None or self._scores.numel() < size:
            self._scores = torch.empty(size, dtype=torch.bfloat16, device=self.device)
        if getattr(self, "_maxima", None) is None or self._maxima.numel() < m_size:
            self._maxima = torch.empty(m_size, dtype=torch.int16, device=self.device)
        return (self._scores[:size].view(span, nq, self.chunk),
                self._maxima[:m_size].view(nq, span, per_chunk))

    def _check(self, exact: torch.Tensor, keys: torch.Tensor, e_q: torch.Tensor) -> None:
        """Every re-scored candidate lies within its bound of its bfloat16 score (float32
        rounding of the re-scoring included); otherwise the kernels do not accumulate as the
        bound assumes, and no answer is given."""
        c = BF16_U / (1.0 - BF16_U)
        o = keys.view(torch.bfloat16).float()  # float32 suffices: 1e-6 covers its rounding
        slack = e_q.float() + c * o.abs() + (2 * self.gamma + 1e-6)
        if bool(((exact - o).abs() > slack).any()):
            raise RuntimeError(
                "bfloat16 scores outside their proven bound: this machine's bfloat16 matrix "
                "product does not accumulate in float32; evaluate with precision='float32'")


def check_bound(dim: int = 128, n: int = 4096, seed: int = 0, device=None) -> float:
    """The largest observed ``|exact - bfloat16 score|`` over its bound, for random unit vectors
    on this machine's own bfloat16 product (<= 1 when the bound holds)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    searcher = TwoPassSearcher(x.numpy(), fallback=None, device=device)
    q = x[: n // 4].to(searcher.device)
    qb = q.to(torch.bfloat16)
    o = torch.mm(qb, searcher.gb[:n].t()).double()
    exact = q.double() @ searcher.g32.double().t()
    e_q = searcher.input_bound(q, qb)[:, None]
    c = BF16_U / (1.0 - BF16_U)
    return float(((exact - o).abs() / (e_q + c * o.abs())).max())
