"""The CRI server's own gRPC transport: HTTP/2 and gRPC framing in C (csrc/h2srv.c,
over libnghttp2), method dispatch here.

grpcio passes every call between its polling thread, a pool worker and its
event-engine threads, ~0.2 ms per call before a handler runs. Here one thread
polls the C server (the GIL released while it waits and parses HTTP/2), gets
whole requests, and

* runs the quick read-only RPCs (INLINE) itself, answering in one C call, as
  long as the method's last call took under INLINE_BUDGET (a ListContainers
  over thousands of containers, or a slow disk, moves it to the pool until it
  is quick again: the polling thread must not stall everyone else's calls);
* hands everything that may block (create, stop, pull, exec, stats walks,
  GetContainerEvents...) to a thread pool.

The servicers are pycri.cri.server's, unchanged: they get a small context
object with what they use (abort, is_active, time_remaining).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from pycri import _native
from pycri.cri._gen import api_pb2

log = logging.getLogger("pycri.cri")

# Read-only, lock-free RPCs that take microseconds: run on the polling thread.
INLINE = frozenset({
    "Version", "Status", "RuntimeConfig", "ListImages", "ImageStatus",
    "PodSandboxStatus", "ContainerStatus", "ListPodSandbox", "ListContainers",
})
INLINE_BUDGET = 0.002  # seconds
MAX_STREAMS = 128         # concurrent streams per connection
MAX_HEADER_BYTES = 16384  # a request's header names + values (+32 each, as HPACK counts)
MAX_CONNECTIONS = 1024
POLL_MS = 500
BACKLOG_WAIT = 0.005  # seconds between tries to hand a streaming message to a slow client

_INTERNAL = grpc.StatusCode.INTERNAL.value[0]
_UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]


class _Abort(Exception):
    """context.abort(): unwinds the handler; the dispatcher sends the status."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    """The part of grpc.ServicerContext that pycri's servicers use."""

    __slots__ = ("_h2", "conn", "stream", "_deadline", "_code", "_details")

    def __init__(self, h2: _native.H2Server, conn: int, stream: int, timeout_us: int) -> None:
        self._h2 = h2
        self.conn = conn
        self.stream = stream
        self._deadline = time.monotonic() + timeout_us / 1e6 if timeout_us >= 0 else None
        self._code: int | None = None
        self._details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Abort(code.value[0], details)

    def is_active(self) -> bool:
        return self._h2.alive(self.conn, self.stream)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code.value[0]

    def set_details(self, details: str) -> None:
        self._details = details

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "unix:"


@dataclass(frozen=True)
class _Method:
    name: str
    handler: Callable[[Any, Any], Any]
    request: type
    streaming: bool
    inline: bool


def method_table(servicers: dict[str, Any]) -> dict[bytes, _Method]:
    """b"/runtime.v1.Service/Method" -> the servicer's bound method, for every method of
    the named services in the CRI proto."""
    table = {}
    for service, obj in servicers.items():
        desc = api_pb2.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            path = f"/{desc.full_name}/{m.name}".encode()
            table[path] = _Method(m.name, getattr(obj, m.name),
                                  getattr(api_pb2, m.input_type.name),
                                  m.server_streaming, m.name in INLINE)
    return table


class H2Transport:
    """Serves a method table on listening sockets handed to it."""

    def __init__(self, methods: dict[bytes, _Method], *, max_message: int, workers: int) -> None:
        self.methods = methods
        self.h2 = _native.H2Server(max_message, MAX_STREAMS, MAX_HEADER_BYTES, MAX_CONNECTIONS)
        self._pool = futures.ThreadPoolExecutor(max_workers=workers,
                                                thread_name_prefix="pycri-cri")
        self._running = True
        self._thread: threading.Thread | None = None
        self._inflight = 0
        self._idle = threading.Condition()
        self._stopping = False
        self._stopped = False  # the polling thread has ended: the last call may free
        self._freed = False
        self._cost: dict[str, float] = {}  # method -> seconds its last call took

    def add_listener(self, fd: int) -> None:
        self.h2.add_listener(fd)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pycri-cri-poll", daemon=True)
        self._thread.start()

    # -- the polling thread ------------------------------------------------------------

    def _loop(self) -> None:
        h2 = self.h2
        methods = self.methods
        while self._running:
            try:
                batch = h2.poll(POLL_MS)
            except OSError as e:
                log.error("gRPC transport poll failed: %s", e)
                time.sleep(0.1)
                continue
            for r in batch:
                try:
                    self._dispatch(methods.get(r.path), r)
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any one call
                    log.error("dispatching %r failed: %s", r.path, exc, exc_info=exc)
                    h2.respond(r.conn, r.stream, None, _INTERNAL, f"internal error: {exc}")

    def _dispatch(self, m: _Method | None, r: _native.H2Request) -> None:
        h2 = self.h2
        if m is None:
            h2.respond(r.conn, r.stream, None, _UNIMPLEMENTED,
                       f"unknown method {r.path.decode('ascii', 'replace')}")
            return
        request = m.request()
        try:
            request.ParseFromString(r.body)
        except DecodeError as e:
            h2.respond(r.conn, r.stream, None, _INTERNAL,
                       f"cannot parse {m.request.__name__}: {e}")
            return
        ctx = Context(h2, r.conn, r.stream, r.timeout_us)
        if m.inline and self._cost.get(m.name, 0.0) < INLINE_BUDGET:
            self._call(m, request, ctx)
            return
        with self._idle:
            self._inflight += 1
        try:
            self._pool.submit(self._pooled, m, request, ctx)
        except BaseException:
            self._done()
            raise

    def _pooled(self, m: _Method, request: Any, ctx: Context) -> None:
        try:
            self._call(m, request, ctx)
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()
                if self._stopped and not self._freed:
                    self._free()

    def _call(self, m: _Method, request: Any, ctx: Context) -> None:
        t0 = time.perf_counter()
        try:
            self._answer(m, request, ctx)
        finally:
            if m.inline:
                self._cost[m.name] = time.perf_counter() - t0

    def _answer(self, m: _Method, request: Any, ctx: Context) -> None:
        h2 = self.h2
        try:
            if m.streaming:
                with contextlib.closing(m.handler(request, ctx)) as replies:
                    for reply in replies:
                        data = reply.SerializeToString()
                        while (rc := h2.send(ctx.conn, ctx.stream, data)) == 2:
                            time.sleep(BACKLOG_WAIT)  # the client reads slowly: so do we
                        if rc:
                            return  # the client went away: closing() ends the generator
                h2.respond(ctx.conn, ctx.stream, None, ctx._code or 0, ctx._details)
            else:
                reply = m.handler(request, ctx)
                h2.respond(ctx.conn, ctx.stream, reply.SerializeToString(),
                           ctx._code or 0, ctx._details)
        except _Abort as a:
            h2.respond(ctx.conn, ctx.stream, None, a.code, a.details)
        except Exception as exc:  # noqa: BLE001 - a servicer bug must not kill the loop
            if ctx._code:  # set_code() then raise, as grpc's generated base methods do
                h2.respond(ctx.conn, ctx.stream, None, ctx._code, ctx._details or str(exc))
                return
            log.error("%s failed: %s", m.name, exc, exc_info=exc)
            h2.respond(ctx.conn, ctx.stream, None, _INTERNAL,
                       f"internal error: {type(exc).__name__}: {exc}")

    # -- stopping ----------------------------------------------------------------------

    def stop(self, grace: float | None) -> None:
        """GOAWAY to every client, then up to ``grace`` seconds for the calls under way;
        the rest lose their connection (their handlers run to their end unheard).
        A second stop does nothing."""
        with self._idle:
            if self._stopping:
                return
            self._stopping = True
        self.h2.shutdown()
        deadline = time.monotonic() + (grace or 0.0)
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        self._running = False
        self.h2.wake()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=False)
        with self._idle:
            self._stopped = True
            if self._inflight:
                # handlers still running hold the C server: the last one frees it
                self.h2.shutdown(hard=True)
            elif not self._freed:
                self._free()

    def _free(self) -> None:
        self._freed = True
        self.h2.close()
