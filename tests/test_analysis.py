"""Structure diagnostics against brute-force references, figures, ``analyze`` and the CLI."""

import itertools
import json

import numpy as np
import pytest

from conftest import load_benchmark
from nirdml.analysis import (
    analyze,
    cluster_size_variance,
    density_ratio,
    intra_class_stats,
    sample_pair_distances,
    singular_values,
    spectral_decay,
    structure_report,
    uniformity_g2,
)
from nirdml.cli import main
from nirdml.errors import InputError

PNG = b"\x89PNG\r\n\x1a\n"


def _data(n=60, d=6, c=5, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    y[:c] = np.arange(c)  # every class present
    x = centers[y] + spread * rng.normal(size=(n, d))
    return x, y


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == PNG


# ---------------------------------------------------------------- brute-force references
def test_spectral_decay_matches_reference():
    x, _ = _data(n=40, d=7)
    s = np.linalg.svd(_norm(x), compute_uv=False)
    rest = s[1:] / s[1:].sum()
    m = rest.size
    ref = sum((1 / m) * np.log((1 / m) / p) for p in rest)
    assert spectral_decay(x, form="full") == pytest.approx(ref, rel=1e-10)


def test_spectral_decay_release_form_matches_a_truncated_svd_and_scipy_entropy():
    """The authors' form: scikit-learn's TruncatedSVD (exact ARPACK solver) keeping D - 1
    components of the normalised embeddings, the first dropped, KL(uniform || p) by scipy."""
    from scipy.stats import entropy
    from sklearn.decomposition import TruncatedSVD

    x, _ = _data(n=300, d=12)
    svd = TruncatedSVD(n_components=11, algorithm="arpack", random_state=0).fit(_norm(x))
    s = np.sort(svd.singular_values_)[::-1][1:]
    ref = entropy(np.full(s.size, 1 / s.size), s / s.sum())
    assert spectral_decay(x) == pytest.approx(ref, rel=1e-8)
    assert spectral_decay(x, form="release") == spectral_decay(x)
    # a 64-wide layer mapped to 128 dimensions: rank 64, and rho is dominated by the zeros
    rng = np.random.default_rng(0)
    low = rng.normal(size=(2000, 64)) @ rng.normal(size=(64, 128))
    from nirdml.analysis.diagnostics import numerical_rank

    assert numerical_rank(low) == 64 and spectral_decay(low) > 5.0
    assert np.isnan(spectral_decay(rng.normal(size=(10, 2))))
    with pytest.raises(InputError, match="unknown spectral decay form"):
        spectral_decay(x, form="paper")


def test_spectral_decay_pads_when_fewer_samples_than_dims():
    x, _ = _data(n=4, d=10, c=2)
    s = np.zeros(10)
    s[:4] = np.linalg.svd(_norm(x), compute_uv=False)
    p = np.maximum(s[1:] / s[1:].sum(), 1e-12)
    p /= p.sum()
    ref = np.mean(np.log((1 / 9) / p))
    assert spectral_decay(x, form="full") == pytest.approx(ref, rel=1e-9)


def test_singular_values_blockwise_qr_matches_direct_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9000, 4)) + np.array([2.0, 0, 0, 0])  # > one QR block
    np.testing.assert_allclose(singular_values(x), np.linalg.svd(_norm(x), compute_uv=False),
                               rtol=1e-10)


def test_density_ratio_matches_reference():
    x, y = _data()
    xn = _norm(x)
    intra, means = [], []
    for c in np.unique(y):
        pts = xn[y == c]
        means.append(pts.mean(axis=0))
        if len(pts) >= 2:
            intra.append(np.mean([np.linalg.norm(a - b)
                                  for a, b in itertools.combinations(pts, 2)]))
    inter = np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)])
    assert density_ratio(x, y) == pytest.approx(np.mean(intra) / inter, rel=1e-7)
    assert density_ratio(x, y, block=3) == pytest.approx(np.mean(intra) / inter, rel=1e-7)


def test_singleton_classes_skip_intra_terms_but_count_for_inter():
    x, y = _data(n=30, c=3)
    x = np.vstack([x, [[1, 2, 3, 4, 5, 6]]])
    y = np.append(y, 99)
    xn = _norm(x)
    means = [xn[y == c].mean(axis=0) for c in np.unique(y)]
    intra = np.mean([np.mean([np.linalg.norm(a - b)
                              for a, b in itertools.combinations(xn[y == c], 2)])
                     for c in (0, 1, 2)])
    inter = np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)])
    assert density_ratio(x, y) == pytest.approx(intra / inter, rel=1e-7)
    kappa = [np.mean(np.linalg.norm(xn[y == c] - xn[y == c].mean(0), axis=1)) for c in (0, 1, 2)]
    assert cluster_size_variance(x, y) == pytest.approx(np.var(kappa), rel=1e-9)


def test_cluster_size_variance_and_intra_stats_match_reference():
    x, y = _data(seed=3)
    xn = _norm(x)
    means, stds, maxs = [], [], []
    for c in np.unique(y):
        pts = xn[y == c]
        d = np.array([np.linalg.norm(p - pts.mean(axis=0)) for p in pts])
        means.append(d.mean())
        stds.append(d.std())
        maxs.append(d.max())
    assert cluster_size_variance(x, y) == pytest.approx(np.var(means), rel=1e-9)
    st = intra_class_stats(x, y)
    for key, vals in (("mean", means), ("std", stds), ("max", maxs)):
        assert st[key]["mean"] == pytest.approx(np.mean(vals), rel=1e-9)
        assert st[key]["median"] == pytest.approx(np.median(vals), rel=1e-9)
        assert st[key]["p10"] == pytest.approx(np.percentile(vals, 10), rel=1e-9)
        assert st[key]["p90"] == pytest.approx(np.percentile(vals, 90), rel=1e-9)
    assert st["num_classes_used"] == 5


def test_uniformity_g2_matches_reference():
    x, _ = _data(n=45)
    xn = _norm(x)
    ref = np.mean([np.exp(-2 * np.sum((a - b) ** 2)) for a, b in itertools.combinations(xn, 2)])
    assert uniformity_g2(x) == pytest.approx(ref, rel=1e-9)
    assert uniformity_g2(x, block=8) == pytest.approx(ref, rel=1e-9)
    ref_t1 = np.mean([np.exp(-np.sum((a - b) ** 2)) for a, b in itertools.combinations(xn, 2)])
    assert uniformity_g2(x, t=1.0) == pytest.approx(ref_t1, rel=1e-9)


# ---------------------------------------------------------------- sanity directions
def test_isotropic_cloud_has_small_rho_and_rank_two_large():
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(4000, 16))
    assert spectral_decay(iso) < 0.02
    low = rng.normal(size=(4000, 2)) @ rng.normal(size=(2, 16))
    assert spectral_decay(low) > 5.0
    one = np.tile(rng.normal(size=(1, 16)), (10, 1))  # rank 1: the most collapsed value
    assert spectral_decay(one) >= spectral_decay(low)


def test_tighter_classes_give_smaller_density():
    loose = density_ratio(*_data(n=200, d=16, c=8, spread=0.5))
    tight = density_ratio(*_data(n=200, d=16, c=8, spread=0.1))
    assert tight < loose


def test_g2_of_identical_points_is_one():
    x = np.tile([[0.3, -1.0, 2.0]], (50, 1))
    assert uniformity_g2(x) == pytest.approx(1.0)
    assert uniformity_g2(x, max_exact=10, num_pairs=1000) == pytest.approx(1.0)


def test_subsampled_g2_is_close_to_exact_and_seeded():
    """2M sampled pairs of 1,200 points: the sampling std of the estimate is 7e-5 (measured
    over 10 seeds), so 3e-4 is 4 std; a sampler that let a point pair with itself (weight
    exp(0) = 1 with probability 1/1200) would shift it by (1 - 0.069) / 1200 = 7.8e-4."""
    x, _ = _data(n=1200, d=8, c=20, spread=0.5)
    exact = uniformity_g2(x)
    approx = uniformity_g2(x, max_exact=1000, num_pairs=2_000_000, seed=1)
    assert approx == pytest.approx(exact, abs=3e-4)
    assert approx == uniformity_g2(x, max_exact=1000, num_pairs=2_000_000, seed=1)
    from nirdml.analysis.diagnostics import _random_pairs

    i, j = _random_pairs(1200, 2_000_000, np.random.default_rng(1))
    assert not (i == j).any()


def test_sampled_pair_distances_are_intra_and_inter_pairs():
    x, y = _data(n=30, c=4, seed=5)
    xn = _norm(x)
    intra_all = [np.linalg.norm(xn[i] - xn[j]) for i, j in itertools.combinations(range(30), 2)
                 if y[i] == y[j]]
    inter_all = [np.linalg.norm(xn[i] - xn[j]) for i, j in itertools.combinations(range(30), 2)
                 if y[i] != y[j]]
    intra, inter = sample_pair_distances(x, y, num_pairs=500, seed=0)
    assert intra.shape == inter.shape == (500,)
    assert np.abs(intra[:, None] - np.array(intra_all)[None]).min(axis=1).max() < 1e-7
    assert np.abs(inter[:, None] - np.array(inter_all)[None]).min(axis=1).max() < 1e-7
    assert np.all(intra > 1e-9)  # never a sample paired with itself


def test_report_keys_and_label_remapping():
    x, y = _data()
    rep = structure_report(x, y)
    assert {"rho", "pi_density", "sigma2_kappa", "g2", "intra_class", "num_samples",
            "num_classes"} <= set(rep)
    assert rep["num_samples"] == 60 and rep["num_classes"] == 5
    rep2 = structure_report(x, y * 10 + 7)  # arbitrary integer ids
    for k in ("rho", "pi_density", "sigma2_kappa", "g2"):
        assert rep2[k] == pytest.approx(rep[k])
    json.dumps(rep)


@pytest.mark.parametrize("case", ["nan", "zero", "mismatch", "one_class", "singletons",
                                  "float_labels", "1d"])
def test_bad_inputs_raise_input_error(case):
    x, y = _data()
    if case == "nan":
        x[3, 1] = np.nan
    elif case == "zero":
        x[2] = 0
    elif case == "mismatch":
        y = y[:-1]
    elif case == "one_class":
        y = np.zeros_like(y)
    elif case == "singletons":
        y = np.arange(len(y))
    elif case == "float_labels":
        y = y + 0.5
    elif case == "1d":
        x = x[:, 0]
    message = {
        "nan": r"NaN or inf in 1 of 60 rows \(first: row 3\)",
        "zero": r"1 all-zero row\(s\) \(first: row 2\)",
        "mismatch": "labels has 59 entries but embeddings has 60 rows",
        "one_class": "at least 2 classes",
        "singletons": "every class has a single sample",
        "float_labels": "non-integer floats",
        "1d": r"2-D \(N, D\) array, got shape \(60,\)",
    }[case]
    with pytest.raises(InputError, match=message):
        structure_report(x, y)


# ---------------------------------------------------------------- figures, analyze, CLI
def test_cli_on_npz_writes_json_and_pngs(tmp_path, capsys):
    x, y = _data(n=150, d=16, c=6)
    np.savez(tmp_path / "emb.npz", embeddings=x.astype(np.float32), labels=y)
    out = tmp_path / "ana"
    assert main(["analyze", "--embeddings", str(tmp_path / "emb.npz"), "--out", str(out)]) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert res["rho"] == pytest.approx(spectral_decay(x), rel=1e-5)
    assert res["flow_samples"] is None
    for name in ("spectrum.png", "distances.png", "tsne.png"):
        assert _is_png(out / name), name
    assert not (out / "flow_samples.png").exists()
    printed = capsys.readouterr().out
    for k in ("rho", "pi_density", "sigma2_kappa", "g2"):
        assert k in printed


def test_cli_no_plots_and_bad_npz(tmp_path, capsys):
    x, y = _data()
    np.savez(tmp_path / "e.npz", embeddings=x, labels=y)
    assert main(["analyze", "--embeddings", str(tmp_path / "e.npz"), "--out",
                 str(tmp_path / "o"), "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".nirdml", "analysis.json"]
    np.savez(tmp_path / "bad.npz", embeddings=x)
    assert main(["analyze", "--embeddings", str(tmp_path / "bad.npz"), "--out",
                 str(tmp_path / "o2")]) == 2
    assert "labels" in capsys.readouterr().err
    assert main(["analyze", "--embeddings", str(tmp_path / "missing.npz"), "--out",
                 str(tmp_path / "o3")]) == 2


def test_analyze_needs_exactly_one_source(tmp_path):
    x, y = _data()
    with pytest.raises(InputError):
        analyze(out_dir=tmp_path)
    with pytest.raises(InputError):
        analyze(embeddings=x, out_dir=tmp_path)  # labels missing


class _NoisyFlow:
    """Stand-in with the flow's ``sample(cond)`` contract: the condition plus small noise."""

    def __init__(self):
        import torch

        self.layer = torch.nn.Linear(2, 2)

    def parameters(self):
        return self.layer.parameters()

    def sample(self, cond):
        import torch

        return cond + 0.05 * torch.randn_like(cond)


def test_flow_samples_plot_and_stats_with_stand_in_flow(tmp_path):
    pytest.importorskip("torch")
    from nirdml.analysis import plots

    x, y = _data(n=80, d=8, c=6)
    proxies = _norm(np.vstack([_norm(x)[y == c].mean(0) for c in range(6)]))
    flow = _NoisyFlow()
    s, sy = plots.sample_flow_around_proxies(flow, proxies, [1, 4], samples_per_class=30, seed=3)
    assert s.shape == (60, 8) and sorted(set(sy)) == [1, 4]
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0)
    s2, _ = plots.sample_flow_around_proxies(flow, proxies, [1, 4], samples_per_class=30, seed=3)
    np.testing.assert_array_equal(s, s2)  # seeded
    stats = plots.flow_sample_stats(s, sy, x, y, proxies)
    assert stats["sample_cos_to_proxy"] > 0.95
    path = plots.plot_flow_samples(flow, proxies, x, y, tmp_path / "f.png", num_classes=3,
                                   samples_per_class=20)
    assert _is_png(path)
    # several proxies per class (SoftTriple-like): samples split over the class's centres
    p2 = np.repeat(proxies, 2, axis=0)
    s3, sy3 = plots.sample_flow_around_proxies(flow, p2, [0, 5], 10, proxies_per_class=2)
    assert s3.shape == (20, 8)
    assert _is_png(plots.plot_flow_samples(flow, p2, x, y, tmp_path / "g.png", classes=[0, 5],
                                           proxies_per_class=2, samples=(s3, sy3)))


def test_flow_samples_plot_with_real_conditional_glow_flow(tmp_path):
    torch = pytest.importorskip("torch")
    nir = pytest.importorskip("nirdml.nir")
    if not hasattr(nir, "ConditionalGlowFlow"):
        pytest.skip("nirdml.nir.ConditionalGlowFlow is not available yet")
    from nirdml.analysis import plots

    torch.manual_seed(0)
    flow = nir.ConditionalGlowFlow(8, num_blocks=2, subnet_depth=2, subnet_width=16)
    x, y = _data(n=50, d=8, c=4)
    proxies = torch.randn(4, 8)
    path = plots.plot_flow_samples(flow, proxies, x, y, tmp_path / "flow.png",
                                   samples_per_class=25)
    assert _is_png(path)


def test_analyze_checkpoint_path_with_stand_ins(tmp_path, monkeypatch):
    """The checkpoint glue (criterion rebuild, train-class subset embedding, flow figure) with
    the model, data and criterion replaced by small stand-ins."""
    torch = pytest.importorskip("torch")
    import nirdml.data
    from nirdml.inference import TrainedRun
    from nirdml.training import builders
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["model.embedding_dim=8"])
    assert cfg.loss.nir.enabled
    rng = np.random.default_rng(0)
    test_x, test_y = _data(n=90, d=8, c=5)
    # seeded proxies; every training image carries its class's proxy plus a little noise in its
    # first 8 pixels and the stand-in model reads them out, so each embedding lies next to its
    # own proxy and the condition gain is positive by construction
    proxies = torch.as_tensor(rng.normal(size=(6, 8)), dtype=torch.float32)

    class Data:
        def __init__(self, n, c):
            self.labels = np.arange(n) % c
            pixels = rng.normal(size=(n, 16)) * 0.02
            pixels[:, :8] += proxies.numpy()[self.labels]
            self.images = torch.as_tensor(pixels.reshape(n, 1, 4, 4), dtype=torch.float32)
            self.transform = None

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

        def select(self, rows):
            subset = Data(0, 1)
            subset.labels, subset.images = self.labels[rows], self.images[rows]
            return subset

    class Splits:
        train, test, image_kind = Data(60, 6), Data(90, 5), "gray_small"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)
            with torch.no_grad():  # read out the first 8 pixels
                self.lin.weight.copy_(torch.eye(8, 16))
                self.lin.bias.zero_()

        def forward(self, images):
            return torch.nn.functional.normalize(self.lin(images.flatten(1)), dim=1)

    class Flow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def sample(self, cond):
            return cond + 0.1 * torch.randn_like(cond) + self.w

        def nll(self, x, cond):  # a Gaussian around the condition: the condition matters
            return 0.5 * ((x - cond) ** 2).sum(1) / 0.1**2

    class Base(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.num_classes = c
            self.proxies = torch.nn.Parameter(proxies[:c].clone())

        def class_proxies(self, x, y):
            return torch.nn.functional.normalize(self.proxies[y], dim=1)

    class Crit(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.base_loss, self.flow = Base(c), Flow()

    trained = Crit(6)
    state = {"config": cfg.to_dict(), "model": Model().state_dict(), "num_classes": 6,
             "criterion": trained.state_dict()}
    seen = {}
    embed = TrainedRun.embed

    def spying_embed(self, what, *args, **kwargs):
        if isinstance(what, str):
            seen["split"] = what
        return embed(self, what, *args, **kwargs)

    monkeypatch.setattr(TrainedRun, "open", classmethod(
        lambda cls, ck, device, data_root=None: cls(state, ck, device, data_root)))
    monkeypatch.setattr(TrainedRun, "embed", spying_embed)
    monkeypatch.setattr(builders, "build_model", lambda c, in_chans=None: Model())
    monkeypatch.setattr(builders, "build_criterion", lambda c, n: Crit(n))
    monkeypatch.setattr(builders, "build_splits", lambda c: Splits())
    monkeypatch.setattr(nirdml.data, "build_transforms", lambda *a, **k: None, raising=False)

    res = analyze(checkpoint="ck.pt", out_dir=tmp_path / "a", flow_classes=3, device="cpu")
    assert seen["split"] == "test"
    assert res["source"]["dataset"] == "digits"
    assert len(res["flow_samples"]["classes"]) == 3
    gain = res["flow_samples"]
    assert gain["condition_gain_nats"] == pytest.approx(
        gain["nll_other_proxy"] - gain["nll_own_proxy"])
    assert gain["condition_gain_nats"] > 50  # embeddings sit at their own proxies
    assert gain["class_id_acc"] == 1.0 and gain["cos_within"] > gain["cos_between"]
    for name in ("spectrum.png", "distances.png", "tsne.png", "flow_samples.png"):
        assert _is_png(tmp_path / "a" / name), name
    assert json.loads((tmp_path / "a/analysis.json").read_text())["flow_samples"] is not None


def test_analyze_real_digits_checkpoint(tmp_path):
    """End to end on an untrained digits checkpoint, once the data and NIR modules exist."""
    pytest.importorskip("torch")
    import nirdml.data
    import nirdml.nir

    if not (hasattr(nirdml.data, "load_splits") and hasattr(nirdml.nir, "NIRLoss")):
        pytest.skip("nirdml.data / nirdml.nir are not available yet")
    from nirdml.training import builders
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["model.embedding_dim=16", "loss.nir.subnet_width=32",
                                 "loss.nir.subnet_depth=3", "loss.nir.num_blocks=2"])
    splits = builders.build_splits(cfg)
    in_chans = splits.train[0][0].shape[0]
    model = builders.build_model(cfg, in_chans=in_chans)
    crit = builders.build_criterion(cfg, splits.train.num_classes)
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(),
                     "criterion": crit.state_dict(), "num_classes": splits.train.num_classes,
                     "in_chans": in_chans, "epoch": 0}, tmp_path / "ck.pt")
    out = tmp_path / "ana"
    analyze(checkpoint=tmp_path / "ck.pt", out_dir=out, device="cpu", flow_classes=2,
            flow_samples_per_class=50, tsne_classes=2)
    res = json.loads((out / "analysis.json").read_text())
    assert res["source"]["split"] == "test" and res["flow_samples"] is not None
    assert _is_png(out / "flow_samples.png")
    # the real flow and proxy loss: an independent recomputation of the condition gain
    import torch

    from nirdml.nir.monitor import condition_metrics

    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen), dim=1)
    y = torch.arange(30) % splits.train.num_classes
    got = condition_metrics(crit, x, y, seed=3)
    own = crit.flow.nll(x, torch.nn.functional.normalize(crit.base_loss.proxies[y], dim=1))
    assert got["nll_own_proxy"] == pytest.approx(own.mean().item(), rel=1e-5)
    assert np.isfinite(res["flow_samples"]["condition_gain_nats"])


@pytest.mark.slow
def test_study_structure_script_measures_the_runs_of_a_study_folder(tmp_path):
    """benchmarks/study_structure.py on a one-arm study of two digits runs: the cached
    structure numbers equal structure_report on the checkpoint's test embeddings, and the
    convergence epoch is read from metrics.jsonl."""
    from nirdml.analysis.diagnostics import structure_report
    from nirdml.inference import TrainedRun
    from nirdml.training import Trainer
    from nirdml.training.config import load_config

    mod = load_benchmark("study_structure")
    folder = tmp_path / "x" / "proxy_anchor"
    for seed in (1, 2):
        cfg = load_config("digits", [f"seed={seed}", "train.epochs=3", "train.progress=false",
                                     "data.val_fraction=0.3", "data.options.train_digits=7",
                                     "train.select_on=val",
                                     "train.tensorboard=false", "model.embedding_dim=16"])
        Trainer(cfg, folder / "runs" / f"base-seed{seed}").fit()
    (folder / "test.json").write_text(json.dumps([{"arm": "base"}]))
    text = mod.report(tmp_path, ["x"], "proxy_anchor", ["test"])
    assert "## Setting x, test split" in text
    got = json.loads((folder / "runs" / "base-seed1" / "structure.json").read_text())["test"]
    emb = TrainedRun.open(folder / "runs" / "base-seed1" / "checkpoints" / "best.pt",
                          "cpu").embed("test")
    want = structure_report(emb.embeddings, emb.labels)
    for key in ("rho", "rho_full", "pi_density", "sigma2_kappa", "g2"):
        assert got[key] == pytest.approx(want[key], rel=1e-6)
    rows = json.loads((tmp_path / "structure.json").read_text())["x"]
    assert rows[0]["seeds"] == [1, 2] and 1 <= rows[0]["epochs_to_95"][0] <= 3
