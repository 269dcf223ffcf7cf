"""The project's exception types: every user-facing failure says what is wrong and how to fix it."""

from __future__ import annotations


class NirdmlError(Exception):
    """Base class of every error nirdml raises on purpose (the CLI prints these without a trace)."""


class ConfigError(NirdmlError, ValueError):
    """A configuration key or value is invalid."""


class DatasetError(NirdmlError, FileNotFoundError):
    """A dataset root or layout is missing or malformed."""


class InputError(NirdmlError, ValueError):
    """Tensors or arrays handed to the library have the wrong shape, range or contents."""


class CheckpointError(NirdmlError, RuntimeError):
    """A checkpoint cannot be read, is corrupt, or does not match the model."""


class TrainingError(NirdmlError, RuntimeError):
    """Training cannot go on (for example: too many non-finite losses in a row)."""
