"""Tests of nirdml.evaluation against a brute-force numpy reference and pytorch-metric-learning."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from conftest import need
from nirdml.errors import ConfigError, InputError
from nirdml.evaluation import LoneQueryWarning, evaluate, load_npz, normalize_embeddings
from nirdml.evaluation.clustering import kmeans_faiss, nmi, pair_f1
from nirdml.evaluation.knn import knn_blocks

# faiss is a hard dependency of nirdml: both backends are always tested (a broken faiss import
# fails here instead of hiding behind a skip)
BACKENDS = ["torch", "faiss"]
ALL_METRICS = [
    "recall", "precision", "recall@3", "precision@5", "map@r", "r_precision", "map@1000",
    "nmi", "ami", "f1",
]
RANKING = ["recall", "precision", "recall@3", "precision@5", "map@r", "r_precision", "map@1000"]
TOL = 1e-6


# ----------------------------------------------------------------------------- test data
def make_data(seed: int = 0, n_classes: int = 24, d: int = 12):
    """Clustered data with singleton classes, duplicate rows and exactly tied scores."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 2, 3, 4, 6, 9, 13], size=n_classes)
    y = np.repeat(np.arange(n_classes), sizes)
    centers = rng.standard_normal((n_classes, d))
    x = centers[y] + 0.9 * rng.standard_normal((y.size, d))
    n = y.size
    # Basis vectors (any positive scale): scores among them are exactly 0 or 1.
    basis = rng.choice(n, size=n // 5, replace=False)
    x[basis] = 0.0
    x[basis, rng.integers(0, 3, size=basis.size)] = rng.uniform(0.5, 3.0, size=basis.size)
    # Exact duplicates, some with the same label, some with another one.
    src = rng.choice(n, size=n // 8, replace=False)
    dst = rng.choice(n, size=n // 8, replace=False)
    x[dst] = x[src]
    perm = rng.permutation(n)
    return x[perm].astype(np.float32), y[perm]


def make_tie_heavy(n: int = 90, seed: int = 1):
    """Only 3 distinct directions: every query has dozens of exact ties at its cut-off."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 6), dtype=np.float32)
    x[np.arange(n), rng.integers(0, 3, size=n)] = 1.0
    return x, rng.integers(0, 7, size=n)


# ----------------------------------------------------------------------------- reference
def ref_ranking(x, y, q_mask=None, g_mask=None):
    """Brute force: per query, the full neighbour order by (-float64 score, gallery index)."""
    xn = normalize_embeddings(x)
    n = len(y)
    q_mask = np.ones(n, bool) if q_mask is None else q_mask
    g_mask = np.ones(n, bool) if g_mask is None else g_mask
    g_idx = np.flatnonzero(g_mask)
    out = []
    for qi in np.flatnonzero(q_mask):
        cand = g_idx[g_idx != qi]
        positions = np.flatnonzero(g_idx != qi)
        s = np.sum(xn[qi].astype(np.float64)[None, :] * xn[cand].astype(np.float64), axis=1)
        order = np.lexsort((positions, -s))
        out.append((qi, positions[order], y[cand][order] == y[qi], int(np.sum(y[g_idx] == y[qi]))))
    return out


def ref_metrics(x, y, ks=(1, 2, 4, 8), q_mask=None, g_mask=None):
    """The ranking metrics of ``evaluate`` computed query by query from their definitions."""
    recall_ks = sorted(set(ks) | {3})
    prec_ks = sorted(set(ks) | {5})
    rows = [r for r in ref_ranking(x, y, q_mask, g_mask)]
    sums = {f"recall@{k}": 0.0 for k in recall_ks}
    sums.update({f"precision@{k}": 0.0 for k in prec_ks})
    sums.update({"map@r": 0.0, "r_precision": 0.0, "map@1000": 0.0})
    used = lone = 0
    for _, _, rel, class_size in rows:
        r = int(rel.sum())
        if r == 0:
            lone += 1
            continue
        used += 1
        for k in recall_ks:
            sums[f"recall@{k}"] += float(rel[:k].any())
        for k in prec_ks:
            sums[f"precision@{k}"] += rel[:k].sum() / k
        sums["r_precision"] += rel[:r].sum() / r
        hits, ap_r, ap_1000 = 0, 0.0, 0.0
        for j, is_rel in enumerate(rel[:1000], start=1):
            if is_rel:
                hits += 1
                ap_1000 += hits / j
                if j <= r:
                    ap_r += hits / j
        sums["map@r"] += ap_r / r
        sums["map@1000"] += ap_1000 / class_size
    out = {k: (v / used if used else float("nan")) for k, v in sums.items()}
    out["lone_queries"], out["num_queries"] = lone, used
    return out


def assert_close(ours: dict, ref: dict):
    for key, value in ref.items():
        assert key in ours, key
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, abs=TOL), key


def masks(n, seed, overlap: bool):
    rng = np.random.default_rng(seed)
    if not overlap:
        q = rng.random(n) < 0.5
        return q, ~q
    u = rng.random(n)
    return u < 0.6, u > 0.3  # [0.3, 0.6) in both; nobody is in neither


# ----------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_all_vs_all_matches_brute_force(backend, seed):
    x, y = make_data(seed)
    ours = evaluate(x, y, metrics=RANKING, backend=backend, block_size=17)
    ref = ref_metrics(x, y)
    assert set(ours) == set(ref)
    assert_close(ours, ref)
    assert ours["lone_queries"] > 0  # singleton classes are there


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bound_blocks_give_same_result(backend, monkeypatch):
    import nirdml.evaluation.core as core

    blocks = []
    real = core.knn_blocks

    def recording(*args, **kwargs):
        for start, stop, table in real(*args, **kwargs):
            blocks.append(stop - start)
            yield start, stop, table

    monkeypatch.setattr(core, "knn_blocks", recording)
    x, y = make_data(3)
    small = evaluate(x, y, metrics=RANKING, backend=backend, max_memory_mb=0.5)
    small_blocks, blocks[:] = list(blocks), []
    whole = evaluate(x, y, metrics=RANKING, backend=backend, block_size=len(y))
    assert small == pytest.approx(whole, abs=1e-12)
    assert len(blocks) == 1  # one block of every (non-lone) query
    assert len(small_blocks) > 1 and sum(small_blocks) == blocks[0]  # the bound split them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overlap", [False, True])
def test_query_gallery_split_matches_brute_force(backend, overlap):
    x, y = make_data(2)
    q, g = masks(len(y), 3, overlap)
    ours = evaluate(x, y, metrics=RANKING, query_mask=q, gallery_mask=g, backend=backend)
    assert_close(ours, ref_metrics(x, y, q_mask=q, g_mask=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_heavy_data_and_sop_ks(backend):
    x, y = make_tie_heavy()
    ks = (1, 10, 100, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k=100, 1000 exceed the 89 neighbours
        ours = evaluate(x, y, metrics=RANKING, recall_ks=ks, backend=backend, block_size=8)
    assert_close(ours, ref_metrics(x, y, ks=ks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_gallery(backend):
    rng = np.random.default_rng(19)
    x, y = rng.standard_normal((7, 5)), np.array([0, 0, 1, 1, 1, 2, 2])
    with pytest.warns(RuntimeWarning, match="exceeds"):
        ours = evaluate(x, y, metrics=RANKING, recall_ks=(1, 6, 50), backend=backend)
    assert_close(ours, ref_metrics(x, y, ks=(1, 6, 50)))
    assert ours["recall@50"] == 1.0


@pytest.mark.parametrize("data", ["mixed", "ties"])
def test_neighbour_order_is_canonical_on_both_backends(data):
    x, y = make_data(4) if data == "mixed" else make_tie_heavy()
    xn = normalize_embeddings(x)
    q, g = masks(len(y), 5, overlap=True)
    g_idx = np.flatnonzero(g)
    g_pos = np.full(len(y), -1)
    g_pos[g_idx] = np.arange(g_idx.size)
    q_idx = np.flatnonzero(q)
    k = 9
    ref = [row[1][:k] for row in ref_ranking(x, y, q, g)]
    for backend in BACKENDS:
        tables = [
            t for _, _, t in knn_blocks(xn[q_idx], xn[g_idx], g_pos[q_idx], k, backend=backend,
                                        block_size=5)
        ]
        got = np.concatenate(tables)
        for i, expected in enumerate(ref):
            np.testing.assert_array_equal(got[i, : expected.size], expected)


def test_backends_agree_exactly():
    x, y = make_data(6)
    fixed = kmeans_faiss(normalize_embeddings(x), len(np.unique(y)), seed=0)
    res = [
        evaluate(x, y, metrics=ALL_METRICS, backend=b, cluster_fn=lambda *_: fixed)
        for b in BACKENDS
    ]
    assert res[0] == res[1]


def test_torch_tensors_and_key_order():
    torch = pytest.importorskip("torch")
    x, y = make_data(7)
    x_before = x.copy()
    ours = evaluate(torch.from_numpy(x), torch.from_numpy(y), metrics=ALL_METRICS)
    np.testing.assert_array_equal(x, x_before)  # the caller's array is not normalised in place
    assert list(ours) == [
        "recall@1", "recall@2", "recall@3", "recall@4", "recall@8",
        "precision@1", "precision@2", "precision@4", "precision@5", "precision@8",
        "map@r", "r_precision", "map@1000", "nmi", "ami", "f1", "lone_queries", "num_queries",
    ]
    assert all(0.0 <= v <= 1.0 for k, v in ours.items() if k not in ("lone_queries", "num_queries"))
    assert isinstance(ours["num_queries"], int)
    assert ours == evaluate(x, y, metrics=ALL_METRICS)  # numpy input, same seeded k-means


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def toy_metrics():
    """Two new ranking metrics, one registry entry each (removed again after the test)."""
    from nirdml.evaluation import metrics

    saved = dict(metrics.RANKING_METRICS)

    @metrics.ranking_metric("hits", width="k")
    def hits(block, k):  # relevant among the first k / min(k, R)
        return float(np.sum(block.rel[:, :k].sum(axis=1) / np.minimum(k, block.r)))

    @metrics.ranking_metric("mrr", width=1000)
    def mrr(block):  # 1 / rank of the first relevant neighbour within 1000, 0 when none
        rel = block.rel[:, :1000]
        return float(np.sum(np.where(rel.any(axis=1), 1.0 / (rel.argmax(axis=1) + 1), 0.0)))

    yield
    metrics.RANKING_METRICS.clear()
    metrics.RANKING_METRICS.update(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_ranking_metric_is_one_registry_entry(backend, toy_metrics):
    x, y = make_data(0)
    q, g = masks(len(y), 3, overlap=True)
    ours = evaluate(x, y, metrics=["mrr", "hits", "hits@3", "recall@1", "nmi"], query_mask=q,
                    gallery_mask=g, recall_ks=(1, 5), backend=backend, block_size=17)
    assert list(ours) == ["recall@1", "hits@1", "hits@3", "hits@5", "mrr", "nmi",
                          "lone_queries", "num_queries"]
    sums, used = {"hits@1": 0.0, "hits@3": 0.0, "hits@5": 0.0, "mrr": 0.0}, 0
    for _, _, rel, _ in ref_ranking(x, y, q, g):
        r = int(rel.sum())
        if r == 0:
            continue
        used += 1
        for k in (1, 3, 5):
            sums[f"hits@{k}"] += rel[:k].sum() / min(k, r)
        first = np.flatnonzero(rel[:1000])
        sums["mrr"] += 1.0 / (first[0] + 1) if first.size else 0.0
    assert used == ours["num_queries"]
    assert_close(ours, {k: v / used for k, v in sums.items()})
    with pytest.raises(ConfigError, match="map@1000, hits, hits@K, mrr, nmi, ami, f1"):
        evaluate(x, y, metrics=["hit"])


def test_headline_metrics():
    from nirdml.evaluation import HEADLINE_METRICS, headline

    assert HEADLINE_METRICS == ("recall@K", "map@r", "r_precision", "map@1000", "nmi")
    res = evaluate(*make_data(5), metrics=ALL_METRICS, recall_ks=(1, 10))
    assert list(headline(dict(res, dataset="x", selected_epoch=3))) == [
        "recall@1", "recall@3", "recall@10", "map@r", "r_precision", "map@1000", "nmi"]
    assert list(headline(res, brief=True)) == ["recall@1", "recall@10", "map@r", "nmi"]


# ----------------------------------------------------------------------------- vs PML
def _pml_calc():
    return need("pytorch_metric_learning.utils.accuracy_calculator")


def _pml_knn(query, k, reference, ref_includes_query):
    """A k-NN for PML with our canonical order (float64 score, then lower index)."""
    import torch

    q = query.cpu().numpy().astype(np.float64)
    g = reference.cpu().numpy().astype(np.float64)
    d_out, i_out = [], []
    for i in range(q.shape[0]):
        cand = np.arange(g.shape[0])
        if ref_includes_query:
            cand = cand[cand != i]
        s = np.sum(q[i][None, :] * g[cand], axis=1)
        order = cand[np.lexsort((cand, -s))][:k]
        i_out.append(order)
        d_out.append(np.sum(q[i][None, :] * g[order], axis=1))
    return torch.tensor(np.array(d_out)), torch.tensor(np.array(i_out))


def _pml(fixed=None):
    import torch

    return _pml_calc().AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI", "AMI"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=_pml_knn,
        kmeans_func=(lambda emb, n: torch.from_numpy(fixed)) if fixed is not None else None,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 8])
def test_matches_pml_all_vs_all(backend, seed):
    x, y = make_data(seed)
    xn = normalize_embeddings(x)
    fixed = kmeans_faiss(xn, len(np.unique(y)), seed=0)
    ours = evaluate(x, y, metrics=["recall@1", "map@r", "r_precision", "nmi", "ami"],
                    backend=backend, cluster_fn=lambda *_: fixed)
    pml = _pml(fixed).get_accuracy(xn, y)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=TOL)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=TOL)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=TOL)
    assert ours["nmi"] == pytest.approx(pml["NMI"], abs=TOL)
    assert ours["ami"] == pytest.approx(pml["AMI"], abs=TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pml_query_gallery(backend):
    x, y = make_data(9)
    xn = normalize_embeddings(x)
    q, g = masks(len(y), 10, overlap=False)
    ours = evaluate(x, y, metrics=["recall@1", "map@r", "r_precision"], query_mask=q,
                    gallery_mask=g, backend=backend)
    pml = _pml().get_accuracy(xn[q], y[q], xn[g], y[g], ref_includes_query=False,
                              include=("precision_at_1", "r_precision",
                                       "mean_average_precision_at_r"))
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=TOL)
    assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=TOL)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=TOL)
    assert ours["lone_queries"] > 0


def test_matches_pml_default_faiss_without_ties():
    """PML's own faiss k-NN (L2 on unit vectors) gives the same numbers when nothing ties."""
    import torch

    rng = np.random.default_rng(11)
    y = rng.integers(0, 30, size=300)
    x = normalize_embeddings(rng.standard_normal((30, 16))[y] + rng.standard_normal((300, 16)))
    ours = evaluate(x, y, metrics=["recall@1", "map@r", "r_precision"])
    pml = _pml_calc().AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count", device=torch.device("cpu"),
    ).get_accuracy(x, y)
    assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=TOL)
    assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=TOL)


# ----------------------------------------------------------------------------- clustering
def test_clustering_scores_match_references():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(12)
    for n, a, b in [(200, 7, 9), (50, 50, 3), (40, 1, 5), (30, 30, 30)]:
        t, p = rng.integers(0, a, size=n), rng.integers(0, b, size=n)
        assert nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p), abs=1e-10)
        same_t = t[:, None] == t[None, :]
        same_p = p[:, None] == p[None, :]
        iu = np.triu_indices(n, 1)
        tp = np.sum(same_t[iu] & same_p[iu])
        denom = same_t[iu].sum() + same_p[iu].sum()
        assert pair_f1(t, p) == pytest.approx(2 * tp / denom if denom else 1.0, abs=1e-12)
    assert nmi([3, 3, 3], [1, 1, 1]) == 1.0
    assert pair_f1([0, 1, 2], [5, 6, 7]) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_is_seeded_and_uses_union_of_sets(backend):
    x, y = make_data(13)
    q, g = masks(len(y), 14, overlap=False)
    seen = {}

    def spy(xs, k, seed):
        seen.update(n=xs.shape[0], k=k, seed=seed)
        return np.zeros(xs.shape[0], dtype=int)

    evaluate(x, y, metrics=["nmi"], query_mask=q, gallery_mask=g, cluster_fn=spy, kmeans_seed=5)
    assert seen == {"n": len(y), "k": len(np.unique(y)), "seed": 5}
    a = evaluate(x, y, metrics=["nmi", "f1"], backend=backend, kmeans_seed=3)
    b = evaluate(x, y, metrics=["nmi", "f1"], backend=backend, kmeans_seed=3)
    assert a == b and 0.0 < a["nmi"] <= 1.0


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors(tmp_path):
    x, y = make_data(15)
    bad = x.copy()
    bad[3, 0], bad[7, 1] = np.nan, np.inf
    with pytest.raises(InputError, match=r"NaN or inf in 2 of"):
        evaluate(bad, y)
    with pytest.raises(InputError, match="labels has"):
        evaluate(x, y[:-1])
    with pytest.raises(InputError, match="2-D"):
        evaluate(x[0], y[:1])
    with pytest.raises(InputError, match="no rows"):
        evaluate(np.zeros((0, 4), np.float32), np.zeros(0, int))
    with pytest.raises(InputError, match="query set is empty"):
        evaluate(x, y, query_mask=np.zeros(len(y), bool))
    with pytest.raises(ConfigError, match="unknown metric"):
        evaluate(x, y, metrics=["mapr"])
    with pytest.raises(ConfigError, match="positive integer"):
        evaluate(x, y, metrics=["recall@0"])
    path = tmp_path / "bad.npz"
    np.savez(path, embeddings=x)
    with pytest.raises(InputError, match=r"lacks key\(s\) \['labels'\]"):
        load_npz(path)


def test_one_rule_for_masks_and_labels_in_evaluate_embeddings_and_analysis():
    """``nirdml.embeddings``' checks, shared: masks are booleans or 0/1 numbers of one entry
    per row; a query or gallery set that selects nothing is refused where it is used; labels
    are integer class ids (whole floats and an (N, 1) column accepted)."""
    from nirdml.analysis import structure_report
    from nirdml.embeddings import Embeddings

    x, y = make_data(21)
    q, g = masks(len(y), 22, overlap=True)
    as_bool = evaluate(x, y, metrics=["recall@1", "map@r"], query_mask=q, gallery_mask=g)
    as_int = evaluate(x, y, metrics=["recall@1", "map@r"], query_mask=q.astype(np.int8),
                      gallery_mask=g.astype(np.int64))
    assert as_int == as_bool
    as_float = evaluate(x, y, metrics=["recall@1", "map@r"], query_mask=q.astype(np.float32),
                        gallery_mask=g.astype(float))
    assert as_float == as_bool
    stored = Embeddings(x, y, q.astype(np.uint8), g.astype(int))
    assert stored.is_query.dtype == bool and (stored.is_query == q).all()

    bad_masks = {"other int64 values": np.where(q, 2, 0), "other float64 values": q * 0.5,
                 "<U1 values": np.where(q, "y", "n"),
                 "entries but embeddings has": q[:-1], "1-D": np.stack([q, q], axis=1)}
    for message, bad in bad_masks.items():
        with pytest.raises(InputError, match=f"gallery_mask .*{message}"):
            evaluate(x, y, query_mask=q, gallery_mask=bad)
        with pytest.raises(InputError, match=f"is_gallery .*{message}"):
            Embeddings(x, y, q, bad)

    nothing = np.zeros(len(y), bool)
    with pytest.raises(InputError, match="gallery_mask selects no samples: the gallery set"):
        evaluate(x, y, gallery_mask=nothing)
    with pytest.raises(InputError, match="query_mask selects no samples: the query set"):
        evaluate(x, y, query_mask=nothing.astype(int))
    shard = Embeddings(x, y, nothing, ~nothing)  # a container may hold an empty query set
    with pytest.raises(InputError, match="query_mask selects no samples"):
        evaluate(shard.embeddings, shard.labels, query_mask=shard.is_query)

    column = y[:, None]
    assert evaluate(x, column, metrics=["recall@1"]) == evaluate(x, y, metrics=["recall@1"])
    assert Embeddings(x, column).labels.shape == y.shape
    assert structure_report(x, column) == structure_report(x, y)
    assert evaluate(x, y.astype(float), metrics=["recall@1"]) == evaluate(x, y,
                                                                          metrics=["recall@1"])
    halves = y + 0.5
    for check in (lambda: evaluate(x, halves), lambda: Embeddings(x, halves),
                  lambda: structure_report(x, halves)):
        with pytest.raises(InputError, match=r"labels must be integer class ids \(found "
                                             r"non-integer floats\)"):
            check()
    for check in (lambda: evaluate(x, y[:-1]), lambda: Embeddings(x, y[:-1]),
                  lambda: structure_report(x, y[:-1])):
        with pytest.raises(InputError, match=f"labels has {len(y) - 1} entries but embeddings "
                                             f"has {len(y)} rows"):
            check()


def test_all_lone_queries_warn_and_give_nan():
    x = np.random.default_rng(16).standard_normal((10, 4))
    with pytest.warns(LoneQueryWarning):
        res = evaluate(x, np.arange(10), metrics=["recall", "map@r"])
    assert res["lone_queries"] == 10 and res["num_queries"] == 0
    assert math.isnan(res["recall@1"]) and math.isnan(res["map@r"])


# ----------------------------------------------------------------------------- CLI
def test_cli_evaluate_writes_table_and_json(tmp_path, capsys):
    from nirdml.cli import main

    x, y = make_data(17)
    q, g = masks(len(y), 18, overlap=False)
    path = tmp_path / "emb.npz"
    np.savez(path, embeddings=x, labels=y, is_query=q, is_gallery=g)
    out = tmp_path / "m.json"
    rc = main(["evaluate", "--embeddings", str(path), "--metrics", "recall", "map@r", "f1",
               "--recall-ks", "1", "5", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "recall@5" in text and "lone_queries" in text
    got = json.loads(out.read_text())
    expected = evaluate(x, y, metrics=["recall", "map@r", "f1"], query_mask=q, gallery_mask=g,
                        recall_ks=(1, 5), fnmr_at_fmr=(1e-2, 1e-3))
    assert list(got) == list(expected) and "fnmr@fmr=0.001" in text
    assert got == pytest.approx(expected, abs=1e-12)
    # re-ranked, without the verification rates
    rc = main(["evaluate", "--embeddings", str(path), "--metrics", "map@r", "--rerank",
               "dba:n=3", "--fnmr-at-fmr", "--json", str(out)])
    got = json.loads(out.read_text())
    assert got == pytest.approx(evaluate(x, y, metrics=["map@r"], query_mask=q, gallery_mask=g,
                                         rerank="dba:n=3"), abs=1e-12)
    assert rc == 0 and "fnmr@fmr=0.01" not in got
    assert main(["evaluate", "--embeddings", str(path), "--rerank", "dba:m=3"]) == 2
    assert "re-ranking 'dba' takes n, alpha" in capsys.readouterr().err

    np.savez(path, embeddings=x)
    assert main(["evaluate", "--embeddings", str(path)]) == 2
    assert "lacks key" in capsys.readouterr().err
    assert main(["evaluate"]) == 2
    assert "--embeddings" in capsys.readouterr().err


def test_cli_default_metrics_match_library():
    from nirdml.commands import evaluate as command
    from nirdml.evaluation import DEFAULT_METRICS

    assert tuple(command.DEFAULT_METRICS) == DEFAULT_METRICS


@pytest.mark.parametrize("spread", [1e-8, 3e-3], ids=["identical", "chained"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_embeddings_settle_without_an_all_pairs_tie_resolution(backend, spread,
                                                                         monkeypatch):
    """A collapsed model (every embedding equal within float32 precision) ties every query with
    the whole gallery. Its ties are broken by index among a bounded number of retrieved
    neighbours, with a warning, instead of resolving N x N exact scores (which took hours on a
    13k collapsed Omniglot test split); normal data never takes that path. Fully collapsed
    embeddings (identical rows) are refused by ``evaluate`` (no metric means anything there);
    the neighbour search itself still bounds its work on them."""
    from nirdml.evaluation import knn, ties

    rng = np.random.default_rng(0)
    n = 6000
    # identical: every score equal in float32; chained: near-collapsed, each score within
    # float32 tolerance of the next over hundreds of neighbours (chains longer than
    # MAX_EXACT_RUN), though not all of a query's neighbours are tied
    x = np.ones((n, 8), np.float32) + rng.standard_normal((n, 8)).astype(np.float32) * spread
    y = np.repeat(np.arange(300), 20)
    calls = []
    exact = ties.exact_scores
    monkeypatch.setattr(ties, "exact_scores", lambda *a, **k: calls.append(len(a[1])) or exact(
        *a, **k))
    if spread < 1e-7:  # identical in float32: evaluate refuses it, the search stays bounded
        with pytest.raises(InputError, match="collapsed"):
            evaluate(x, y, metrics=["recall@1", "map@r"], backend=backend)
        unit = normalize_embeddings(x)
        with pytest.warns(knn.DegenerateTiesWarning, match="collapsed"):
            table = np.concatenate([t for _, _, t in knn_blocks(
                unit, unit, np.arange(n), 20, backend=backend, query_labels=y,
                gallery_labels=y)])
        assert sum(calls) < n * n / 10  # no all-pairs exact scores
        assert (y[table[:, 0]] == y).mean() < 0.05
        return
    with pytest.warns(knn.DegenerateTiesWarning, match="collapsed"):
        res = evaluate(x, y, metrics=["recall@1", "map@r"], backend=backend)
    assert sum(calls) < n * n / 10  # no all-pairs exact scores
    assert res["recall@1"] < 0.05 and res["num_queries"] == n
    with warnings.catch_warnings():
        warnings.simplefilter("error", knn.DegenerateTiesWarning)
        evaluate(*make_data(4), metrics=RANKING, backend=backend)  # ordinary data: no warning


def test_auto_backend_is_torch_on_a_gpu(monkeypatch):
    import torch

    from nirdml.evaluation.knn import resolve_backend

    assert resolve_backend("auto", device="cpu") == "faiss"  # the CPU: faiss
    assert resolve_backend("auto", device="cuda:0") == "torch"  # blockwise matmul + top-k
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto") == "torch"  # no device given: the GPU when present
    assert resolve_backend("faiss") == "faiss"  # an explicit choice stands
