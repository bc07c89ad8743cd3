"""The user-facing error types. Commands turn them into one clear message and a non-zero exit.

They carry a message that already names the file, record or key at fault, so no traceback is needed.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "IsubgError", "ResourceError"]


class IsubgError(Exception):
    """Base of every error a user can fix by changing their input."""


class ConfigError(IsubgError, ValueError):
    """A configuration cannot be used. The message is one paragraph naming file and key."""


class DataError(IsubgError, ValueError):
    """A data file is missing, malformed or inconsistent. The message names the file and the record."""


class ResourceError(IsubgError, RuntimeError):
    """The machine ran out of something the run needs (device memory). The message says what to change."""
