"""The HTML run report: structure (pure Python) and rendering in a headless browser."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import need_program, save_untrained_digits_checkpoint
from nirdml.cli import main
from nirdml.errors import ConfigError
from nirdml.reports import build_report

K, QUERIES = 4, 3


def make_checkpoint(path, data=None):
    """A small_cnn checkpoint that ``TrainedRun`` accepts (no training)."""
    from nirdml.models import build_model
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import Config

    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=16, in_chans=3)
    cfg = Config.from_dict({
        "data": data or {"name": "digits", "image_size": 32, "val_fraction": 0.0},
        "model": {"name": "small_cnn", "embedding_dim": 16, "pretrained": False},
    })
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": 3,
                     "image_kind": "rgb", "epoch": 3}, path)
    return cfg


class ColourSplit(torch.utils.data.Dataset):
    """5 classes of flat-coloured 3x32x32 images with noise (a stand-in test split)."""

    def __init__(self, per_class=4):
        rng = np.random.default_rng(0)
        self.labels = np.repeat(np.arange(5), per_class)
        colours = rng.uniform(-1, 1, (5, 3, 1, 1))
        self.images = torch.tensor(colours[self.labels] + 0.2 * rng.normal(
            size=(len(self.labels), 3, 32, 32)), dtype=torch.float32)
        self.transform, self.paths, self.is_query, self.is_gallery = None, None, None, None
        self.class_names = ["red", "green", "blue", "cyan", "grey"]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def make_run(run, data=None):
    """A run folder as the trainer and ``nirdml analyze`` leave it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (run / "checkpoints").mkdir(parents=True)
    cfg = make_checkpoint(run / "checkpoints" / "best.pt", data)
    cfg.to_yaml(run / "config.yaml")
    (run / "final.json").write_text(json.dumps({
        "recall@1": 0.61, "recall@2": 0.72, "map@r": 0.21, "nmi": 0.55,
        "selected_epoch": 3, "dataset": "digits", "split": "test"}))
    with open(run / "metrics.jsonl", "w") as fh:
        for epoch in (1, 2, 3):
            fh.write(json.dumps({"epoch": epoch, "train/total": 2.0 / epoch,
                                 "train/proxy": 1.5 / epoch, "train/nir": 0.5 / epoch,
                                 "train/bad_steps": 0, "val/recall@1": 0.3 + 0.1 * epoch,
                                 "val/num_queries": 500, "val/lone_queries": 0,
                                 "probe/condition_gain_nats": 2.0 * epoch,
                                 "lr": 1e-3}) + "\n")
        fh.write("{not json\n")
    (run / "analysis").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.hist(np.random.default_rng(0).normal(size=200), bins=20)
    fig.savefig(run / "analysis" / "density.png")
    plt.close(fig)
    (run / "analysis" / "analysis.json").write_text(json.dumps(
        {"rho": 0.19, "g2": 0.07, "uniformity": -2.1, "alignment": {"mean": 0.4},
         "source": {"checkpoint": "/some/where/best.pt"}}))
    return run


@pytest.fixture()
def fake_test_split(monkeypatch):
    """Route ``build_splits`` to a small in-memory test split (no dataset on disk needed)."""
    from nirdml.training import builders

    split = ColourSplit()
    monkeypatch.setattr(builders, "build_splits",
                        lambda cfg: SimpleNamespace(train=split, val=None, test=split,
                                                    image_kind="rgb"))
    return split


@pytest.fixture()
def report(tmp_path, fake_test_split):
    run = make_run(tmp_path / "run")
    return build_report(run, tmp_path / "report.html", k=K, num_queries=QUERIES)


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.cells, self.ids, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "td" and a.get("class") in ("query", "hit", "miss"):
            self.cells.append(a["class"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    c = Collector()
    c.feed(path.read_text())
    return c


def test_report_structure(report):
    from PIL import Image

    c = parse(report)
    html_text = report.read_text()
    assert {"metrics", "curves", "analysis", "retrieval", "config"} <= set(c.ids)
    # self-contained: every image is an inline PNG, nothing is fetched
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html_text)
    assert "<link" not in html_text
    assert len(c.imgs) == 3 + 1 + QUERIES * (K + 1)  # 3 curve plots, 1 diagnostic, the grid
    for img in c.imgs:
        assert img["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as im:
            assert im.format == "PNG" and min(im.size) > 8
    assert c.cells.count("query") == QUERIES
    assert c.cells.count("hit") + c.cells.count("miss") == QUERIES * K
    assert c.cells.count("hit") >= QUERIES  # flat colours: the same class comes first
    text = " ".join(c.text)
    assert "recall@1" in text and "61.00 %" in text and "uniformity" in text
    assert "small_cnn" in text  # config.yaml
    assert "note" not in html_text.split('id="retrieval"')[1].split("</section>")[0]
    # the most useful parts first: metrics, the retrieval grid, then curves, diagnostics, config
    order = [c.ids.index(name) for name in ("metrics", "retrieval", "curves", "analysis",
                                            "config")]
    assert order == sorted(order)
    analysis = html_text.split('id="analysis"')[1].split("</section>")[0]
    headline, folded = analysis.split("<details>", 1)
    assert "rho" in headline and "/some/where" not in headline  # raw record folded away
    assert "/some/where" in folded


def test_report_skips_grid_without_dataset(tmp_path, capsys):
    run = make_run(tmp_path / "run", data={"name": "cub200", "root": str(tmp_path / "none")})
    assert main(["report", "--run", str(run), "-k", "3"]) == 0
    out = run / "report.html"
    assert str(out) in capsys.readouterr().out
    c = parse(out)
    section = out.read_text().split('id="retrieval"')[1].split("</section>")[0]
    assert "retrieval grid skipped" in section and 'class="note"' in section
    assert c.cells == [] and len(c.imgs) == 4


def test_report_of_a_bare_run(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    with pytest.raises(ConfigError, match="not a training run"):
        build_report(run)  # no metrics.jsonl: not a run (was: rc 0 and an empty page)
    with pytest.raises(ConfigError, match="not a training run"):
        build_report(tmp_path / "missing")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train/proxy": 2.0,
                                                  "val/recall@1": 0.5}) + "\n")
    out = build_report(run, k=2)
    text = out.read_text()
    assert text.count('class="note"') == 4  # metrics, grid, analysis, config
    assert "no checkpoint" in text
    assert len(parse(out).imgs) == 2  # one epoch: loss and metric points


def test_report_grid_on_digits(tmp_path):
    run = tmp_path / "run"
    save_untrained_digits_checkpoint(run / "checkpoints" / "best.pt")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train/proxy": 2.0}) + "\n")
    c = parse(build_report(run, k=3, num_queries=2))
    assert c.cells.count("query") == 2 and len(c.cells) == 2 * 4


def chromium(args, tmp_path, timeout=60):
    cmd = [need_program("chromium", "chromium-browser"), "--headless", "--no-sandbox",
           "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    url = report.resolve().as_uri()
    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    assert 'data-images-ok="true"' in body.group(0), body.group(0)
    assert f'data-image-count="{3 + 1 + QUERIES * (K + 1)}"' in body.group(0)
    assert 'data-js-errors="0"' in body.group(0)
    shot = tmp_path / "shot.png"
    res = chromium([f"--screenshot={shot}", "--window-size=1200,2400", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[:2] == (2400, 1200)
    non_white = (rgb < 240).any(axis=2).mean()
    colours = len(np.unique(rgb.reshape(-1, 3)[::7], axis=0))
    assert non_white > 0.05 and colours > 200, (non_white, colours)
    # the grid's green and red borders are on screen
    green = ((rgb[..., 1] > 140) & (rgb[..., 0] < 60) & (rgb[..., 2] < 90)).sum()
    assert green > 100


def test_curves_plot_metrics_in_percent_not_counts(monkeypatch):
    import nirdml.reports.html as report_module

    seen = {}

    def capture(fig):
        ax = fig.axes[0]
        seen[ax.get_title()] = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
        return "data:image/png;base64,"

    monkeypatch.setattr(report_module, "figure_uri", capture)
    report_module.plot_curves([{"epoch": 1, "train/proxy": 2.0, "val/recall@1": 0.5,
                                "val/lone_queries": 0, "val/num_queries": 96,
                                "probe/nir_grad_share": 0.1}])
    metrics = seen["Evaluation metrics (%)"]
    assert metrics == {"val/recall@1": [50.0]}  # percent; counts are not metrics
    assert "probe/nir_grad_share" in seen["NIR mechanism (training-class probe)"]
