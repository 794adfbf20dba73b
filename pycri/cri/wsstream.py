"""WebSocket for the streaming server, and the Kubernetes channel framing on top.

The WebSocket protocol itself (RFC 6455: the opening handshake, framing,
masking, fragmentation, ping/pong and the closing handshake) is wsproto's, a
sans-IO implementation: it turns bytes into events and events into bytes, and
this module owns the socket, the threads and the limits.

Kubernetes multiplexes exec/attach/port-forward streams over one WebSocket by
prefixing every message with a channel number: one byte in the binary
protocols (channel.k8s.io, v4.channel.k8s.io, v5.channel.k8s.io), one ASCII
digit followed by base64 data in the text ("base64.") variants. v5 adds a
control message [255, channel] meaning "this channel is closed" (stdin EOF).

    hs = ServerHandshake(raw_request_head)      # HandshakeError if malformed
    sock.sendall(hs.accept("v5.channel.k8s.io"))
    ws = WebSocket(sock, hs.connection, initial=bytes_after_head)
    ch = Channels(ws, "v5.channel.k8s.io")
    ch.send(1, b"output")                       # from any thread
    ch.recv()                                   # (channel, data) or None once closed
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections import deque
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ["BASE64_PROTOCOLS", "BINARY_PROTOCOLS", "CHANNEL_CLOSE", "Channels", "ChannelCodec",
           "HandshakeError", "ServerHandshake", "WebSocket"]

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

MAX_MESSAGE = 1 << 20  # client-go writes 32 KiB; a message past 1 MiB is refused
SEND_CHUNK = 32 * 1024  # outbound data is split into messages of at most this much

CHANNEL_CLOSE = 255  # v5: [255, channel] closes that channel

BINARY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io")
BASE64_PROTOCOLS = ("v4.base64.channel.k8s.io", "base64.channel.k8s.io")


class HandshakeError(Exception):
    """The upgrade request is not a valid WebSocket opening handshake."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class ServerHandshake:
    """The server side of the opening handshake, for a request head already read.

    head: the request line and headers up to and including the blank line.
    Raises HandshakeError (with the HTTP status to answer) if wsproto rejects it.
    """

    def __init__(self, head: bytes) -> None:
        self._ws = WSConnection(ConnectionType.SERVER)
        try:
            self._ws.receive_data(head)
            events = list(self._ws.events())
        except RemoteProtocolError as e:
            hint = e.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            headers = ([(k.decode("latin-1"), v.decode("latin-1")) for k, v in hint.headers]
                       if isinstance(hint, RejectConnection) else [])
            raise HandshakeError(status, f"bad websocket handshake: {e}", headers) from None
        requests = [ev for ev in events if isinstance(ev, Request)]
        if not requests:
            raise HandshakeError(400, "bad websocket handshake: incomplete request", [])
        self.request = requests[0]

    @property
    def subprotocols(self) -> list[str]:
        """What the client offered, in its order of preference."""
        return list(self.request.subprotocols)

    def accept(self, subprotocol: str | None) -> bytes:
        """The 101 response to send; afterwards `connection` carries the frames."""
        return self._ws.send(AcceptConnection(subprotocol=subprotocol or None))

    @property
    def connection(self) -> Connection:
        conn = self._ws.connection
        if conn is None:
            raise LocalProtocolError("handshake not accepted yet")
        return conn


class WebSocket:
    """Whole messages over a socket, on a wsproto Connection (server or client side).

    recv_message() (one reader thread) returns (is_text, payload) per data
    message, answers pings and the peer's close itself, and returns None once
    the connection is over: closed by the peer, a protocol error or a message
    over max_message (both answered with a close frame), end of file, or
    idle_timeout seconds without traffic either way. send_message() may be
    called from any thread; it raises BrokenPipeError once a close was sent.

    sock needs recv(n), sendall(data), and may raise TimeoutError from recv()
    to let the reader check for idleness.
    """

    def __init__(self, sock: Any, conn: Connection, *, idle_timeout: float = 1800.0,
                 max_message: int = MAX_MESSAGE, initial: bytes = b"") -> None:
        self.sock = sock
        self._conn = conn
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self._state_lock = threading.Lock()  # wsproto's state machine
        self._write_lock = threading.Lock()  # frame order on the socket; taken first
        self._events: deque[Any] = deque()
        self.done = threading.Event()  # set once recv_message has returned None
        self.last_activity = time.monotonic()
        if initial:
            self._feed(initial)

    @property
    def closed(self) -> bool:
        return self.done.is_set()

    @property
    def close_sent(self) -> bool:
        return self._conn.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

    def idle(self) -> bool:
        return time.monotonic() - self.last_activity >= self.idle_timeout

    # sending ----------------------------------------------------------------
    def _send(self, event: Any, *, only_open: bool = True) -> None:
        with self._write_lock:
            with self._state_lock:
                state = self._conn.state
                if only_open and state is not ConnectionState.OPEN:
                    raise BrokenPipeError("WebSocket closed")
                try:
                    data = self._conn.send(event)
                except LocalProtocolError:
                    raise BrokenPipeError("WebSocket closed") from None
            self.sock.sendall(data)
        self.last_activity = time.monotonic()

    def send_message(self, data: bytes, text: bool = False) -> None:
        self._send(TextMessage(data=data.decode("ascii")) if text else BytesMessage(data=data))

    def ping(self, payload: bytes = b"") -> None:
        self._send(Ping(payload=payload))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame once (also in answer to the peer's). `closed` turns
        true when recv_message sees the end, so callers can wait on `done`."""
        with self._state_lock:
            state = self._conn.state
        if state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            return
        try:
            self._send(CloseConnection(code=code, reason=reason or None), only_open=False)
        except OSError:
            self.done.set()

    def fail(self, code: int, reason: str) -> None:
        """Close because the peer broke the protocol; stop receiving."""
        self.close(code, reason[:100])
        self.done.set()

    # receiving --------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        with self._state_lock:
            if self._conn.state is ConnectionState.CLOSED:
                return
            self._conn.receive_data(data)
            self._events.extend(self._conn.events())
        self.last_activity = time.monotonic()

    def _next_event(self) -> Any:
        """The next wsproto event, reading the socket as needed; None at EOF or idle."""
        while not self._events:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if self.idle():
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self._feed(chunk)
        return self._events.popleft()

    def recv_message(self) -> tuple[bool, bytes] | None:
        if self.done.is_set():
            return None
        parts: list[bytes] = []
        size = 0
        text = False
        while True:
            ev = self._next_event()
            if ev is None:
                break
            if isinstance(ev, Ping):
                try:
                    self._send(ev.response())
                except OSError:
                    break
            elif isinstance(ev, CloseConnection):
                self._on_close(ev)
                break
            elif isinstance(ev, Message):
                if not parts:
                    text = isinstance(ev, TextMessage)
                data = ev.data.encode() if isinstance(ev.data, str) else bytes(ev.data)
                size += len(data)
                if size > self.max_message:
                    self.close(CLOSE_TOO_BIG, "message too big")
                    break
                parts.append(data)
                if ev.message_finished:
                    return text, b"".join(parts)
            # Pong: nothing to do; the traffic already counted as activity.
        self.done.set()
        return None

    def _on_close(self, ev: CloseConnection) -> None:
        with self._state_lock:
            state = self._conn.state
        if state is ConnectionState.REMOTE_CLOSING:
            reply = ev.response()  # the peer closed: echo its code
        elif state is ConnectionState.OPEN:
            # wsproto reports a broken frame as a close event without a close
            # frame from the peer: send ours with the reason it gave.
            reply = CloseConnection(code=ev.code, reason=(ev.reason or "")[:100] or None)
        else:
            return  # the peer answered our close
        try:
            self._send(reply, only_open=False)
        except OSError:
            pass


class ChannelCodec:
    """Kubernetes channel prefix for one negotiated subprotocol."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.base64 = protocol in BASE64_PROTOCOLS
        self.version = 5 if protocol.startswith("v5.") else 4 if protocol.startswith("v4.") else 1

    def encode(self, channel: int, data: bytes) -> tuple[bytes, bool]:
        """The message body and whether it goes as a text message."""
        if self.base64:
            return bytes([ord("0") + channel]) + base64.b64encode(data), True
        return bytes([channel]) + data, False

    def decode(self, text: bool, body: bytes) -> tuple[int, bytes]:
        """(channel, data) of one message; ValueError if it is not framed for this protocol."""
        if not body:
            raise ValueError("empty channel message")
        if self.base64:
            if not text:
                raise ValueError("base64 protocol expects text messages")
            ch = body[0] - ord("0")
            if not 0 <= ch <= 9:
                raise ValueError("bad channel digit")
            try:
                return ch, base64.b64decode(body[1:], validate=True)
            except binascii.Error as e:
                raise ValueError(f"bad base64: {e}") from None
        return body[0], body[1:]


class Channels:
    """A WebSocket speaking one Kubernetes channel protocol."""

    def __init__(self, ws: WebSocket, protocol: str) -> None:
        self.ws = ws
        self.codec = ChannelCodec(protocol)

    @property
    def version(self) -> int:
        return self.codec.version

    def send(self, channel: int, data: bytes) -> None:
        """Send data on a channel, split into messages of at most SEND_CHUNK bytes
        (an empty data still sends one message)."""
        view = memoryview(data)
        while True:
            self.ws.send_message(*self.codec.encode(channel, bytes(view[:SEND_CHUNK])))
            view = view[SEND_CHUNK:]
            if not view:
                return

    def recv(self) -> tuple[int, bytes] | None:
        """The next (channel, data); None once the connection is over. A message
        not framed for the protocol closes the connection as a protocol error."""
        msg = self.ws.recv_message()
        if msg is None:
            return None
        try:
            return self.codec.decode(*msg)
        except ValueError as e:
            self.ws.fail(CLOSE_PROTOCOL_ERROR, str(e))
            return None
