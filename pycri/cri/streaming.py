"""The CRI streaming server: the URLs that Exec, Attach and PortForward return.

kubelet (or crictl) asks the runtime for a URL over gRPC, then opens it with an
HTTP upgrade to SPDY/3.1 or WebSocket and speaks one of the Kubernetes stream
protocols on it. This module serves those URLs and hands the byte streams to a
`StreamBackend`, so it knows nothing about containers itself.

    server = StreamingServer(backend)        # binds 127.0.0.1, random port
    server.start()
    resp = server.get_exec(exec_request)     # ExecResponse(url=".../exec/<token>")
    ...
    server.stop()

Protocols served (the same set kubelet negotiates):

- exec/attach over SPDY (v4, v3, v2 and the original channel.k8s.io) and
  WebSocket (v5.channel.k8s.io, v4.channel.k8s.io, channel.k8s.io and the
  base64 variants): remotecommand.py.
- port-forward over SPDY (portforward.k8s.io), over the WebSocket channel
  protocols, and SPDY tunnelled in WebSocket: portforward.py.

The WebSocket protocol itself is wsproto's (see wsstream.py); SPDY/3.1 is spdy.py.

Safety (SECURITY.md item 17): the server binds loopback addresses only; URLs
carry a random single-use token that expires after `token_ttl` seconds, and at
most `max_tokens` are outstanding; request heads are size and time limited;
connections are capped in number and closed after `idle_timeout` seconds
without traffic; every inbound stream buffers at most `buffer_size` bytes (a
fast sender is slowed by TCP, not by memory growth).
"""

from __future__ import annotations

import ipaddress
import queue
import secrets
import select
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from pycri.cri import spdy, wsstream
from pycri.cri._gen import api_pb2
from pycri.cri.portforward import (
    PORTFORWARD_PROTOCOL,
    WS_PORTFORWARD_PROTOCOLS,
    WS_SPDY_TUNNEL_PROTOCOL,
    PortForwarder,
    WebSocketPipe,
)
from pycri.cri.remotecommand import (
    REMOTECOMMAND_PROTOCOLS,
    WS_REMOTECOMMAND_PROTOCOLS,
    RemoteCommand,
    ResizeQueue,
)
from pycri.errors import InvalidArgumentError, InvalidStateError, ResourceExhaustedError

__all__ = ["PORTFORWARD_PROTOCOL", "REMOTECOMMAND_PROTOCOLS", "ResizeQueue", "StreamBackend",
           "StreamingServer"]


MAX_REQUEST_HEAD = 16 * 1024
REQUEST_HEAD_TIMEOUT = 10.0
LINGER = 2.0  # seconds to let the peer read our last frames before we drop the socket


class StreamBackend(Protocol):
    """What the streaming server needs from a runtime.

    stdin/stdout/stderr are file objects or None (None when the client did not
    ask for that stream). stdin.read() returns b"" once the client closed it.
    stdout/stderr writes block while the client is slow and raise OSError once
    it has gone. `cancel` is set when the client has gone (hung up, idle
    timeout, server stopping) before the call returned. Each call runs in its
    own thread; exceptions become an error status for the client.
    """

    def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: BinaryIO | None,
             stdout: BinaryIO | None, stderr: BinaryIO | None, resize: ResizeQueue,
             cancel: threading.Event) -> int:
        """Run cmd in the container; return its exit code once it has exited and its
        output is written. On `cancel`, kill the process (as containerd does)."""
        ...

    def attach(self, container_id: str, *, tty: bool, stdin: BinaryIO | None,
               stdout: BinaryIO | None, stderr: BinaryIO | None, resize: ResizeQueue,
               cancel: threading.Event) -> None:
        """Relay the container's main process streams until it exits; on `cancel`,
        detach and return (never kill the container)."""
        ...

    def port_forward(self, sandbox_id: str, port: int, sock: socket.socket) -> None:
        """Copy bytes both ways between sock and the pod's port; raise if it cannot connect
        (the message goes to the client's error stream).

        sock is one end of a blocking AF_UNIX socketpair; the server pumps the other
        end to the client. sock.recv() returning b"" means the client finished
        sending: shut down the pod side's write half then. Return when both
        directions are done; the server closes sock afterwards.
        """
        ...


# ---------------------------------------------------------------------------
# Tokens


@dataclass
class _Pending:
    kind: str  # "exec" | "attach" | "portforward"
    request: Any
    expires: float


class _TokenCache:
    """Outstanding URLs: random, single-use, expiring, bounded in number."""

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl = ttl
        self.limit = limit
        self._items: OrderedDict[str, _Pending] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._items:
            token, item = next(iter(self._items.items()))
            if item.expires > now:
                break
            del self._items[token]

    def add(self, kind: str, request: Any) -> str:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._items) >= self.limit:
                raise ResourceExhaustedError(
                    f"too many outstanding streaming requests ({self.limit})")
            token = secrets.token_urlsafe(32)
            self._items[token] = _Pending(kind, request, now + self.ttl)
            return token

    def peek(self, kind: str, token: str) -> _Pending | None:
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.get(token)
            return item if item is not None and item.kind == kind else None

    def consume(self, kind: str, token: str) -> _Pending | None:
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.get(token)
            if item is None or item.kind != kind:
                return None
            del self._items[token]
            return item

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._items)


# ---------------------------------------------------------------------------
# HTTP


@dataclass
class _HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]  # lowercased names
    head: bytes  # the raw request line and headers, blank line included
    rest: bytes  # bytes read past the head

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get(name, []))

    def tokens(self, name: str) -> list[str]:
        """A list-valued header: every comma-separated item of every line."""
        return [t.strip() for line in self.headers.get(name, []) for t in line.split(",") if t.strip()]


class _HttpError(Exception):
    def __init__(self, status: int, reason: str, body: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(body)
        self.status, self.reason, self.body, self.headers = status, reason, body, headers or []


def _read_request(sock: socket.socket) -> _HttpRequest:
    buf = bytearray()
    deadline = time.monotonic() + REQUEST_HEAD_TIMEOUT
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            raise _HttpError(431, "Request Header Fields Too Large", "request head too large")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request head timed out")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if len(head) > MAX_REQUEST_HEAD:
        raise _HttpError(431, "Request Header Fields Too Large", "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400, "Bad Request", "malformed request line")
    method, target, _ = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(400, "Bad Request", "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    url = urllib.parse.urlsplit(target)
    return _HttpRequest(method, url.path, urllib.parse.parse_qs(url.query), headers,
                        head + b"\r\n\r\n", rest)


def _send_response(sock: socket.socket, status: int, reason: str, body: str = "",
                   headers: list[tuple[str, str]] | None = None) -> None:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    data = body.encode()
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            426: "Upgrade Required", 431: "Request Header Fields Too Large"}


def _negotiate(client: list[str], server: tuple[str, ...]) -> str | None:
    """The first protocol in the client's order that we speak."""
    for p in client:
        if p in server:
            return p
    return None


# ---------------------------------------------------------------------------
# The server


class StreamingServer:
    """Serves exec/attach/port-forward URLs on a loopback address.

    backend: a StreamBackend.
    address, port: where to listen; address must be loopback ("127.0.0.1",
        "::1", "localhost"), anything else raises InvalidArgumentError. Port 0
        picks a free port at start().
    token_ttl: seconds a URL stays usable; each URL works once.
    idle_timeout: seconds without traffic either way (or with a stream buffer
        left unread) before a session is dropped and its command cancelled;
        also the longest a write may block on a client that stopped reading.
    stream_creation_timeout: seconds a SPDY client has to open all the streams
        the request needs (and to complete a port-forward stream pair).
    max_tokens, max_connections: caps on outstanding URLs (ResourceExhaustedError
        past it) and on live connections (HTTP 503 past it).
    buffer_size: bytes buffered per inbound stream (also our SPDY window).
    """

    def __init__(self, backend: StreamBackend, address: str = "127.0.0.1", port: int = 0, *,
                 token_ttl: float = 60.0, idle_timeout: float = 1800.0,
                 stream_creation_timeout: float = 30.0, max_tokens: int = 1000,
                 max_connections: int = 64, buffer_size: int = 256 * 1024) -> None:
        if address == "localhost":
            address = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise InvalidArgumentError(f"streaming server address {address!r} is not an IP address") from None
        if not ip.is_loopback:
            raise InvalidArgumentError(
                f"streaming server must bind a loopback address, not {address!r}")
        if not 0 <= port <= 65535:
            raise InvalidArgumentError(f"bad port {port}")
        if token_ttl <= 0 or idle_timeout <= 0 or stream_creation_timeout <= 0:
            raise InvalidArgumentError("timeouts must be positive")
        self.backend = backend
        self.address = address
        self.port = port
        self.idle_timeout = idle_timeout
        self.stream_creation_timeout = stream_creation_timeout
        self.buffer_size = buffer_size
        self.max_connections = max_connections
        self._tokens = _TokenCache(token_ttl, max_tokens)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._remotecommand = RemoteCommand(backend,
                                            stream_creation_timeout=stream_creation_timeout,
                                            buffer_size=buffer_size)
        self._portforward = PortForwarder(backend, idle_timeout=idle_timeout,
                                          stream_creation_timeout=stream_creation_timeout,
                                          buffer_size=buffer_size)

    # lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._listener is not None:
            raise InvalidStateError("streaming server already started")
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="cri-streaming-accept",
                                               daemon=True)
        self._accept_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every live connection; wait for their threads."""
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> StreamingServer:  # noqa: PYI034
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._listener is None:
            raise InvalidStateError("streaming server not started")
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def outstanding_tokens(self) -> int:
        return len(self._tokens)

    # the three CRI calls ---------------------------------------------------
    def get_exec(self, req: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
        if not req.container_id:
            raise InvalidArgumentError("missing container_id")
        if not req.cmd:
            raise InvalidArgumentError("missing cmd")
        _check_streams(req)
        return api_pb2.ExecResponse(url=self._url("exec", req))

    def get_attach(self, req: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
        if not req.container_id:
            raise InvalidArgumentError("missing container_id")
        _check_streams(req)
        return api_pb2.AttachResponse(url=self._url("attach", req))

    def get_port_forward(self, req: api_pb2.PortForwardRequest) -> api_pb2.PortForwardResponse:
        if not req.pod_sandbox_id:
            raise InvalidArgumentError("missing pod_sandbox_id")
        for p in req.port:
            if not 0 < p <= 65535:
                raise InvalidArgumentError(f"bad port {p}")
        return api_pb2.PortForwardResponse(url=self._url("portforward", req))

    def _url(self, kind: str, req: Any) -> str:
        base = self.base_url
        copy = type(req)()
        copy.CopyFrom(req)
        return f"{base}/{kind}/{self._tokens.add(kind, copy)}"

    # connections -------------------------------------------------------------
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    t = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                         name="cri-streaming-conn")
                    self._conns[sock] = t
            if full:
                try:
                    sock.settimeout(1.0)
                    _send_response(sock, 503, "Service Unavailable", "too many streaming connections")
                except OSError:
                    pass
                sock.close()
                continue
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._handle(sock)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            try:
                sock.close()
            except OSError:
                pass

    def _handle(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            req = _read_request(sock)
            kind, token = self._route(req)
            upgrade = req.header("upgrade").lower()
            if "upgrade" not in [t.lower() for t in req.tokens("connection")]:
                raise _HttpError(400, "Bad Request", "unable to upgrade: missing upgrade headers in request")
            if upgrade == "spdy/3.1":
                if req.method not in ("GET", "POST"):
                    raise _HttpError(405, "Method Not Allowed", "method not allowed")
                offered = req.tokens("x-stream-protocol-version")
                server_protocols = ((PORTFORWARD_PROTOCOL,) if kind == "portforward"
                                    else REMOTECOMMAND_PROTOCOLS)
                protocol = _negotiate(offered, server_protocols) if offered else ""
                if protocol is None:
                    raise _HttpError(
                        403, "Forbidden",
                        f"unable to upgrade: unable to negotiate protocol: client supports "
                        f"{offered}, server supports {list(server_protocols)}",
                        [("X-Accept-Stream-Protocol-Version", p) for p in server_protocols])
                pending = self._consume(kind, token)
                headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
                if protocol:
                    headers.append(("X-Stream-Protocol-Version", protocol))
                _send_response(sock, 101, "Switching Protocols", headers=headers)
                self._run_spdy(self._stream_transport(sock), req.rest, pending,
                               protocol or "channel.k8s.io")
            elif upgrade == "websocket":
                try:
                    handshake = wsstream.ServerHandshake(req.head)
                except wsstream.HandshakeError as e:
                    raise _HttpError(e.status, _REASONS.get(e.status, "Bad Request"), str(e),
                                     e.headers) from None
                offered = handshake.subprotocols
                ws_protocols: tuple[str, ...] = WS_REMOTECOMMAND_PROTOCOLS
                if kind == "portforward":
                    ws_protocols = (*WS_PORTFORWARD_PROTOCOLS, WS_SPDY_TUNNEL_PROTOCOL)
                protocol = _negotiate(offered, ws_protocols) if offered else ""
                if protocol is None:
                    raise _HttpError(403, "Forbidden",
                                     f"unable to upgrade: none of the websocket subprotocols "
                                     f"{offered} is supported")
                pending = self._consume(kind, token)
                sock.sendall(handshake.accept(protocol))
                self._run_websocket(sock, handshake, req, pending, protocol or "channel.k8s.io")
            else:
                raise _HttpError(400, "Bad Request",
                                 "unable to upgrade: expected Upgrade: SPDY/3.1 or websocket")
        except _HttpError as e:
            try:
                sock.settimeout(5.0)
                _send_response(sock, e.status, e.reason, e.body + "\n", e.headers)
            except OSError:
                pass
        except TimeoutError:
            pass

    def _route(self, req: _HttpRequest) -> tuple[str, str]:
        parts = req.path.split("/")
        if len(parts) != 3 or parts[0] != "" or parts[1] not in ("exec", "attach", "portforward"):
            raise _HttpError(404, "Not Found", "not found")
        kind, token = parts[1], parts[2]
        if self._tokens.peek(kind, token) is None:
            raise _HttpError(404, "Not Found", "unknown or expired streaming token")
        return kind, token

    def _consume(self, kind: str, token: str) -> _Pending:
        pending = self._tokens.consume(kind, token)
        if pending is None:
            raise _HttpError(404, "Not Found", "unknown or expired streaming token")
        return pending

    def _stream_transport(self, sock: socket.socket) -> _PolledSocket:
        # A write blocked for the whole idle timeout means the peer stopped
        # reading: the connection is dropped. Reads poll so idleness is noticed.
        sock.settimeout(self.idle_timeout)
        return _PolledSocket(sock, min(self.idle_timeout, 1.0))

    # SPDY ------------------------------------------------------------------------
    def _run_spdy(self, transport: Any, initial: bytes, pending: _Pending, protocol: str) -> None:
        cancel = threading.Event()
        arrivals: queue.Queue[spdy.SpdyStream | None] = queue.Queue()

        def on_close() -> None:
            cancel.set()  # tells a still-running backend call that the client is gone
            arrivals.put(None)

        conn = spdy.SpdyConnection(transport, server=True, on_stream=arrivals.put,
                                   idle_timeout=self.idle_timeout, recv_window=self.buffer_size,
                                   on_close=on_close)
        conn._rbuf += initial
        reader = threading.Thread(target=conn.run, daemon=True, name="cri-spdy-reader")
        try:
            conn.start()
            reader.start()
            if pending.kind == "portforward":
                self._portforward.serve_spdy(conn, arrivals, pending.request)
            else:
                self._remotecommand.serve_spdy(conn, arrivals, pending.kind, pending.request,
                                              protocol, cancel)
        finally:
            self._linger(transport, conn.closed)
            conn.close()
            if reader.is_alive():
                reader.join(5.0)

    def _linger(self, transport: Any, closed: threading.Event) -> None:
        """Half-close and give the peer a moment to read what we sent and hang up.

        Closing a socket with unread input makes the kernel send RST, and the
        peer may then lose our final frames (the exit status)."""
        deadline = time.monotonic() + LINGER
        try:
            transport.shutdown(socket.SHUT_WR)
        except OSError:
            return
        if closed.wait(LINGER) and isinstance(transport, _PolledSocket):
            # Our reader has stopped (also after a protocol error, with the
            # peer possibly still sending): read to its end of file.
            transport.drain(deadline)

    # WebSocket -------------------------------------------------------------------
    def _run_websocket(self, sock: socket.socket, handshake: wsstream.ServerHandshake,
                       req: _HttpRequest, pending: _Pending, protocol: str) -> None:
        polled = self._stream_transport(sock)
        ws = wsstream.WebSocket(polled, handshake.connection, idle_timeout=self.idle_timeout,
                                initial=req.rest)
        if protocol == WS_SPDY_TUNNEL_PROTOCOL:
            self._run_spdy(WebSocketPipe(ws), b"", pending, PORTFORWARD_PROTOCOL)
            return
        channels = wsstream.Channels(ws, protocol)
        try:
            if pending.kind == "portforward":
                self._portforward.serve_websocket(channels, req.query.get("port", []),
                                                  pending.request)
            else:
                self._remotecommand.serve_websocket(channels, pending.kind, pending.request)
        finally:
            ws.close()
            self._linger(polled, ws.done)

class _PolledSocket:
    """A socket whose recv() gives up after `poll` seconds (TimeoutError) so the
    reader can check for idleness, while sendall() keeps the socket's own,
    longer timeout."""

    def __init__(self, sock: socket.socket, poll: float) -> None:
        self.sock = sock
        self.poll = poll

    def recv(self, n: int) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], self.poll)
        if not ready:
            raise TimeoutError("no data yet")
        return self.sock.recv(n)

    def drain(self, deadline: float) -> None:
        """Read and drop input until end of file or the deadline."""
        while time.monotonic() < deadline:
            try:
                if not self.recv(65536):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


def _check_streams(req: Any) -> None:
    if not (req.stdin or req.stdout or req.stderr):
        raise InvalidArgumentError("one of stdin, stdout, or stderr must be set")
    if req.tty and req.stderr:
        raise InvalidArgumentError("tty and stderr cannot both be true")
