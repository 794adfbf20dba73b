"""A small RFC 6455 WebSocket endpoint and the Kubernetes channel framing on top.

Kubernetes multiplexes exec/attach/port-forward streams over one WebSocket by
prefixing every message with a channel number: one byte in the binary
protocols (channel.k8s.io, v4.channel.k8s.io, v5.channel.k8s.io), one ASCII
digit followed by base64 data in the text ("base64.") variants. v5 adds a
control message [255, channel] meaning "this channel is closed" (stdin EOF).

Both ends live here (the server uses `WebSocket(server=True)`; tests drive it
with `server=False`, which masks frames as a client must).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import threading
import time
from typing import Any

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

MAX_MESSAGE = 1 << 20  # client-go writes 32 KiB; anything past 1 MiB is refused

CHANNEL_CLOSE = 255  # v5: [255, channel] closes that channel

BINARY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io")
BASE64_PROTOCOLS = ("v4.base64.channel.k8s.io", "base64.channel.k8s.io")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


class WebSocketError(Exception):
    """The peer broke the WebSocket protocol."""


class WebSocket:
    """Message-level WebSocket over a connected socket (after the HTTP handshake).

    recv_message() returns (opcode, payload) for data messages, answers pings
    itself, and returns None once the peer closes (or the idle timeout passes).
    """

    def __init__(self, sock: Any, *, server: bool, idle_timeout: float = 1800.0,
                 max_message: int = MAX_MESSAGE, initial: bytes = b"") -> None:
        self.sock = sock
        self.server = server
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self._buf = bytearray(initial)
        self._wlock = threading.Lock()
        self.closed = False
        self.close_sent = False
        self.last_activity = time.monotonic()

    def idle(self) -> bool:
        return time.monotonic() - self.last_activity >= self.idle_timeout

    # low level -----------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if time.monotonic() - self.last_activity >= self.idle_timeout:
                    raise TimeoutError("WebSocket idle") from None
                continue
            if not chunk:
                raise EOFError
            self._buf += chunk
            self.last_activity = time.monotonic()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        head = bytearray([(0x80 if fin else 0) | opcode])
        mask_bit = 0 if self.server else 0x80
        n = len(payload)
        if n < 126:
            head.append(mask_bit | n)
        elif n < 1 << 16:
            head.append(mask_bit | 126)
            head += struct.pack(">H", n)
        else:
            head.append(mask_bit | 127)
            head += struct.pack(">Q", n)
        if not self.server:
            key = os.urandom(4)
            head += key
            payload = _mask(payload, key)
        with self._wlock:
            if self.close_sent:
                raise BrokenPipeError("WebSocket closed")
            if opcode == OP_CLOSE:
                self.close_sent = True
            self.sock.sendall(bytes(head) + payload)
        self.last_activity = time.monotonic()

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._recv_exact(2)
        if b0 & 0x70:
            raise WebSocketError("reserved bits set (no extension was negotiated)")
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if masked != self.server:
            raise WebSocketError("client frames must be masked, server frames must not")
        if n == 126:
            (n,) = struct.unpack(">H", self._recv_exact(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._recv_exact(8))
        if opcode >= 0x8 and (n > 125 or not fin):
            raise WebSocketError("bad control frame")
        if n > self.max_message:
            raise WebSocketError(f"frame of {n} bytes is too large")
        key = self._recv_exact(4) if masked else b""
        payload = self._recv_exact(n)
        if masked:
            payload = _mask(payload, key)
        return fin, opcode, payload

    # messages --------------------------------------------------------------
    def recv_message(self) -> tuple[int, bytes] | None:
        parts: list[bytes] = []
        size = 0
        msg_op = None
        try:
            while True:
                fin, op, payload = self._read_frame()
                if op == OP_PING:
                    self.send_frame(OP_PONG, payload)
                    continue
                if op == OP_PONG:
                    continue
                if op == OP_CLOSE:
                    if not self.close_sent:
                        code = payload[:2] if len(payload) >= 2 else struct.pack(">H", CLOSE_NORMAL)
                        try:
                            self.send_frame(OP_CLOSE, code)
                        except OSError:
                            pass
                    self.closed = True
                    return None
                if op in (OP_TEXT, OP_BINARY):
                    if msg_op is not None:
                        raise WebSocketError("new message inside a fragmented one")
                    msg_op = op
                elif op == OP_CONT:
                    if msg_op is None:
                        raise WebSocketError("continuation without a message")
                else:
                    raise WebSocketError(f"unknown opcode {op}")
                size += len(payload)
                if size > self.max_message:
                    self.close(CLOSE_TOO_BIG, "message too big")
                    self.closed = True
                    return None
                parts.append(payload)
                if fin:
                    return msg_op, b"".join(parts)
        except WebSocketError as e:
            self.close(CLOSE_PROTOCOL_ERROR, str(e)[:100])
            self.closed = True
            return None
        except (EOFError, OSError):
            self.closed = True
            return None

    def send_message(self, data: bytes, text: bool = False) -> None:
        self.send_frame(OP_TEXT if text else OP_BINARY, data)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame once. `closed` turns true when the peer answers
        (recv_message returns None), so callers can wait for that."""
        if self.close_sent:
            return
        try:
            self.send_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode()[:120])
        except OSError:
            self.closed = True


def _mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


class ChannelCodec:
    """Kubernetes channel prefix for one negotiated subprotocol."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.base64 = protocol in BASE64_PROTOCOLS
        self.version = 5 if protocol.startswith("v5.") else 4 if protocol.startswith("v4.") else 1

    def encode(self, channel: int, data: bytes) -> tuple[bytes, bool]:
        """The message body and whether it goes as a text frame."""
        if self.base64:
            return bytes([ord("0") + channel]) + base64.b64encode(data), True
        return bytes([channel]) + data, False

    def decode(self, opcode: int, body: bytes) -> tuple[int, bytes]:
        if not body:
            raise ValueError("empty channel message")
        if self.base64:
            if opcode != OP_TEXT:
                raise ValueError("base64 protocol expects text frames")
            ch = body[0] - ord("0")
            if not 0 <= ch <= 9:
                raise ValueError("bad channel digit")
            return ch, base64.b64decode(body[1:], validate=True)
        return body[0], body[1:]
