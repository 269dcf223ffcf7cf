"""Argument types the commands share: numbers checked by argparse as it reads the command line.

A bad value stops the command before any work with argparse's usual message, e.g.
``nirdml embed: error: argument --batch-size: must be an integer >= 1, got '0'``. Light on
purpose (no torch): ``nirdml --help`` imports every command.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
