"""Model export: :func:`export_model` writes a checkpoint's embedding network as ONNX or
TorchScript, checked against PyTorch; :func:`run_exported` and :func:`read_export_metadata`
use such a file. See :mod:`nirdml.export.model`."""

from __future__ import annotations

from nirdml.export.model import (
    FORMATS,
    SUFFIXES,
    ExportResult,
    check_export_options,
    export_model,
    is_export_file,
    onnx_opset_range,
    read_export_metadata,
    run_exported,
)

__all__ = ["FORMATS", "SUFFIXES", "ExportResult", "check_export_options", "export_model",
           "is_export_file", "onnx_opset_range", "read_export_metadata", "run_exported"]
