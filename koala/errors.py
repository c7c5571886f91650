"""Errors that tell the user what is wrong and what to do."""


class KoalaError(Exception):
    """Base class of koala's user-facing errors."""


class CheckpointError(KoalaError):
    """A checkpoint is missing, unreadable, incomplete or corrupt."""


class UnsupportedModelError(KoalaError):
    """The target's architecture or one of its settings is not implemented."""


class ContextLengthError(KoalaError):
    """The prompt plus the tokens to generate do not fit in the KV cache."""


class SamplingError(KoalaError, ValueError):
    """Sampling settings that make no sense."""


class HeadMismatchError(KoalaError):
    """A draft head was trained for another target or has the wrong kind or size."""
