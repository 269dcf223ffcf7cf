"""What the commands share on the command line: argument types and the common options.

* Types: numbers checked by argparse as it reads the command line. A bad value stops the
  command before any work with argparse's usual message, e.g.
  ``nirdml embed: error: argument --batch-size: must be an integer >= 1, got '0'``.
* Options: ``--device``, ``--batch-size``, ``--data-root``, ``--num-workers`` and
  ``--overwrite`` are declared here once (``add_device_option`` ...), with one default and one
  wording, for every command that takes them. ``--device`` defaults to ``auto`` everywhere:
  CUDA when available, else the CPU (``nirdml.devices.resolve_device``).

Light on purpose (no torch): ``nirdml --help`` imports every command.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, k, image sizes)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (worker counts, class counts where 0 turns a feature off)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (memory sizes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for integers in ``[low, high]``."""

    def in_range(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, "
                                             f"got {text!r}")
        return value

    in_range.__name__ = f"int_in_{low}_{high}"
    return in_range


# ---- the options several commands take ---------------------------------------------------------
#: what ``auto`` means, in every ``--device`` help (``nirdml.devices.resolve_device``)
DEVICE_CHOICES_HELP = "cpu, cuda, cuda:N or auto (auto: cuda when available, else cpu)"


def add_device_option(parser: Any, use: str = "") -> None:
    """``--device`` (default ``auto``); ``use`` says what it runs, e.g. ``"for embedding"``."""
    lead = f"device {use}: " if use else ""
    parser.add_argument("--device", default="auto", help=lead + DEVICE_CHOICES_HELP)


def add_batch_size_option(parser: Any, default: int | None = None) -> None:
    """``--batch-size``: images per forward pass (None: the run's ``data.eval_batch_size``)."""
    shown = "the run's data.eval_batch_size" if default is None else str(default)
    parser.add_argument("--batch-size", type=positive_int, default=default,
                        help=f"images per forward pass (default: {shown})")


def add_data_root_option(parser: Any, lead: str = "") -> None:
    """``--data-root``: where the run's dataset lies now (``lead`` starts the help, e.g.
    ``"with --checkpoint: "``)."""
    parser.add_argument("--data-root", default=None,
                        help=f"{lead}dataset root, if it moved since training")


def add_num_workers_option(parser: Any, default: int | None = None) -> None:
    """``--num-workers``: image loading processes (None: the run's ``data.num_workers``)."""
    shown = "the run's data.num_workers" if default is None else str(default)
    parser.add_argument("--num-workers", type=non_negative_int, default=default,
                        help=f"image loading processes (default: {shown})")


def add_overwrite_option(parser: Any, kind: str) -> None:
    """``--overwrite``: replace ``--out`` even when it is not ``kind`` (e.g. ``"a report"``)
    that nirdml wrote (``nirdml.files.check_output_file``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace --out even when it is not {kind} nirdml wrote")
