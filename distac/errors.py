"""Errors users can cause. Each message names the offending tensor, file or field."""


class DistacError(Exception):
    """Base class for every error distac raises on bad input."""


class CheckpointError(DistacError):
    """A checkpoint is missing, unreadable, corrupt or of an unknown format."""


class MismatchError(DistacError):
    """Two checkpoints or task vectors disagree on keys, shapes or dtypes."""


class NonFiniteError(DistacError):
    """A tensor holds NaN or Inf values."""


class ConfigError(DistacError):
    """An unknown method, hyperparameter or configuration value."""


class OutputError(DistacError):
    """An output location would overwrite an input or files that distac did not write."""
