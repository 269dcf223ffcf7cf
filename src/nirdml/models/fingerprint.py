"""A model fingerprint: which weights produced a set of embeddings (an index and an export
record it; retrieval checks a checkpoint against it)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_dict_fingerprint(state_dict: Mapping[str, torch.Tensor], embedding_dim: int) -> str:
    """sha256 (hex) of a state dict's tensors in sorted key order, plus the embedding dim.

    Each entry contributes its name, dtype, shape and raw bytes, so any changed weight, buffer
    or architecture gives a different fingerprint; the device the tensors live on does not.
    """
    h = hashlib.sha256()
    h.update(f"nirdml-fingerprint-v1;embedding_dim={int(embedding_dim)};".encode())
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):  # extra state: hash its repr
            h.update(f"{key};{value!r};".encode())
            continue
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key};{t.dtype};{tuple(value.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of an ``EmbeddingModel`` (its state dict and ``embedding_dim``)."""
    dim = getattr(model, "embedding_dim", None)
    if dim is None:
        raise TypeError("model_fingerprint needs a model with an embedding_dim attribute")
    return state_dict_fingerprint(model.state_dict(), dim)
