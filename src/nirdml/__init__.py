"""nirdml: proxy-based Deep Metric Learning with Non-isotropy Regularization (NIR).

The package is laid out along the pipeline::

    data -> models -> losses (+ nir regulariser) -> training -> evaluation -> retrieval

and around it: ``run`` (a trained checkpoint and what follows from it), ``analysis`` (structure
diagnostics), ``export`` (ONNX / TorchScript) and ``reports`` (the HTML run report).

Sub-packages are imported lazily so that ``import nirdml`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis", "data", "evaluation", "export", "losses", "models", "nir", "reports", "retrieval",
    "run", "training",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"nirdml.{name}")
    raise AttributeError(f"module 'nirdml' has no attribute {name!r}")
