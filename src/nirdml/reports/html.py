"""``build_report``: one self-contained HTML page about a training run.

It reads a run folder written by the trainer (``config.yaml``, ``final.json``, ``metrics.jsonl``,
``checkpoints/best.pt``) and, when present, the output of ``nirdml analyze --out RUN/analysis``
(``*.png`` and ``analysis.json``). Every image is inlined as a base64 PNG data URI, so the file
can be mailed or archived on its own. The retrieval grid shows a few test queries with their
top-k neighbours (green border: same class, red: another class); it is skipped with a note
when the checkpoint or the dataset is not available.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nirdml.errors import ConfigError, NirdmlError
from nirdml.training.run_dir import RunDir

LOSS_PREFIX = "train/"
EVAL_PREFIXES = ("val/", "test/")
_SKIP_CURVES = {"train/bad_steps"}
_COUNT_SUFFIXES = ("lone_queries", "num_queries")
_MECHANISM_CURVES = {"probe/condition_gain_nats", "probe/nir_grad_share", "probe/cos_between",
                     "probe/class_id_acc", "flow/drift"}


@dataclass
class GridRow:
    """One query of the retrieval grid with its top-k results."""

    query: str  # PNG data URI
    query_label: str
    results: list[dict[str, Any]] = field(default_factory=list)  # uri, label, score, correct


# ------------------------------------------------------------------------------ readers
def _read_json(path: Path) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable: {exc}"


# ------------------------------------------------------------------------------ images
def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig) -> str:
    """Render a matplotlib figure to a PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png_data_uri(buf.getvalue())


def tensor_thumbnail(image, size: int = 96, image_kind: str | None = None) -> str:
    """A normalised (C, H, W) image tensor -> PNG data URI (``size`` px on the long side).

    The normalisation of ``image_kind`` is undone; other inputs are min-max scaled.
    """
    from PIL import Image

    from nirdml.data.transforms import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD

    arr = np.asarray(image, dtype=np.float32)
    stats = {"rgb": (IMAGENET_MEAN, IMAGENET_STD), "gray_small": (GRAY_MEAN, GRAY_STD)}
    mean, std = stats.get(image_kind, (None, None))
    if arr.ndim == 3 and mean is not None and arr.shape[0] == len(mean):
        arr = np.clip(arr * np.reshape(std, (-1, 1, 1)) + np.reshape(mean, (-1, 1, 1)), 0, 1)
    else:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    arr = (arr * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    scale = size / max(img.size)
    resample = Image.NEAREST if scale > 1 else Image.BILINEAR
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return png_data_uri(buf.getvalue())


def plot_curves(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(title, data URI)`` of the loss terms, the evaluation metrics (percent) and the NIR
    mechanism metrics per epoch; a run of one or two epochs is drawn as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = [
        ("Training loss terms", lambda k: k.startswith(LOSS_PREFIX) and k not in _SKIP_CURVES,
         1.0),
        ("Evaluation metrics (%)", lambda k: k.startswith(EVAL_PREFIXES)
         and not k.endswith(_COUNT_SUFFIXES), 100.0),
        ("NIR mechanism (training-class probe)", lambda k: k in _MECHANISM_CURVES, 1.0),
    ]
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    figures = []
    for title, wanted, scale in groups:
        keys = sorted({k for r in records for k, v in r.items() if wanted(k) and _is_number(v)})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7.0, 3.4))
        for key in keys:
            pts = [(e, scale * r[key]) for e, r in zip(epochs, records)
                   if _is_number(r.get(key))]
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=4,
                    linestyle="-" if len(xs) > 2 else "none", label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if max(epochs) - min(epochs) < 2:
            ax.set_xlim(min(epochs) - 0.75, max(epochs) + 0.75)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        figures.append((title, figure_uri(fig)))
    return figures


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------ grid
def retrieval_grid(checkpoint: Path, k: int = 5, num_queries: int = 6, device: str = "cpu",
                   data_root: str | None = None, seed: int = 0) -> list[GridRow]:
    """Top-``k`` results of ``num_queries`` test queries (of distinct classes when possible).

    Raises a NirdmlError/OSError when the checkpoint or dataset is unavailable.
    """
    from nirdml.inference import TrainedRun
    from nirdml.retrieval.faiss_index import IndexSpec, build_index, search_index

    run = TrainedRun.open(checkpoint, device, data_root)
    test, kind = run.split("test"), run.splits.image_kind
    emb = run.embed(test)
    n = len(emb.labels)
    queries_mask = np.ones(n, bool) if emb.is_query is None else np.asarray(emb.is_query, bool)
    gallery_rows = (np.arange(n) if emb.is_gallery is None
                    else np.flatnonzero(np.asarray(emb.is_gallery, bool)))
    same_set = emb.is_gallery is None
    k = min(k, len(gallery_rows) - (1 if same_set else 0))
    if k < 1:
        raise ConfigError("the test split is too small for a retrieval grid")
    order = np.random.default_rng(seed).permutation(np.flatnonzero(queries_mask))
    chosen, seen = [], set()
    for i in order:  # one query per class first, then fill up
        if int(emb.labels[i]) not in seen:
            chosen.append(int(i))
            seen.add(int(emb.labels[i]))
        if len(chosen) == num_queries:
            break
    chosen += [int(i) for i in order if int(i) not in chosen][: num_queries - len(chosen)]
    index, _ = build_index(emb.embeddings[gallery_rows], IndexSpec("flat"))
    extra = 1 if same_set else 0
    scores, ids = search_index(index, emb.embeddings[chosen], min(k + extra, len(gallery_rows)))
    names = getattr(test, "class_names", None)

    def label_name(label: int) -> str:
        return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)

    rows = []
    for q, i in enumerate(chosen):
        hits = [(int(gallery_rows[j]), float(s)) for j, s in zip(ids[q], scores[q])
                if int(gallery_rows[j]) != i][:k]
        row = GridRow(tensor_thumbnail(test[i][0], image_kind=kind),
                      label_name(int(emb.labels[i])))
        for j, s in hits:
            row.results.append({"uri": tensor_thumbnail(test[j][0], image_kind=kind), "score": s,
                                "label": label_name(int(emb.labels[j])),
                                "correct": int(emb.labels[j]) == int(emb.labels[i])})
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ page
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12px;max-height:480px}
table.metrics{border-collapse:collapse}table.metrics td,table.metrics th{border:1px solid #ddd;
padding:3px 10px;text-align:left}table.metrics td.num{text-align:right;font-family:monospace}
.note{color:#8a5a00;background:#fff8e6;padding:6px 10px;border-left:4px solid #f0b429}
figure{display:inline-block;margin:8px}figcaption{font-size:12px;color:#555}
table.grid td{vertical-align:top;text-align:center;font-size:11px;padding:3px}
table.grid img{display:block;margin:auto;border:4px solid #888}
table.grid td.query img{border-color:#3366cc}table.grid td.hit img{border-color:#1a9e3a}
table.grid td.miss img{border-color:#d62728}
"""

# marks <body data-images-ok="true|false" data-js-errors="N"> once the page has loaded
_SCRIPT = """
(function(){var errors=0;window.addEventListener('error',function(){errors++;},true);
window.addEventListener('load',function(){var imgs=document.images,ok=true;
for(var i=0;i<imgs.length;i++){if(!(imgs[i].complete&&imgs[i].naturalWidth>0)){ok=false;}}
document.body.dataset.imagesOk=ok?'true':'false';document.body.dataset.imageCount=imgs.length;
document.body.dataset.jsErrors=String(errors);});})();
"""


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def _table(items: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th>"
        f"<td class=\"{'num' if _is_number(v) else 'text'}\">{html.escape(_fmt(v))}</td></tr>"
        for k, v in items.items())
    return f'<table class="metrics"><tbody>{rows}</tbody></table>'


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _grid_html(rows: list[GridRow], k: int) -> str:
    head = "<tr><th>query</th>" + "".join(f"<th>#{j + 1}</th>" for j in range(k)) + "</tr>"
    body = []
    for row in rows:
        cells = [f'<td class="query"><img src="{row.query}" alt="query, class '
                 f'{html.escape(row.query_label)}"><br>class {html.escape(row.query_label)}</td>']
        for r in row.results:
            cls = "hit" if r["correct"] else "miss"
            cells.append(
                f'<td class="{cls}"><img src="{r["uri"]}" alt="{cls}, class '
                f'{html.escape(r["label"])}" title="score {r["score"]:.3f}"><br>'
                f'{html.escape(r["label"])} ({r["score"]:.2f})</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="grid"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 k: int = 5, num_queries: int = 6, checkpoint: str | os.PathLike | None = None,
                 device: str = "cpu", data_root: str | None = None, grid: bool = True,
                 seed: int = 0) -> Path:
    """Write the HTML report of ``run_dir`` to ``out`` (default ``run_dir/report.html``).

    Sections, most useful first: test metrics, retrieval examples, training curves (loss terms,
    evaluation metrics in percent, the NIR mechanism metrics), structure diagnostics (headline
    numbers; the whole ``analysis.json`` folded), configuration.
    """
    from nirdml import __version__
    from nirdml.files import atomic_write_text

    run = RunDir(run_dir)
    if not run.metrics.is_file():  # reading only: a run someone else wrote will do
        raise ConfigError(f"{str(run.root)!r} is not a training run (no metrics.jsonl in "
                          f"it); pass the --out folder of nirdml train")
    if k < 1 or num_queries < 1:
        raise ConfigError("k and the number of queries must be >= 1")
    out = Path(out) if out is not None else run.report
    ckpt = Path(checkpoint) if checkpoint else run.checkpoint("best.pt")
    root = run.root.resolve()
    parts = [f"<h1>nirdml run report: {html.escape(root.name)}</h1>",
             f"<p>{html.escape(str(root))} &middot; generated "
             f"{time.strftime('%Y-%m-%d %H:%M')} by nirdml {html.escape(__version__)}</p>",
             _metrics_section(run),
             _grid_section(ckpt, grid, k, num_queries, device, data_root, seed),
             _curves_section(run.records()),
             _analysis_section(run),
             _config_section(run)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"{GENERATOR_META}{html.escape(__version__)}\">"
            f"<title>nirdml report: {html.escape(root.name)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


#: how a report marks itself as nirdml's (the version follows, then ``">``)
GENERATOR_META = '<meta name="generator" content="nirdml '
#: how every report began before it carried the generator tag
_OLD_REPORT_START = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                     '<title>nirdml report: ')


def is_report_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HTML report :func:`build_report` wrote: its head carries the
    generator tag (or, written by an older nirdml, it begins exactly as those reports did)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    start = head.split("<style>", 1)[0]
    return GENERATOR_META in start or head.startswith(_OLD_REPORT_START)


def _section(name: str, title: str, body: list[str]) -> str:
    return f'<section id="{name}"><h2>{html.escape(title)}</h2>' + "".join(body) + "</section>"


def _metrics_section(run: RunDir) -> str:
    final, problem = _read_json(run.final)
    if not isinstance(final, dict):
        return _section("metrics", "Test metrics",
                        [_note(problem or "final.json does not hold a JSON object")])
    shown = {k: (f"{100 * v:.2f} %" if _is_number(v) and not isinstance(v, int)
                 and k not in ("selected_epoch",) else v)
             for k, v in _flatten(final).items()}
    return _section("metrics", "Test metrics", [_table(shown)])


def _grid_section(ckpt: Path, grid: bool, k: int, num_queries: int, device: str,
                  data_root: str | None, seed: int) -> str:
    title = "Retrieval examples (test split)"
    if not grid:
        return _section("retrieval", title, [_note("retrieval grid not requested")])
    if not ckpt.is_file():
        return _section("retrieval", title, [_note(f"retrieval grid skipped: no checkpoint "
                                                   f"{ckpt}")])
    try:
        rows = retrieval_grid(ckpt, k=k, num_queries=num_queries, device=device,
                              data_root=data_root, seed=seed)
    except (NirdmlError, OSError) as exc:
        return _section("retrieval", title, [_note(
            f"retrieval grid skipped: the test data is not available "
            f"({type(exc).__name__}: {exc})")])
    return _section("retrieval", title, [
        f"<p>{len(rows)} test queries and their top-{len(rows[0].results)} neighbours from "
        f"{html.escape(ckpt.name)}; green: same class, red: another class.</p>",
        _grid_html(rows, len(rows[0].results))])


def _curves_section(records: list[dict[str, Any]]) -> str:
    figures = plot_curves(records) if records else []
    if not figures:
        return _section("curves", "Training curves", [_note("no metrics.jsonl records to plot")])
    return _section("curves", "Training curves", [
        f'<figure><img src="{uri}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
        f"</figcaption></figure>" for t, uri in figures])


#: the headline numbers of ``analysis.json`` shown as a table (the rest is folded)
ANALYSIS_HEADLINE = ("rho", "pi_density", "sigma2_kappa", "g2", "num_samples", "num_classes",
                     "flow_samples.condition_gain_nats", "flow_samples.class_id_acc",
                     "flow_samples.cos_between", "flow_samples.flow_drift")


def _analysis_section(run: RunDir) -> str:
    adir = run.analysis
    pngs = sorted(adir.glob("*.png")) if adir.is_dir() else []
    analysis, _ = _read_json(adir / "analysis.json")
    body = []
    if not pngs and analysis is None:
        body.append(_note(f"no diagnostics; run: nirdml analyze --checkpoint "
                          f"{run.checkpoint('best.pt')} --out {adir}"))
    if isinstance(analysis, dict):
        flat = _flatten(analysis)
        body.append(_table({k: flat[k] for k in ANALYSIS_HEADLINE if k in flat}))
    body += [f'<figure><img src="{png_data_uri(png.read_bytes())}" alt="{html.escape(png.stem)}">'
             f"<figcaption>{html.escape(png.name)}</figcaption></figure>" for png in pngs]
    if isinstance(analysis, dict):
        body.append("<details><summary>all of analysis.json</summary>"
                    f"<pre>{html.escape(json.dumps(analysis, indent=1))}</pre></details>")
    return _section("analysis", "Structure diagnostics", body)


def _config_section(run: RunDir) -> str:
    cfg_path = run.config
    if not cfg_path.is_file():
        return _section("config", "Configuration", [_note("config.yaml not found")])
    return _section("config", "Configuration", [
        "<details><summary>config.yaml</summary>"
        f"<pre>{html.escape(cfg_path.read_text(errors='replace'))}</pre></details>"])
