"""nirdml: proxy-based Deep Metric Learning with Non-isotropy Regularization (NIR).

The package is laid out along the pipeline::

    data -> models -> losses (+ nir regulariser) -> training -> evaluation -> retrieval

and around it: ``inference`` (a trained checkpoint and the embeddings it gives), ``selection``
(cross-validation and hyperparameter search), ``analysis`` (structure diagnostics), ``export``
(ONNX / TorchScript) and ``reports`` (the HTML run report).

Sub-packages are imported lazily so that ``import nirdml`` stays cheap.
"""

from __future__ import annotations

from nirdml.lazy import lazy_attributes

__version__ = "0.1.0"

_SUBMODULES = (
    "analysis", "data", "evaluation", "export", "inference", "losses", "models", "nir", "reports",
    "retrieval", "selection", "training",
)

__getattr__, __dir__ = lazy_attributes(__name__, {}, _SUBMODULES)
