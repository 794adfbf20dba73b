"""The error vocabulary of pycri.

Every failure a caller can act on is one of these types. The C boundary raises
plain ``OSError`` (with errno and a message naming the syscall and path); the
object layer turns those into these domain errors with ``raise ... from``. The
CRI layer maps them to gRPC status codes in one table.
"""

from __future__ import annotations


class PycriError(Exception):
    """Base class of every error pycri raises on purpose."""


class NotFoundError(PycriError, LookupError):
    """The named image, blob, sandbox or container does not exist."""


class AlreadyExistsError(PycriError):
    """An object with that name or id already exists."""


class InvalidArgumentError(PycriError, ValueError):
    """The caller's input is malformed or not allowed."""


class InvalidStateError(PycriError):
    """The object exists but is not in a state that allows the operation."""


class DigestMismatchError(PycriError):
    """Content did not match its digest (or its diff_id); nothing was kept."""

    def __init__(self, message: str, expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InvalidLayerError(PycriError):
    """A layer tarball is malformed, truncated, or tries to escape its root."""


class InvalidImageError(InvalidArgumentError):
    """A manifest, index or image config is malformed or hostile."""


class UnsupportedError(PycriError):
    """A format or feature pycri (or this host) does not support."""


class ResourceExhaustedError(PycriError):
    """A size, ratio or count limit was hit (decompression bomb, huge JSON, output cap)."""


class RegistryError(PycriError):
    """The registry failed or answered something pycri cannot use."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(RegistryError):
    """The registry refused the credentials (or none were given and it wants some)."""


class InsecureRegistryError(RegistryError):
    """Refused for safety: plain http off loopback, a token realm that is not
    http(s), an https-to-http redirect, or credentials for another host."""


class RuntimeFailure(PycriError):
    """Starting or managing a process failed; ``stage`` says where."""

    def __init__(self, message: str, stage: str = "", errno: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.errno = errno


__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "DigestMismatchError",
    "InsecureRegistryError",
    "InvalidArgumentError",
    "InvalidImageError",
    "InvalidLayerError",
    "InvalidStateError",
    "NotFoundError",
    "PycriError",
    "RegistryError",
    "ResourceExhaustedError",
    "RuntimeFailure",
    "UnsupportedError",
]
