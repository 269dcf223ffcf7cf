"""Re-ranking and FNMR@FMR against dense NumPy oracles written from the papers' definitions."""

from __future__ import annotations

import numpy as np
import pytest

from nirdml.errors import ConfigError
from nirdml.evaluation import evaluate
from nirdml.evaluation.rerank import parse_rerank, rerank
from nirdml.evaluation.verification import fit_threshold, fnmr_at_fmr


def _data(seed=0, classes=12, per=6, dim=8, noise=0.8):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per)
    x = rng.normal(size=(classes, dim))[y] + noise * rng.normal(size=(y.size, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _ranked(scores, own):
    """Dense oracle: gallery order by decreasing score, each query's own item removed."""
    s = scores.astype(np.float64).copy()
    for q, p in enumerate(own):
        if p >= 0:
            s[q, p] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")


def _expand_dense(x, g, own, n, alpha):
    ids = _ranked(x @ g.T, own)[:, :n]
    w = np.maximum(np.take_along_axis(x @ g.T, ids, 1), 0) ** alpha
    out = x + (w[:, :, None] * g[ids]).sum(1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("n,alpha", [(2, 1.0), (3, 3.0)])  # n=1 makes mutual pairs tie
def test_alpha_qe_and_dba_equal_dense_oracles(n, alpha):
    x, _ = _data()
    own = np.arange(x.shape[0])
    depth = x.shape[0] - 1
    q2 = _expand_dense(x, x, own, n, alpha)
    ids, _ = rerank("alpha_qe", x, x, depth, own, n=n, alpha=alpha)
    np.testing.assert_array_equal(ids, _ranked(q2 @ x.T, own)[:, :depth])
    g2 = _expand_dense(x, x, own, n, alpha)  # every query is a gallery item: its own row
    ids, _ = rerank("dba", x, x, depth, own, n=n, alpha=alpha)
    np.testing.assert_array_equal(ids, _ranked(g2 @ g2.T, own)[:, :depth])
    # outside queries: alpha-QE expands them, DBA leaves them as they are
    q, g = x[:10], x[10:]
    none = np.full(10, -1)
    ids, _ = rerank("dba", q, g, 20, none, n=n, alpha=alpha)
    gd = _expand_dense(g, g, np.arange(g.shape[0]), n, alpha)
    np.testing.assert_array_equal(ids, _ranked(q @ gd.T, none)[:, :20])


def _k_reciprocal_dense(x, k1, k2, lam):
    """Zhong et al. 2017 on one set, dense, loops: original distance (1 - cos) / 2."""
    m = x.shape[0]
    d = (1.0 - x.astype(np.float64) @ x.T.astype(np.float64)) / 2.0
    order = np.argsort(d, axis=1, kind="stable")

    def recip(p, k):
        return [c for c in order[p, :k + 1] if p in order[c, :k + 1]]

    v = np.zeros((m, m))
    for p in range(m):
        r = recip(p, k1)
        expanded = set(r)
        for c in r:
            rc = recip(c, int(round(k1 / 2)))
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        w = np.exp(-d[p, idx])
        v[p, idx] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[order[p, :k2]].mean(0) for p in range(m)])
    jac = np.zeros((m, m))
    for p in range(m):
        mins = np.minimum(v[p][None, :], v).sum(1)
        maxs = np.maximum(v[p][None, :], v).sum(1)
        jac[p] = 1.0 - mins / maxs
    return (1 - lam) * jac + lam * d


@pytest.mark.parametrize("k1,k2,lam", [(6, 3, 0.3), (10, 1, 0.1)])
def test_k_reciprocal_equals_the_papers_dense_definition(k1, k2, lam):
    x, _ = _data(seed=1, classes=8, per=6)
    own = np.arange(x.shape[0])
    final = _k_reciprocal_dense(x, k1, k2, lam)
    depth = x.shape[0] - 1  # a shortlist of every item: the paper's full re-ranking
    ids, scores = rerank("k_reciprocal", x, x, depth, own, k1=k1, k2=k2, lambda_=lam,
                         shortlist=depth)
    expect = _ranked(-final, own)[:, :depth]
    np.testing.assert_allclose(-scores, np.take_along_axis(final, expect, 1), atol=1e-6)
    np.testing.assert_array_equal(ids, expect)


@pytest.mark.parametrize("k1,k2,lam", [(6, 3, 0.3), (10, 1, 0.1), (4, 5, 0.6)])
def test_served_k_reciprocal_equals_the_evaluation_one_query_at_a_time(k1, k2, lam):
    """IndexReranker's k-reciprocal (the gallery's lists searched once, each query added on its
    own) ranks every outside query as rerank() does over gallery + that query."""
    from nirdml.evaluation.rerank import IndexReranker

    x, _ = _data(seed=3, classes=15, per=8, dim=6)
    q, g = x[:12], x[12:]
    served = IndexReranker(f"k_reciprocal:k1={k1},k2={k2},lambda={lam},shortlist=30", g)
    ids, scores = served.search(q, 25)
    for row in range(q.shape[0]):
        want_ids, want = rerank("k_reciprocal", q[row:row + 1], g, 25, np.array([-1]),
                                k1=k1, k2=k2, lambda_=lam, shortlist=30)
        np.testing.assert_allclose(scores[row], want[0], atol=1e-5)
        same = ids[row] == want_ids[0]
        # a different id only where two final distances tie to float rounding
        assert same.all() or np.all(np.abs(np.diff(want[0]))[~same[:-1]] < 1e-5)
    with pytest.raises(ConfigError, match="more than k1 items"):
        IndexReranker("k_reciprocal:k1=40", g[:30])


def test_rerank_none_is_the_plain_evaluation_and_reranking_changes_only_ranking_metrics():
    x, y = _data(seed=2, classes=20, per=5)
    plain = evaluate(x, y, ["recall@1", "map@r", "nmi"])
    assert evaluate(x, y, ["recall@1", "map@r", "nmi"], rerank="none") == plain
    qe = evaluate(x, y, ["recall@1", "map@r", "nmi"], rerank="alpha_qe:n=3,alpha=0")
    assert qe["nmi"] == plain["nmi"] and qe["map@r"] != plain["map@r"]
    # the metrics of the re-ranked lists, counted by hand
    own = np.arange(x.shape[0])
    ids, _ = rerank("alpha_qe", x, x, 4, own, n=3, alpha=0.0)
    assert qe["recall@1"] == pytest.approx(np.mean(y[ids[:, 0]] == y))
    rel = y[ids] == y[:, None]
    ap = (np.cumsum(rel, 1) / np.arange(1, 5) * rel).sum(1) / 4
    assert qe["map@r"] == pytest.approx(ap.mean())


@pytest.mark.parametrize("text,err", [("nope", "unknown re-ranking"),
                                      ("alpha_qe:k1=3", "takes n, alpha"),
                                      ("dba:n=x", "n must be a int"),
                                      ("k_reciprocal:lambda=2", "lambda_ must be in"),
                                      ("k_reciprocal:k1=4,k2=6", "k2 .* at most k1 \\+ 1"),
                                      ("alpha_qe:n=0", "n must be >= 1")])
def test_bad_rerank_specs_are_one_line_errors(text, err):
    with pytest.raises(ConfigError, match=err):
        parse_rerank(text)


def _fnmr_brute(scores_gen, scores_imp, rate):
    """The smallest impostor score t with mean(impostor > t) <= rate; FNMR = mean(gen <= t)."""
    for t in np.unique(scores_imp):
        if np.mean(scores_imp > t) <= rate:
            return t, np.mean(scores_imp > t), np.mean(scores_gen <= t)
    raise AssertionError


@pytest.mark.parametrize("quantise", [False, True])
def test_fnmr_at_fmr_equals_brute_force_on_the_same_scores(quantise):
    x, y = _data(seed=3, classes=15, per=8, dim=6, noise=1.0)
    if quantise:  # coarse embeddings: many tied scores
        x = np.round(x * 2) / 2
        x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)).astype(np.float32)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    iu = np.triu_indices(y.size, 1)
    same = (y[:, None] == y[None, :])[iu]
    gen, imp = s[iu][same], s[iu][~same]
    found = fnmr_at_fmr(x, y, x, y, [1e-1, 1e-2, 1e-3], same_set=True)
    for rate, got in found.items():
        t, fmr, fnmr = _fnmr_brute(gen, imp, rate)
        assert (got.threshold, got.fmr, got.fnmr) == pytest.approx((t, fmr, fnmr), abs=1e-12)
        assert got.impostor_pairs == imp.size and got.genuine_pairs == gen.size
    assert fit_threshold(x, y, 1e-2).threshold == pytest.approx(found[1e-2].threshold, abs=1e-6)
    # a query/gallery split with some queries in the gallery: pairs of distinct samples
    q_idx, g_idx = np.arange(0, 80), np.arange(40, 120)
    own = np.where(q_idx >= 40, q_idx - 40, -1)
    sq = s[np.ix_(q_idx, g_idx)]
    valid = q_idx[:, None] != g_idx[None, :]
    same = y[q_idx][:, None] == y[g_idx][None, :]
    got = fnmr_at_fmr(x[q_idx], y[q_idx], x[g_idx], y[g_idx], [1e-2], self_pos=own)[1e-2]
    t, fmr, fnmr = _fnmr_brute(sq[valid & same], sq[valid & ~same], 1e-2)
    assert (got.threshold, got.fmr, got.fnmr) == pytest.approx((t, fmr, fnmr), abs=1e-12)


def test_evaluate_reports_fnmr_at_fmr_over_its_query_gallery_pairs():
    x, y = _data(seed=4)
    res = evaluate(x, y, ["recall@1"], fnmr_at_fmr=[1e-2])
    ref = fnmr_at_fmr(x, y, x, y, [1e-2], same_set=True)[1e-2]
    assert res["fnmr@fmr=0.01"] == ref.fnmr and res["threshold@fmr=0.01"] == ref.threshold
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        evaluate(x, y, ["recall@1"], fnmr_at_fmr=[1.5])


# ---------------------------------------------------------------- choosing the parameters
def _map_at_r_split_dense(x, y):
    """MAP@R by hand for the outside-query protocol: in each class, items 1, 3, 5, ... (in
    order) query the items 0, 2, 4, ... of all classes."""
    order = np.zeros(y.size, int)
    for c in np.unique(y):
        order[y == c] = np.arange((y == c).sum())
    q, g = np.flatnonzero(order % 2 == 1), np.flatnonzero(order % 2 == 0)
    aps = []
    for i in q:
        ranked = g[np.argsort(-(x[g] @ x[i]), kind="stable")]
        r = int((y[g] == y[i]).sum())
        rel = (y[ranked[:r]] == y[i]).astype(float)
        aps.append((np.cumsum(rel) / np.arange(1, r + 1) * rel).sum() / r)
    return float(np.mean(aps))


def test_select_rerank_scores_every_grid_point_and_keeps_the_plain_ranking_unless_beaten():
    from nirdml.evaluation.rerank import RERANKERS
    from nirdml.selection.rerank import select_rerank

    x, y = _data(seed=3, noise=1.0)
    found = select_rerank(x, y, ["alpha_qe", "dba"], "map@r", "split")
    assert found["none"] == pytest.approx(_map_at_r_split_dense(x, y), abs=1e-9)
    for name in ("alpha_qe", "dba"):
        got = found["methods"][name]
        grid = RERANKERS[name].grid
        assert len(got["grid"]) == np.prod([len(v) for v in grid.values()])
        assert got["score"] == max(s for _, s in got["grid"])
        spec, score = got["grid"][5]  # any point is evaluate's own score under the masks
        order = np.zeros(y.size, int)
        for c in np.unique(y):
            order[y == c] = np.arange((y == c).sum())
        direct = evaluate(x, y, ["map@r"], query_mask=order % 2 == 1,
                          gallery_mask=order % 2 == 0, rerank=spec)["map@r"]
        assert score == pytest.approx(direct, abs=1e-12)
    best = max([("none", found["none"])] + [(m["spec"], m["score"])
                                            for m in found["methods"].values()],
               key=lambda t: t[1])
    assert (found["best"], found["best_score"]) == best
    # separable classes: the plain ranking is perfect, no method can beat it strictly
    x, y = _data(seed=3, noise=0.0)
    found = select_rerank(x, y, ["dba"], "recall@1")
    assert found["none"] == 1.0 and found["best"] == "none"


@pytest.mark.parametrize("methods,metric,err", [
    (["dba", "banana"], "map@r", "unknown re-ranking method(s) 'banana'"),
    (["dba"], "nmi", "one ranking metric"),
    (["dba"], "recall@x", "k must be a positive integer"),
    (["dba"], "banana", "unknown metric"),
])
def test_select_rerank_refuses_bad_methods_and_metrics(methods, metric, err):
    from nirdml.selection.rerank import select_rerank

    x, y = _data()
    with pytest.raises(ConfigError, match=err.replace("(", r"\(").replace(")", r"\)")):
        select_rerank(x, y, methods, metric)


def test_tune_rerank_command_prints_and_writes_the_choice(checkpoint, tmp_path, capsys):
    import json

    from conftest import refused
    from nirdml.cli import main

    out = tmp_path / "sel.json"
    # the digits run has no validation split: said before any search
    refused(capsys, ["tune", "--rerank", "dba", "--checkpoint", str(checkpoint)],
            "split 'val' is empty", "val_fraction")
    assert main(["tune", "--rerank", "dba", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--split", "test", "--protocol", "split", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["kind"] == "nirdml.rerank_selection" and doc["split"] == "test"
    assert len(doc["methods"]["dba"]["grid"]) == 24
    assert (f"--rerank {doc['best']}" in text) == (doc["best"] != "none")
    # written by nirdml: replaced; someone else's file: refused before any work
    assert main(["tune", "--rerank", "dba", "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--split", "test", "--json", str(out)]) == 0
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    capsys.readouterr()
    refused(capsys, ["tune", "--rerank", "--checkpoint", str(checkpoint), "--json",
                     str(foreign)], "was not written by nirdml", "--overwrite")
    assert foreign.read_text() == '{"mine": 1}'
    refused(capsys, ["tune", "--rerank", "dba"], "--checkpoint")
    refused(capsys, ["tune", "--rerank", "qe", "--checkpoint", str(checkpoint)], "'qe'")
    refused(capsys, ["tune", "--space", "s.yaml"], "--trials", "--out", "--rerank")
