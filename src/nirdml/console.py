"""What a person reads on a terminal: progress bars and metric tables.

A shared leaf module: it imports nothing of nirdml, so every layer (embedding, evaluation,
training, the commands) can print the same way.

* :func:`progress_bar`: a tqdm bar on stderr with a fixed-width bar, silent when stderr is not
  a terminal.
* :func:`format_metrics_table` / :func:`print_metrics_table`: a metrics dict as a text table in
  percent (counts as integers; JSON output keeps the fractions).
* :func:`epoch_line`: the one line a training epoch prints (loss terms, then metrics in
  percent); which metrics it shows is the caller's choice (training shows the headline ones).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np


def progress_bar(total: int, desc: str, unit: str = "it", **options):
    """A tqdm bar on stderr with a fixed-width bar (readable next to long descriptions and a
    postfix); silent when stderr is not a terminal. ``options`` go to tqdm."""
    from tqdm.auto import tqdm

    options = {"leave": False, "dynamic_ncols": True, "file": sys.stderr, "disable": None,
               **options}
    return tqdm(total=total, desc=desc, unit=unit, **options,
                bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def format_metrics_table(results: dict, title: str | None = None) -> str:
    """A text table of metrics in percent (counts as integers); JSON keeps fractions."""
    width = max([len(k) for k in results] + [6])
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  {'%':>7}")
    lines.append("-" * (width + 9))
    for key, value in results.items():
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            lines.append(f"{key:<{width}}  {int(value):>7d}")
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            lines.append(f"{key:<{width}}  {'nan':>7}")
        elif key.startswith("threshold@"):  # a cosine, not a fraction
            lines.append(f"{key:<{width}}  {float(value):>7.4f} (cosine)")
        else:
            lines.append(f"{key:<{width}}  {100 * float(value):>7.2f}")
    return "\n".join(lines)


def print_metrics_table(results: dict, file: TextIO | None = None, title: str | None = None):
    """Print ``format_metrics_table(results)`` (to stdout by default)."""
    print(format_metrics_table(results, title=title), file=file or sys.stdout)


def epoch_line(record: dict[str, Any], epochs: int,
               show: Callable[[str], bool] = lambda key: True) -> str:
    """The console line of one epoch record: the ``train/`` loss terms, then the ``val/`` and
    ``test/`` metrics whose name (without the split) ``show`` accepts, in percent."""
    losses = "  ".join(f"{k[6:]} {v:.4g}" for k, v in record.items()
                       if k.startswith("train/") and k != "train/bad_steps"
                       and isinstance(v, float) and not k.endswith("_max"))
    metrics = "  ".join(f"{k} {100 * v:.2f}%" for k, v in record.items()
                        if k.startswith(("val/", "test/")) and isinstance(v, float)
                        and show(k.split("/")[1]))
    speed = f"{record['time/epoch_s']:.1f} s, {record['time/images_per_s']:.0f} img/s"
    return f"epoch {record['epoch']}/{epochs} ({speed})  {losses}" + (
        f"  |  {metrics}" if metrics else "")


__all__ = ["epoch_line", "format_metrics_table", "print_metrics_table", "progress_bar"]
