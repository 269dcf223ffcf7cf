"""Reports about a training run: :func:`build_report` writes one self-contained HTML page
(metrics, a retrieval grid, curves, diagnostics, config); see :mod:`nirdml.reports.html`."""

from __future__ import annotations

from nirdml.reports.html import build_report

__all__ = ["build_report"]
