"""Model export: :func:`export_model` writes a checkpoint's embedding network as ONNX or
TorchScript, checked against PyTorch; :func:`run_exported` and :func:`read_export_metadata`
use such a file. See :mod:`nirdml.export.model`."""

from __future__ import annotations

from nirdml.export.model import (
    FORMATS,
    ExportResult,
    export_model,
    read_export_metadata,
    run_exported,
)

__all__ = ["FORMATS", "ExportResult", "export_model", "read_export_metadata", "run_exported"]
