"""Checkpoint files that hold no code: tensors as safetensors, everything else as JSON.

Format 2 (this one): ``NIRDMLC2`` (8 bytes), the sha256 of the body (32 bytes), then the body,
a `safetensors <https://github.com/huggingface/safetensors>`_ file. Its tensors are every tensor
and NumPy array of the state, its ``__metadata__`` one JSON document: the state with each
tensor replaced by a reference (:func:`encode_state`). Reading it parses JSON and copies
tensor bytes; nothing in the file is ever executed, so a checkpoint handed over by someone else
is as safe to open as an image. The digest proves integrity (a truncated copy, a flipped bit),
not origin.

Format 1 (nirdml <= 0.1.0 before this change) was a pickle: opening one can run arbitrary code.
:func:`load_checkpoint` refuses it with a one-line :class:`CheckpointError`; a user who made the
file, or trusts whoever did, converts it once with ``nirdml upgrade-checkpoint FILE --trust``
(:func:`upgrade_checkpoint`), which is the only place nirdml unpickles anything.

Writing is atomic: the bytes go to ``NAME.tmp`` in the same folder, are flushed to disk, and
replace ``NAME`` in one ``os.replace``. The previous good file is kept as ``NAME.prev``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.errors import CheckpointError

FORMAT_VERSION = 2
_MAGIC = b"NIRDMLC2"  # 8 bytes, then 32 bytes sha256 of the body, then the body (safetensors)
_MAGIC_V1 = b"NIRDMLCK"  # format 1: the body was a torch pickle
_META_KEY = "nirdml_checkpoint"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on its JSON header

#: keys a checkpoint of ``nirdml train`` holds, with the types their values must have
SCHEMA: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "config": (dict,), "model": (dict,), "criterion": (dict,),
    "optimizer": (dict,), "scheduler": (dict, type(None)), "scaler": (dict,),
    "epoch": (int,), "batch_in_epoch": (int,), "global_step": (int,),
    "best_score": (int, float), "best_epoch": (int, type(None)), "bad_steps_total": (int,),
    "num_classes": (int,), "in_chans": (int, type(None)), "image_kind": (str, type(None)),
    "preprocessing": (dict, type(None)), "world_size": (int,), "rng": (dict,),
    "flow_init": (dict, type(None)),
}
#: what resuming a training run reads
TRAINER_KEYS = tuple(k for k in SCHEMA if k != "format_version")
#: what using a trained model (evaluate, embed, export, index, search, report) reads
MODEL_KEYS = ("config", "model")


# ---- the state as JSON + tensors ---------------------------------------------------------------
def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: ``state`` as a JSON-able value whose tensors and NumPy arrays
    are references into ``tensors``. Handles dicts (any int/str keys), lists, tuples, str,
    int, float (inf/nan too), bool, None; anything else is a programming error (TypeError)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def tensor_ref(t: torch.Tensor) -> str:
        t = t.detach().cpu()
        storage = t.untyped_storage()
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == storage.nbytes())
        if not whole or (storage.nbytes() and storage.data_ptr() in storages):
            t = t.clone(memory_format=torch.contiguous_format)  # safetensors stores whole,
            storage = t.untyped_storage()                      # unshared storages only
        storages.add(storage.data_ptr())
        name = str(len(tensors))
        tensors[name] = t
        return name

    def enc(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": tensor_ref(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biuf":
                raise TypeError(f"cannot store a NumPy array of dtype {obj.dtype}")
            raw = torch.from_numpy(np.ascontiguousarray(obj).view(np.uint8).reshape(-1).copy())
            return {"__ndarray__": tensor_ref(raw), "dtype": obj.dtype.str,
                    "shape": list(obj.shape)}
        if isinstance(obj, np.generic):
            obj = obj.item()
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, tuple):
            return {"__tuple__": [enc(v) for v in obj]}
        if isinstance(obj, list):
            return [enc(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: enc(v) for k, v in obj.items()}
            if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in obj):
                raise TypeError("cannot store a dict whose keys are not str or int")
            return {"__items__": [[k, enc(v)] for k, v in obj.items()]}
        raise TypeError(f"cannot store a value of type {type(obj).__name__} in a checkpoint")

    return enc(state), tensors


def decode_state(skeleton: Any, tensors: dict[str, torch.Tensor], where: str = "checkpoint"
                 ) -> Any:
    """The inverse of :func:`encode_state`; a reference to a missing tensor, an unknown tag or a
    value of the wrong shape raises CheckpointError."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where} is damaged ({what}); it was not written by this nirdml")

    def tensor(name: Any) -> torch.Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise bad(f"reference to a missing tensor {name!r}")
        return tensors[name]

    def dec(obj: Any, depth: int = 0) -> Any:
        if depth > 100:
            raise bad("nested too deeply")
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        if isinstance(obj, list):
            return [dec(v, depth + 1) for v in obj]
        if not isinstance(obj, dict):
            raise bad(f"a value of type {type(obj).__name__}")
        if "__tensor__" in obj:
            return tensor(obj["__tensor__"])
        if "__ndarray__" in obj:
            raw, dtype, shape = tensor(obj["__ndarray__"]), obj.get("dtype"), obj.get("shape")
            try:
                dt = np.dtype(dtype)
                if dt.kind not in "biuf" or raw.dtype != torch.uint8:
                    raise ValueError(dtype)
                return np.frombuffer(raw.numpy().tobytes(), dtype=dt).reshape(shape).copy()
            except (TypeError, ValueError) as exc:
                raise bad(f"an array of dtype {dtype!r} and shape {shape!r}") from exc
        if "__float__" in obj:
            text = obj["__float__"]
            if text not in ("inf", "-inf", "nan"):
                raise bad(f"a float {text!r}")
            return float(text)
        if "__tuple__" in obj:
            items = obj["__tuple__"]
            if not isinstance(items, list):
                raise bad("a tuple that is not a list")
            return tuple(dec(v, depth + 1) for v in items)
        if "__items__" in obj:
            items = obj["__items__"]
            out = {}
            for pair in items if isinstance(items, list) else [None]:
                if not (isinstance(pair, list) and len(pair) == 2
                        and isinstance(pair[0], str | int) and not isinstance(pair[0], bool)):
                    raise bad("a dict item that is not a [key, value] pair")
                out[pair[0]] = dec(pair[1], depth + 1)
            return out
        if any(k.startswith("__") for k in obj):
            raise bad(f"an unknown tag {next(k for k in obj if k.startswith('__'))!r}")
        return {k: dec(v, depth + 1) for k, v in obj.items()}

    return dec(skeleton)


# ---- files -------------------------------------------------------------------------------------
def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """The bytes of a format-2 checkpoint of ``state`` (header, digest, safetensors body)."""
    from safetensors.torch import save

    skeleton, tensors = encode_state({"format_version": FORMAT_VERSION, **state})
    body = save(tensors, metadata={_META_KEY: json.dumps(skeleton, allow_nan=False)})
    return _MAGIC + hashlib.sha256(body).digest() + body


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> Path:
    """Write ``state`` to ``path`` atomically; the previous file (if any) becomes ``path.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = checkpoint_bytes(state)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write checkpoint {str(path)!r}{hint}: {exc.strerror or exc}; "
            f"the previous checkpoint is intact"
        ) from exc
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu",
                    require: Iterable[str] = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no code is run: see the module
    docstring). CheckpointError, one line, for a missing, corrupt, foreign or format-1 file,
    for a known key of the wrong type, and for a key of ``require`` that is absent."""
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist" + (
            " (it is a folder; give the .pt file inside it)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if data[: len(_MAGIC_V1)] == _MAGIC_V1:
        raise CheckpointError(
            f"{where} is in nirdml's old format 1, a pickle that can run code when opened, so "
            f"nirdml no longer opens it; if you made it (or trust who did), convert it once "
            f"with: nirdml upgrade-checkpoint {path} --trust")
    if data[: len(_MAGIC)] != _MAGIC or len(data) < len(_MAGIC) + 32:
        raise CheckpointError(f"{str(path)!r} is not a nirdml checkpoint (or its header is "
                              f"truncated)" + _prev_hint(path))
    digest, body = data[len(_MAGIC): len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{where} is corrupt or truncated (checksum mismatch)"
                              + _prev_hint(path))
    state = _parse_body(body, where)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format {state.get('format_version')!r}, this "
                              f"nirdml reads format {FORMAT_VERSION}")
    check_state(state, where, require)
    if map_location is not None and str(map_location) != "cpu":
        state = _to_device(state, map_location)
    return state


def check_state(state: dict[str, Any], where: str, require: Iterable[str] = ()) -> None:
    """CheckpointError unless every key of ``require`` is in ``state`` and every known key
    (:data:`SCHEMA`) has a value of its type; model/criterion/optimizer weights must be
    tensors keyed by name."""
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(map(repr, missing))} (it holds "
                              f"{', '.join(sorted(state)) or 'nothing'}); it is not a checkpoint "
                              f"of nirdml train")
    for key, types in SCHEMA.items():
        if key in state:
            value = state[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, not "
                                      f"{names}; the file is damaged or not nirdml's")
    for key in ("model", "flow_init"):
        weights = state.get(key)
        if isinstance(weights, dict) and not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
            raise CheckpointError(f"{where}: {key!r} is not a mapping of names to tensors; the "
                                  f"file is damaged or not nirdml's")


def _parse_body(body: bytes, where: str) -> dict[str, Any]:
    """The state in a safetensors body (its JSON metadata and its tensors)."""
    from safetensors.torch import load

    if len(body) < 8:
        raise CheckpointError(f"{where} is truncated (no safetensors header)")
    (size,) = struct.unpack("<Q", body[:8])
    if size > min(_MAX_HEADER, len(body) - 8):
        raise CheckpointError(f"{where} is damaged (header of {size} bytes)")
    try:
        header = json.loads(body[8: 8 + size])
        skeleton = json.loads(header["__metadata__"][_META_KEY])
        tensors = load(body)
    except Exception as exc:  # noqa: BLE001 - JSON or safetensors: any failure is a bad file
        raise CheckpointError(f"{where} cannot be read "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                              if str(exc) else f"{where} cannot be read") from None
    state = decode_state(skeleton, tensors, where)
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is damaged (its state is not a mapping)")
    return state


def _to_device(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def upgrade_checkpoint(path: str | Path, out: str | Path | None = None, *,
                       trust: bool = False) -> Path:
    """Convert a format-1 checkpoint (a pickle) to format 2 at ``out`` (default: in place, the
    old file kept as ``NAME.format1``). Unpickling runs code from the file, so this needs
    ``trust=True``: use it only on files you made or whose maker you trust."""
    path = Path(path)
    if not trust:
        raise CheckpointError("converting a format-1 checkpoint unpickles it, which runs any "
                              "code it holds; pass --trust if you made the file or trust who "
                              "did")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    if data[: len(_MAGIC)] == _MAGIC:
        raise CheckpointError(f"{str(path)!r} is in format 2 already; nothing to do")
    if data[: len(_MAGIC_V1)] != _MAGIC_V1 or len(data) < len(_MAGIC_V1) + 32:
        raise CheckpointError(f"{str(path)!r} is not a format-1 nirdml checkpoint")
    digest, payload = data[8:40], data[40:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated "
                              f"(checksum mismatch)")
    import io

    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a bad pickle
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a state mapping")
    state.pop("format_version", None)
    target = Path(out) if out is not None else path
    if target != path and (target.exists() or target.is_symlink()):
        raise CheckpointError(f"--out {str(target)!r} exists; choose a new path (nirdml does "
                              f"not overwrite a file it did not write)")
    if target == path:
        os.replace(path, path.with_name(path.name + ".format1"))
    try:
        save_checkpoint(state, target, keep_previous=False)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a value format 2 cannot "
                              f"store ({exc})") from None
    return target


def _prev_hint(path: Path) -> str:
    prev = path.with_name(path.name + ".prev")
    return f"; the previous good checkpoint is {str(prev)!r}" if prev.exists() else ""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
