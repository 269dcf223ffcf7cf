"""The two-pass exact search (bfloat16 candidates, float32 re-scoring): its bound holds on this
machine, and it returns what the float32 search returns -- neighbour tables and metrics --
on clustered data, exact duplicates, near-collapsed rows and queries outside the gallery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nirdml.evaluation import evaluate, knn
from nirdml.evaluation.knn import FaissSearcher, TorchSearcher, knn_blocks, score_tolerance
from nirdml.evaluation.twopass import TwoPassSearcher, check_bound


def clustered(n: int, dim: int, classes: int, seed: int = 0, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim))
    labels = rng.integers(0, classes, n)
    x = centres[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.fixture
def small_chunks(monkeypatch):
    """Two-pass on small data: 256-item chunks, every k screened, on any CPU."""
    from nirdml.evaluation import twopass

    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    monkeypatch.setattr(twopass, "BF16_CROSSOVER", 1)
    monkeypatch.setattr(knn, "bf16_native", lambda device=None: True)
    real = TwoPassSearcher.__init__
    made = []

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(TwoPassSearcher, "__init__", init)
    return made


def test_the_bound_holds_for_this_machines_bfloat16_product():
    assert check_bound(dim=128) <= 1.0
    assert check_bound(dim=512, n=2048, seed=1) <= 1.0


def tables(x_q, x_g, self_pos, k, searcher, labels=None):
    q_l, g_l = (None, None) if labels is None else labels
    return np.concatenate([t for _, _, t in knn_blocks(
        x_q, x_g, self_pos, k, searcher=searcher, query_labels=q_l, gallery_labels=g_l)])


@pytest.mark.parametrize("k", [1, 7, 40, 300])
def test_neighbour_tables_equal_the_float32_search(k, monkeypatch):
    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    x, _ = clustered(6000, 32, 300)
    # exact duplicates: tied scores must be ordered as the float32 search orders them
    x[100:110] = x[0]
    self_pos = np.arange(x.shape[0])
    exact = FaissSearcher(x)
    two = TwoPassSearcher(x, exact, always=True)
    want = tables(x, x, self_pos, k, exact)
    got = tables(x, x, self_pos, k, two)
    np.testing.assert_array_equal(got, want)
    assert two.rows > 0 and two.fallback_rows < two.rows / 10  # screened, not handed over


@pytest.mark.parametrize("k", [5, 60])
def test_every_item_of_the_top_k_is_found_where_bfloat16_cannot_tell_them_apart(k, monkeypatch):
    """Tight clusters: hundreds of items within bfloat16's error of each query's k-th score.
    Scores returned, position by position, equal the float32 search's (a missed item would
    leave a lower score in its place)."""
    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    x, _ = clustered(8192, 64, 16, seed=5, noise=0.05)
    exact = FaissSearcher(x)
    two = TwoPassSearcher(x, exact, always=True)
    s1, _ = exact.search(x[:300], k)
    s2, _ = two.search(x[:300], k)
    assert two.fallback_rows == 0
    np.testing.assert_allclose(s2, s1, rtol=0, atol=score_tolerance(64))


def test_queries_outside_the_gallery_and_the_torch_path(monkeypatch):
    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    x, _ = clustered(5000, 24, 200, seed=1)
    q, g = x[:700], x[700:]
    self_pos = np.full(q.shape[0], -1)
    exact = TorchSearcher(g, device="cpu")
    two = TwoPassSearcher(g, exact, always=True)
    two.numpy = False  # the torch code that serves GPUs, run on the CPU
    want = tables(q, g, self_pos, 25, exact)
    np.testing.assert_array_equal(tables(q, g, self_pos, 25, two), want)
    assert two.fallback_rows < two.rows


def test_rows_it_cannot_screen_go_to_the_float32_search(monkeypatch):
    """Queries opposite to every gallery item have no positive threshold; a near-collapsed
    gallery has more candidates than allowed: both are answered by the fallback, exactly."""
    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    rng = np.random.default_rng(2)
    g = np.abs(rng.standard_normal((4096, 16))).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = -g[:50]
    exact = FaissSearcher(g)
    two = TwoPassSearcher(g, exact, always=True, max_candidates=64)
    s1, i1 = exact.search(q, 10)
    s2, i2 = two.search(q, 10)
    assert two.fallback_rows == 50
    np.testing.assert_array_equal(i1, i2)
    collapsed = np.tile(g[:1], (4096, 1)) + 1e-6 * rng.standard_normal((4096, 16))
    collapsed = (collapsed / np.linalg.norm(collapsed, axis=1, keepdims=True)).astype(np.float32)
    exact = FaissSearcher(collapsed)
    two = TwoPassSearcher(collapsed, exact, always=True, max_candidates=64)
    two.search(collapsed[:20], 5)
    assert two.fallback_rows == 20


def test_a_product_outside_the_bound_raises_instead_of_answering(monkeypatch):
    monkeypatch.setattr(TwoPassSearcher, "chunk", 256)
    x, _ = clustered(4096, 32, 100, seed=3)
    two = TwoPassSearcher(x, FaissSearcher(x), always=True)
    monkeypatch.setattr(two, "input_bound", lambda q32, qb: torch.zeros(q32.shape[0],
                                                                         dtype=torch.float64))
    with pytest.raises(RuntimeError, match="outside their proven bound"):
        two.search(x[:64], 10)


@pytest.mark.parametrize("case", ["all", "split", "ties"])
def test_metrics_equal_the_float32_evaluation(case, small_chunks):
    x, y = clustered(10000, 32, 800, seed=4, noise=0.8)
    kwargs = {"metrics": ["recall", "map@r", "r_precision", "map@1000"],
              "recall_ks": (1, 2, 10, 100)}
    if case == "split":
        q = np.zeros(x.shape[0], dtype=bool)
        q[::3] = True
        kwargs.update(query_mask=q, gallery_mask=~q, metrics=["recall", "map@r"])
    if case == "ties":  # scores that tie in float32 but not in float64
        x[1::7] = x[0::7][: x[1::7].shape[0]]
        x[2::11] = np.round(x[2::11], 2)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = evaluate(x, y, precision="float32", **kwargs)
    assert not small_chunks
    got = evaluate(x, y, precision="auto", **kwargs)
    assert got == want
    served = sum(s.rows - s.fallback_rows for s in small_chunks)
    assert served >= 0.9 * got["num_queries"]  # the two passes answered (nearly) every query


def test_precision_is_checked():
    from nirdml.errors import ConfigError

    x, y = clustered(50, 8, 5)
    with pytest.raises(ConfigError, match="unknown precision 'bf16'"):
        evaluate(x, y, precision="bf16")
    assert score_tolerance(32) > 0  # the tie rule both searches share


def test_the_two_passes_are_used_only_where_they_pay(monkeypatch):
    """On native-bfloat16 hardware: small k over a large gallery goes two ways; k = 1000 over
    60k x 128 (re-scoring 1.3 k candidates a query costs more than bfloat16 saves), a small
    gallery, or precision="float32" stay on one float32 pass."""
    monkeypatch.setattr(knn, "bf16_native", lambda device=None: True)
    x, _ = clustered(20000, 128, 50)
    assert isinstance(knn.make_searcher(x, "faiss", k=20), TwoPassSearcher)
    assert TwoPassSearcher.pays(60502, 128, 200) and not TwoPassSearcher.pays(60502, 128, 1040)
    assert isinstance(knn.make_searcher(x, "faiss", k=1040), FaissSearcher)
    assert isinstance(knn.make_searcher(x[:4000], "faiss", k=20), FaissSearcher)
    assert isinstance(knn.make_searcher(x, "faiss", k=20, precision="float32"), FaissSearcher)
    monkeypatch.setattr(knn, "bf16_native", lambda device=None: False)
    assert isinstance(knn.make_searcher(x, "faiss", k=20), FaissSearcher)
