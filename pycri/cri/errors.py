"""The one table from pycri exceptions to gRPC status codes, and the wrapper
that applies it to every RPC of the CRI server.

Order matters: the first row whose type matches wins, so subclasses come
before their bases (AuthenticationError before RegistryError, InvalidImageError
and NotFoundError before anything broader).

Choices worth a word:

* ``DigestMismatchError`` and ``InvalidLayerError`` -> ``DATA_LOSS``. The bytes
  that arrived are not the bytes the image names (or are not a usable layer).
  Nothing was kept, and the caller's request was fine, so this is neither
  INVALID_ARGUMENT nor FAILED_PRECONDITION (which would mean "fix the node's
  state first"); gRPC's name for corrupt data is DATA_LOSS.
* ``AuthenticationError`` -> ``UNAUTHENTICATED``: the registry refused the
  credentials (or wanted some). ``InsecureRegistryError`` -> ``PERMISSION_DENIED``:
  pycri itself refused, for safety, to talk to the registry that way.
* ``RegistryError`` -> ``UNAVAILABLE``: the registry failed; a retry may work.
* Python's ``TimeoutError`` -> ``DEADLINE_EXCEEDED``.
* Any other ``PycriError`` -> ``UNKNOWN``; any other exception is a bug in pycri:
  ``INTERNAL``, logged with its traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from pycri import errors as e

log = logging.getLogger("pycri.cri")

STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (e.InsecureRegistryError, grpc.StatusCode.PERMISSION_DENIED),
    (e.RegistryError, grpc.StatusCode.UNAVAILABLE),
    (e.DigestMismatchError, grpc.StatusCode.DATA_LOSS),
    (e.InvalidLayerError, grpc.StatusCode.DATA_LOSS),
    (e.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.PycriError, grpc.StatusCode.UNKNOWN),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for ``exc`` (INTERNAL when pycri did not mean to raise it)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _details(exc: BaseException, code: grpc.StatusCode) -> str:
    msg = str(exc) or type(exc).__name__
    if code == grpc.StatusCode.INTERNAL:
        return f"internal error: {type(exc).__name__}: {msg}"
    return msg


def _fail(name: str, exc: Exception, context: grpc.ServicerContext, t0: float) -> None:
    code = status_for(exc)
    details = _details(exc, code)
    ms = (time.monotonic() - t0) * 1000
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed after %.1f ms: %s", name, ms, details, exc_info=exc)
    else:
        log.info("%s -> %s after %.1f ms: %s", name, code.name, ms, details)
    context.abort(code, details)  # raises; grpc sends the status


F = TypeVar("F", bound=Callable[..., Any])


def rpc(fn: F) -> F:
    """Turn exceptions raised by one RPC method into gRPC statuses, via STATUS_TABLE.

    Works for unary methods and for server-streaming (generator) methods.
    """
    name = fn.__name__

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            t0 = time.monotonic()
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - the table decides
                _fail(name, exc, context, t0)
            else:
                log.debug("%s ok in %.1f ms", name, (time.monotonic() - t0) * 1000)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.monotonic()
        try:
            reply = fn(self, request, context)
        except Exception as exc:
            _fail(name, exc, context, t0)
            raise  # not reached: abort() raised
        log.debug("%s ok in %.1f ms", name, (time.monotonic() - t0) * 1000)
        return reply

    return unary  # type: ignore[return-value]
