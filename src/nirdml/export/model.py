"""Export a checkpoint's embedding network to ONNX or TorchScript, checked against PyTorch.

The exported graph maps preprocessed images ``(B, C, H, W)`` float32 (the eval transform of the
checkpoint's ``image_kind``) to L2-normalised embeddings ``(B, D)``. The batch axis is dynamic;
``H`` and ``W`` are fixed at the size the eval transform produces (the small CNN's pooling
depends on the input size). The export's metadata records the model fingerprint, the input shape
and the image kind.

Before any work :func:`check_export_options` checks the output's suffix against the format
(``.onnx`` for ONNX; ``.pt``, ``.pth`` or ``.ts`` for TorchScript: :func:`run_exported` and
:func:`read_export_metadata` tell the formats apart by it), the image size and the opset
(:func:`onnx_opset_range`); :func:`is_export_file` recognises a file this module wrote.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nirdml.errors import CheckpointError, ConfigError, NirdmlError
from nirdml.models.fingerprint import model_fingerprint

FORMATS = ("onnx", "torchscript")
#: the file suffixes each format is written to (the first is the one to suggest)
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts")}
#: the lowest opset accepted: the exporter's base opset, the first with constant folding
MIN_OPSET = 9


def onnx_opset_range() -> tuple[int, int]:
    """``(lowest, highest)`` ONNX opset :func:`export_model` accepts: from ``MIN_OPSET`` to
    the highest the installed torch's TorchScript-based exporter writes (20 for torch 2.x;
    verified for the small CNN with onnxruntime from 8 to 23, the exporter refuses 24+)."""
    try:
        from torch.onnx import _constants

        highest = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                              _constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):  # pragma: no cover - other torch layouts
        highest = 20
    return MIN_OPSET, highest


def check_export_options(out: str | os.PathLike, fmt: str, image_size: int | None = None,
                         opset: int = 17) -> None:
    """One-line ConfigError for an unknown format, an ``out`` suffix that contradicts it, an
    image size below 1 or (ONNX) an opset outside :func:`onnx_opset_range`; no other work."""
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIXES[fmt]:
        given = f"a {suffix} file" if suffix else "a file without a suffix"
        raise ConfigError(f"--out {str(out)!r}: {'an' if fmt == 'onnx' else 'a'} {fmt} "
                          f"export goes to a "
                          f"{' / '.join(SUFFIXES[fmt])} file, not {given}; name it e.g. "
                          f"{Path(out).stem}{SUFFIXES[fmt][0]}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size
                                   or image_size < 1):
        raise ConfigError(f"--image-size must be an integer >= 1, got {image_size!r}")
    if fmt == "onnx":
        low, high = onnx_opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
            raise ConfigError(f"--opset {opset!r} is not supported; choose an ONNX opset from "
                              f"{low} to {high} (default 17)")


def is_export_file(path: str | os.PathLike, fmt: str) -> bool:
    """Whether ``path`` is a ``fmt`` export :func:`export_model` wrote: an ONNX model with
    ``nirdml.*`` metadata, or a TorchScript archive with the ``nirdml.json`` extra file (read
    from the zip's directory; the model is not loaded)."""
    import zipfile

    path = Path(path)
    if fmt == "torchscript":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/extra/nirdml.json") for name in archive.namelist())
        except (OSError, zipfile.BadZipFile, ValueError):
            return False
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not an ONNX model (onnx raises DecodeError and friends)
        return False
    return any(p.key == "nirdml.fingerprint" for p in proto.metadata_props)


@dataclass
class ExportResult:
    """Where the export went, its input shape and how far it is from PyTorch (max abs diff)."""

    path: Path
    format: str
    input_shape: tuple[int, int, int]
    embedding_dim: int
    max_abs_diff: float | None


def input_shape(run, image_size: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` the model of ``run`` (a :class:`~nirdml.inference.TrainedRun`) sees: square
    ``image_size`` if given, else the input size its preprocessing record holds (checkpoints
    older than the record derive it from their dataset)."""
    in_chans = int(run.state.get("in_chans") or getattr(run.model, "in_chans", None) or 3)
    if image_size is not None:
        return (in_chans, int(image_size), int(image_size))
    try:
        size = run.preprocessing.input_size
    except (NirdmlError, OSError) as exc:
        raise ConfigError(f"this checkpoint does not record its input size and its dataset "
                          f"{run.config.data.name!r} is not available ({exc}); pass "
                          f"--image-size") from None
    return (in_chans, *size)


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "onnx",
                 image_size: int | None = None, opset: int = 17, check: bool = True,
                 tolerance: float = 1e-4) -> ExportResult:
    """Export the embedding network of ``checkpoint`` to ``out`` (``fmt``: onnx|torchscript).

    With ``check`` the exported model is run on a random batch and compared with PyTorch;
    a difference above ``tolerance`` raises CheckpointError. ``out``, ``fmt``, ``image_size``
    and ``opset`` are checked first (:func:`check_export_options`).
    """
    from nirdml.inference import TrainedRun

    fmt = str(fmt).lower()
    check_export_options(out, fmt, image_size, opset)
    run = TrainedRun.open(checkpoint, device="cpu")
    model, cfg, state = run.model, run.config, run.state
    shape = input_shape(run, image_size)
    meta = {"fingerprint": model_fingerprint(model), "embedding_dim": model.embedding_dim,
            "input_shape": list(shape), "image_kind": state.get("image_kind"),
            "model": cfg.model.name, "dataset": cfg.data.name,
            "checkpoint": str(Path(checkpoint).resolve())}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # never a name a user file has
    try:
        if fmt == "onnx":
            _export_onnx(model, example, tmp, opset, meta)
        else:
            _export_torchscript(model, example, tmp, meta)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    diff = None
    if check:
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_exported(out, x.numpy(), fmt)
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:
            raise CheckpointError(f"the {fmt} export of {str(checkpoint)!r} differs from PyTorch "
                                  f"by {diff:.3g} (> {tolerance}); it was written to {out}")
    return ExportResult(out, fmt, shape, model.embedding_dim, diff)


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                 meta: dict) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError("ONNX export needs onnx: pip install 'nirdml[export]'") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        # the TorchScript-based exporter: the torch.export-based one needs onnxscript
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                              do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"this model cannot be exported at ONNX opset {opset} ({first}); "
                              f"try a newer opset such as --opset 17") from None
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"nirdml.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path,
                        meta: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"nirdml.json": json.dumps(meta)})


def run_exported(path: str | os.PathLike, images: np.ndarray, fmt: str | None = None
                 ) -> np.ndarray:
    """Embed ``images`` (B, C, H, W) float32 with an exported model file."""
    path = Path(path)
    fmt = fmt or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    x = np.ascontiguousarray(images, dtype=np.float32)
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError("running ONNX models needs onnxruntime: "
                              "pip install 'nirdml[export]'") from exc
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["embeddings"], {"images": x})[0]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
        return module(torch.from_numpy(x)).numpy()


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The ``nirdml.*`` metadata stored in an exported file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key[len("nirdml."):]: json.loads(p.value) for p in proto.metadata_props
                if p.key.startswith("nirdml.")}
    extra = {"nirdml.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["nirdml.json"] or "{}")
