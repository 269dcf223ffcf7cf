"""What a person reads on the console: readable progress bars, metrics in percent."""

from __future__ import annotations

import io
import re

from nirdml.console import epoch_line, format_metrics_table, progress_bar
from nirdml.evaluation import is_headline


def test_training_bar_keeps_its_width_next_to_the_loss(monkeypatch):
    out = io.StringIO()
    bar = progress_bar(192, "epoch 3/20", "batch", file=out, disable=False, ncols=160,
                       dynamic_ncols=False)
    bar.set_postfix_str("loss 3.257, 1281 img/s")
    bar.update(57)
    line = out.getvalue().split("\r")[-1]
    cells = re.search(r"\|(.*)\|", line).group(1)
    assert len(cells) == 24 and "loss 3.257" in line and len(line) <= 160
    bar.close()


def test_epoch_line_shows_metrics_in_percent():
    record = {"epoch": 4, "train/proxy": 3.2571, "train/nir": 1.2e-7, "train/nll_max": 9.0,
              "train/bad_steps": 0, "time/epoch_s": 13.5, "time/images_per_s": 1280.9,
              "val/recall@1": 0.9599, "val/map@r": 0.5057, "val/num_queries": 1920,
              "test/recall@1": 0.2002}
    line = epoch_line(record, 20, show=lambda key: is_headline(key, brief=True))
    assert line.startswith("epoch 4/20 (13.5 s, 1281 img/s)")
    assert "val/recall@1 95.99%" in line and "val/map@r 50.57%" in line
    assert "test/recall@1 20.02%" in line and "0.5057" not in line
    assert "nll_max" not in line and "bad_steps" not in line


def test_metrics_table_is_in_percent_counts_as_integers():
    table = format_metrics_table({"recall@1": 0.50571, "map@r": 0.2, "num_queries": 1920})
    assert re.search(r"recall@1\s+50\.57$", table, re.M)
    assert re.search(r"num_queries\s+1920$", table, re.M) and "0.5057" not in table
