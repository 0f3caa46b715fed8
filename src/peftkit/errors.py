"""Named exception types. Every message says what to change."""

from __future__ import annotations

__all__ = [
    "PeftkitError",
    "ConfigError",
    "UnknownMethodError",
    "NoTargetMatchedError",
    "UnsupportedLayerError",
    "AdapterNameError",
    "CheckpointError",
    "CorruptCheckpointError",
    "ShapeMismatchError",
    "NonFiniteWeightError",
    "MergeError",
    "AssetMissingError",
    "DataError",
    "ExportError",
]


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose."""


class ConfigError(PeftkitError, ValueError):
    """A config field has an invalid value; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownMethodError(ConfigError):
    """The method (or config field) name is not registered."""


class NoTargetMatchedError(PeftkitError, ValueError):
    """`target_modules` matched nothing in the model."""


class UnsupportedLayerError(PeftkitError, TypeError):
    """A targeted module has a type the method cannot adapt."""


class AdapterNameError(PeftkitError, ValueError):
    """An adapter name is invalid, already taken, or unknown."""


class CheckpointError(PeftkitError, ValueError):
    """An adapter directory cannot be read or written."""


class CorruptCheckpointError(CheckpointError):
    """A file is truncated, not safetensors/JSON, or has missing/unexpected keys or bad dtypes."""


class ShapeMismatchError(CheckpointError):
    """A tensor in a checkpoint has a different shape than the model expects."""


class NonFiniteWeightError(PeftkitError, ValueError):
    """A tensor holds NaN or Inf where finite values are required."""


class MergeError(PeftkitError, RuntimeError):
    """A merge or unmerge cannot be done in the current state."""


class AssetMissingError(PeftkitError, FileNotFoundError):
    """An embedded model or dataset package is not installed; the message has the pip line."""


class DataError(PeftkitError, ValueError):
    """A dataset file is malformed or empty; the message names the file (and line)."""


class ExportError(PeftkitError, ValueError):
    """An adapter cannot be exported to the requested target without losing information."""
