"""SPDY/3.1 framing and a small multiplexed connection, as kubelet's streaming
protocols use it (exec, attach and port-forward ride on SPDY streams).

Only what those protocols need is here: control frames SYN_STREAM, SYN_REPLY,
RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE, and DATA frames.
Header blocks are zlib streams primed with the dictionary from the SPDY/3 spec;
each direction of a connection keeps one compressor (or decompressor) for its
whole life, so every block is compressed and written under one lock.

Flow control. We advertise a receive window per stream and for the session and
send WINDOW_UPDATE as the application consumes data. Inbound data waits in a
bounded per-stream buffer; a peer that ignores our window (the Go spdystream
library used by kubectl, crictl and kubelet never looks at windows) is slowed by
TCP instead: the reader stops reading the socket until the buffer drains.
Outbound we honour the peer's windows. A peer that never sends WINDOW_UPDATE
cannot be flow controlled; when our window to such a peer runs out and no update
arrives within a short grace period, we stop counting for that connection.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Protocol

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9

SETTINGS_INITIAL_WINDOW_SIZE = 7

DEFAULT_WINDOW = 65536  # both the stream and the session window start here
MAX_FRAME_PAYLOAD = 1 << 20  # we refuse bigger frames; Go clients write 32 KiB
MAX_HEADER_BLOCK = 64 * 1024  # decompressed size limit of one header block
MAX_HEADERS = 64
SEND_CHUNK = 32 * 1024
NO_UPDATE_GRACE = 0.5  # seconds to wait for a first WINDOW_UPDATE before giving up on one

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1).
_DICTIONARY_HEX = (
    "000000076f7074696f6e73000000046865616400000004706f7374000000037075740000"
    "000664656c657465000000057472616365000000066163636570740000000e6163636570"
    "742d636861727365740000000f6163636570742d656e636f64696e670000000f61636365"
    "70742d6c616e67756167650000000d6163636570742d72616e6765730000000361676500"
    "000005616c6c6f770000000d617574686f72697a6174696f6e0000000d63616368652d63"
    "6f6e74726f6c0000000a636f6e6e656374696f6e0000000c636f6e74656e742d62617365"
    "00000010636f6e74656e742d656e636f64696e6700000010636f6e74656e742d6c616e67"
    "756167650000000e636f6e74656e742d6c656e67746800000010636f6e74656e742d6c6f"
    "636174696f6e0000000b636f6e74656e742d6d64350000000d636f6e74656e742d72616e"
    "67650000000c636f6e74656e742d74797065000000046461746500000004657461670000"
    "000665787065637400000007657870697265730000000466726f6d00000004686f737400"
    "00000869662d6d617463680000001169662d6d6f6469666965642d73696e63650000000d"
    "69662d6e6f6e652d6d617463680000000869662d72616e67650000001369662d756e6d6f"
    "6469666965642d73696e63650000000d6c6173742d6d6f646966696564000000086c6f63"
    "6174696f6e0000000c6d61782d666f72776172647300000006707261676d610000001270"
    "726f78792d61757468656e7469636174650000001370726f78792d617574686f72697a61"
    "74696f6e0000000572616e676500000007726566657265720000000b72657472792d6166"
    "7465720000000673657276657200000002746500000007747261696c6572000000117472"
    "616e736665722d656e636f64696e6700000007757067726164650000000a757365722d61"
    "67656e74000000047661727900000003766961000000077761726e696e67000000107777"
    "772d61757468656e746963617465000000066d6574686f64000000036765740000000673"
    "746174757300000006323030204f4b0000000776657273696f6e00000008485454502f31"
    "2e310000000375726c000000067075626c69630000000a7365742d636f6f6b6965000000"
    "0a6b6565702d616c697665000000066f726967696e313030313031323031323032323035"
    "323036333030333032333033333034333035333036333037343032343035343036343037"
    "343038343039343130343131343132343133343134343135343136343137353032353034"
    "353035323033204e6f6e2d417574686f726974617469766520496e666f726d6174696f6e"
    "323034204e6f20436f6e74656e74333031204d6f766564205065726d616e656e746c7934"
    "303020426164205265717565737434303120556e617574686f72697a656434303320466f"
    "7262696464656e343034204e6f7420466f756e6435303020496e7465726e616c20536572"
    "766572204572726f72353031204e6f7420496d706c656d656e7465643530332053657276"
    "69636520556e617661696c61626c654a616e20466562204d617220417072204d6179204a"
    "756e204a756c204175672053657074204f6374204e6f76204465632030303a30303a3030"
    "204d6f6e2c205475652c205765642c205468752c204672692c205361742c2053756e2c20"
    "474d546368756e6b65642c746578742f68746d6c2c696d6167652f706e672c696d616765"
    "2f6a70672c696d6167652f6769662c6170706c69636174696f6e2f786d6c2c6170706c69"
    "636174696f6e2f7868746d6c2b786d6c2c746578742f706c61696e2c746578742f6a6176"
    "617363726970742c7075626c6963707269766174656d61782d6167653d677a69702c6465"
    "666c6174652c73646368636861727365743d7574662d38636861727365743d69736f2d38"
    "3835392d312c7574662d2c2a2c656e713d302e"
)
DICTIONARY = bytes.fromhex(_DICTIONARY_HEX)


class SpdyError(Exception):
    """The peer broke the protocol; the connection is closed."""


class Transport(Protocol):
    """What a connection needs from its byte pipe (a socket, or a WebSocket tunnel)."""

    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...


Headers = dict[str, list[str]]


def encode_header_block(headers: Headers) -> bytes:
    """The uncompressed name/value block: names lowercased, values NUL-joined."""
    parts = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        n = name.lower().encode()
        v = "\0".join(values).encode()
        parts.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(parts)


def decode_header_block(raw: bytes) -> Headers:
    def take(pos: int, n: int) -> tuple[bytes, int]:
        if n > len(raw) - pos:
            raise SpdyError("truncated header block")
        return raw[pos : pos + n], pos + n

    b, pos = take(0, 4)
    (count,) = struct.unpack(">I", b)
    if count > MAX_HEADERS:
        raise SpdyError(f"too many headers ({count})")
    headers: Headers = {}
    for _ in range(count):
        b, pos = take(pos, 4)
        name, pos = take(pos, struct.unpack(">I", b)[0])
        b, pos = take(pos, 4)
        value, pos = take(pos, struct.unpack(">I", b)[0])
        if not name:
            raise SpdyError("empty header name")
        key = name.decode("latin-1").lower()
        headers.setdefault(key, []).extend(value.decode("latin-1").split("\0"))
    return headers


class HeaderCompressor:
    """One direction's zlib stream; blocks are sync-flushed so each frame stands alone."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                   zlib.Z_DEFAULT_STRATEGY, DICTIONARY)

    def compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    def __init__(self) -> None:
        self._z = zlib.decompressobj(15, DICTIONARY)

    def decompress(self, data: bytes) -> Headers:
        try:
            raw = self._z.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise SpdyError(f"bad header block: {e}") from None
        if self._z.unconsumed_tail:
            raise SpdyError("header block too large")
        return decode_header_block(raw)


def control_frame(ftype: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


class _Inbox:
    """Bytes received on a stream and not yet read: bounded, blocking on both sides."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.cond = threading.Condition()

    def put(self, data: bytes, alive: Callable[[], bool]) -> bool:
        """Queue data; wait while full (backpressure). False if the stream went away."""
        with self.cond:
            while self.size >= self.limit and not self.eof and alive():
                self.cond.wait(0.5)
            if self.eof or not alive():
                return False
            self.chunks.append(data)
            self.size += len(data)
            self.cond.notify_all()
            return True

    def finish(self) -> None:
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def get(self, n: int, timeout: float | None) -> bytes | None:
        """Up to n bytes; b"" at end of stream; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.chunks and not self.eof:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cond.wait(left)
            if not self.chunks:
                return b""
            head = self.chunks[0]
            if len(head) <= n:
                self.chunks.popleft()
            else:
                self.chunks[0] = head[n:]
                head = head[:n]
            self.size -= len(head)
            self.cond.notify_all()
            return head


class SpdyStream:
    """One SPDY stream: a byte pipe each way with independent half-close."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: Headers, recv_window: int,
                 send_window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self._inbox = _Inbox(recv_window)
        self._unacked = 0  # bytes consumed since our last WINDOW_UPDATE
        self.send_window = send_window
        self.replied = threading.Event()
        self.local_closed = False
        self.remote_closed = False
        self.reset = False
        self.refused = False  # reset (or the session ended) before any SYN_REPLY
        self.reply_headers: Headers = {}

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    # reading -----------------------------------------------------------------
    def read(self, n: int = 65536, timeout: float | None = None) -> bytes:
        """Up to n bytes; b"" once the peer half-closed or reset the stream."""
        data = self._inbox.get(n, timeout)
        if data is None:
            raise TimeoutError("stream read timed out")
        if data:
            self.conn._consumed(self, len(data))
        return data

    # writing -----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.conn._reserve(self, min(len(view), SEND_CHUNK))
            self.conn._send(data_frame(self.id, 0, bytes(view[:n])))
            view = view[n:]

    def close_write(self) -> None:
        """Half-close our side (FIN); idempotent."""
        if self.local_closed or self.reset:
            return
        self.local_closed = True
        try:
            self.conn._send(data_frame(self.id, FLAG_FIN, b""))
        except OSError:
            pass
        self.conn._maybe_forget(self)

    def send_reply(self, headers: Headers | None = None, fin: bool = False) -> None:
        self.conn._send_headers(SYN_REPLY, FLAG_FIN if fin else 0,
                                struct.pack(">I", self.id), headers or {})
        if fin:
            self.local_closed = True

    def send_reset(self, status: int = CANCEL) -> None:
        """Abort the stream both ways (best effort if the session is gone)."""
        if not self.reset:
            with contextlib.suppress(OSError):
                self.conn._send(control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status)))
        self.conn._on_reset(self)

    def wait_reply(self, timeout: float) -> None:
        if not self.replied.wait(timeout):
            raise TimeoutError(f"no SYN_REPLY for stream {self.id}")
        if self.refused:
            raise ConnectionResetError(f"stream {self.id} was refused")


class SpdyConnection:
    """A SPDY/3.1 session over a transport. Call run() in a thread to read frames.

    server=True: the peer opens odd-numbered streams and on_stream is called (in
    the reader thread; keep it short) for each; server=False: we open them.
    """

    def __init__(self, transport: Transport, *, server: bool,
                 on_stream: Callable[[SpdyStream], None] | None = None,
                 idle_timeout: float = 1800.0, recv_window: int = 256 * 1024,
                 max_streams: int = 128, on_close: Callable[[], None] | None = None) -> None:
        self.t = transport
        self.server = server
        self.on_stream = on_stream
        self.on_close = on_close
        self.idle_timeout = idle_timeout
        self.recv_window = recv_window
        self.session_recv_window = recv_window * 4
        self.max_streams = max_streams
        self.streams: dict[int, SpdyStream] = {}
        self._lock = threading.Lock()  # stream table, windows
        self._wlock = threading.Lock()  # one frame (and one compressor step) at a time
        self._window_cond = threading.Condition(self._lock)
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._next_id = 2 if server else 1
        self._last_peer_id = 0
        self._peer_initial_window = DEFAULT_WINDOW
        self._session_send_window = DEFAULT_WINDOW
        self._session_unacked = 0
        self._peer_flow_control = False  # the peer has sent WINDOW_UPDATE at least once
        self._ignore_send_windows = False
        self._ping_id = 2 if server else 1
        self.closed = threading.Event()
        self.goaway_received = False
        self.last_activity = time.monotonic()
        self._rbuf = bytearray()

    # setup ---------------------------------------------------------------
    def start(self) -> None:
        """Announce our receive windows (stream via SETTINGS, session via WINDOW_UPDATE)."""
        # one SETTINGS entry: flags 0, 24-bit id, 32-bit value
        entry = struct.pack(">BBHI", 0, 0, SETTINGS_INITIAL_WINDOW_SIZE, self.recv_window)
        self._send(control_frame(SETTINGS, 0, struct.pack(">I", 1) + entry))
        grow = self.session_recv_window - DEFAULT_WINDOW
        self._send(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", 0, grow)))

    # sending -------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        with self._wlock:
            if self.closed.is_set():
                raise ConnectionError("SPDY connection closed")
            self.t.sendall(frame)
        self.last_activity = time.monotonic()

    def _send_headers(self, ftype: int, flags: int, prefix: bytes, headers: Headers) -> None:
        with self._wlock:
            if self.closed.is_set():
                raise ConnectionError("SPDY connection closed")
            block = self._compressor.compress(headers)
            self.t.sendall(control_frame(ftype, flags, prefix + block))
        self.last_activity = time.monotonic()

    def _reserve(self, stream: SpdyStream, want: int) -> int:
        """Take up to `want` bytes of send window for `stream`, waiting if needed."""
        with self._lock:
            waited_since = None
            while True:
                if stream.reset or self.closed.is_set():
                    raise ConnectionResetError(f"stream {stream.id} closed")
                if stream.local_closed:
                    raise BrokenPipeError(f"stream {stream.id} already half-closed")
                if self._ignore_send_windows:
                    return want
                avail = min(stream.send_window, self._session_send_window)
                if avail > 0:
                    n = min(want, avail)
                    stream.send_window -= n
                    self._session_send_window -= n
                    return n
                now = time.monotonic()
                waited_since = waited_since or now
                if not self._peer_flow_control and now - waited_since >= NO_UPDATE_GRACE:
                    self._ignore_send_windows = True  # a peer that never grants window
                    continue
                if now - waited_since >= self.idle_timeout:
                    raise TimeoutError(f"stream {stream.id}: peer granted no window")
                self._window_cond.wait(0.1)

    def open_stream(self, headers: Headers, *, fin: bool = False, timeout: float = 30.0) -> SpdyStream:
        """Client side: SYN_STREAM, then wait for the SYN_REPLY."""
        # Ids must reach the wire in increasing order: allocate under the write lock.
        with self._wlock:
            if self.closed.is_set():
                raise ConnectionError("SPDY connection closed")
            with self._lock:
                sid = self._next_id
                self._next_id += 2
                st = SpdyStream(self, sid, headers, self.recv_window, self._peer_initial_window)
                st.local_closed = fin
                self.streams[sid] = st
            block = self._compressor.compress(headers)
            flags = FLAG_FIN if fin else 0
            self.t.sendall(control_frame(SYN_STREAM, flags, struct.pack(">IIBB", sid, 0, 0, 0) + block))
        self.last_activity = time.monotonic()
        st.wait_reply(timeout)
        return st

    def ping(self) -> None:
        with self._lock:
            pid = self._ping_id
            self._ping_id += 2
        self._send(control_frame(PING, 0, struct.pack(">I", pid)))

    def goaway(self, status: int = 0) -> None:
        try:
            self._send(control_frame(GOAWAY, 0, struct.pack(">II", self._last_peer_id, status)))
        except OSError:
            pass

    # bookkeeping -----------------------------------------------------------
    def _consumed(self, stream: SpdyStream | None, n: int) -> None:
        """Credit n bytes back to the peer's windows (stream None: session only,
        for data we dropped)."""
        updates = []
        with self._lock:
            self._session_unacked += n
            if stream is not None:
                stream._unacked += n
                if stream._unacked >= self.recv_window // 2 and not stream.remote_closed:
                    updates.append((stream.id, stream._unacked))
                    stream._unacked = 0
            if self._session_unacked >= self.session_recv_window // 2:
                updates.append((0, self._session_unacked))
                self._session_unacked = 0
        for sid, delta in updates:
            try:
                self._send(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", sid, delta)))
            except OSError:
                pass

    def _on_reset(self, stream: SpdyStream) -> None:
        with self._lock:
            stream.reset = True
            if not stream.replied.is_set():
                stream.refused = True
                stream.replied.set()
            self.streams.pop(stream.id, None)
            self._window_cond.notify_all()
        stream._inbox.finish()

    def _maybe_forget(self, stream: SpdyStream) -> None:
        with self._lock:
            if stream.local_closed and stream.remote_closed:
                self.streams.pop(stream.id, None)

    def idle(self) -> bool:
        return time.monotonic() - self.last_activity >= self.idle_timeout

    # reading ---------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        while len(self._rbuf) < n:
            try:
                chunk = self.t.recv(65536)
            except TimeoutError:
                if time.monotonic() - self.last_activity >= self.idle_timeout:
                    raise TimeoutError("SPDY connection idle") from None
                continue
            if not chunk:
                raise EOFError
            self._rbuf += chunk
            self.last_activity = time.monotonic()
        out = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return out

    def run(self) -> None:
        """Read and dispatch frames until EOF, error, GOAWAY or idle timeout; then close."""
        try:
            while not self.closed.is_set():
                head = self._recv_exact(8)
                word, flags_len = struct.unpack(">II", head)
                flags, length = flags_len >> 24, flags_len & 0xFFFFFF
                if length > MAX_FRAME_PAYLOAD:
                    raise SpdyError(f"frame of {length} bytes is too large")
                payload = self._recv_exact(length)
                if word & 0x80000000:
                    version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
                    if version != VERSION:
                        raise SpdyError(f"unsupported SPDY version {version}")
                    self._control(ftype, flags, payload)
                    if self.goaway_received:
                        break
                else:
                    self._data(word & 0x7FFFFFFF, flags, payload)
        except SpdyError:
            self.goaway(1)
        except (EOFError, OSError):
            pass
        finally:
            self.close()

    def _control(self, ftype: int, flags: int, p: bytes) -> None:
        if ftype == SYN_STREAM:
            if len(p) < 10:
                raise SpdyError("short SYN_STREAM")
            sid = struct.unpack(">I", p[:4])[0] & 0x7FFFFFFF
            headers = self._decompressor.decompress(p[10:])  # always, to keep zlib in step
            self._syn_stream(sid, flags, headers)
        elif ftype == SYN_REPLY:
            if len(p) < 4:
                raise SpdyError("short SYN_REPLY")
            sid = struct.unpack(">I", p[:4])[0] & 0x7FFFFFFF
            headers = self._decompressor.decompress(p[4:])
            st = self.streams.get(sid)
            if st is not None:
                st.reply_headers = headers
                st.replied.set()
                if flags & FLAG_FIN:
                    self._remote_fin(st)
        elif ftype == HEADERS:
            if len(p) < 4:
                raise SpdyError("short HEADERS")
            self._decompressor.decompress(p[4:])  # contents unused; keeps zlib in step
            st = self.streams.get(struct.unpack(">I", p[:4])[0] & 0x7FFFFFFF)
            if st is not None and flags & FLAG_FIN:
                self._remote_fin(st)
        elif ftype == RST_STREAM:
            if len(p) != 8:
                raise SpdyError("bad RST_STREAM")
            sid = struct.unpack(">I", p[:4])[0] & 0x7FFFFFFF
            st = self.streams.get(sid)
            if st is not None:
                self._on_reset(st)
        elif ftype == SETTINGS:
            if len(p) < 4:
                raise SpdyError("short SETTINGS")
            (count,) = struct.unpack(">I", p[:4])
            if len(p) != 4 + 8 * count:
                raise SpdyError("bad SETTINGS length")
            for i in range(count):
                idf, value = struct.unpack(">II", p[4 + 8 * i : 12 + 8 * i])
                if idf & 0xFFFFFF == SETTINGS_INITIAL_WINDOW_SIZE:
                    self._peer_initial_window_changed(value)
        elif ftype == PING:
            if len(p) != 4:
                raise SpdyError("bad PING")
            (pid,) = struct.unpack(">I", p)
            if (pid % 2 == 1) == self.server:  # the peer's ping: echo it
                self._send(control_frame(PING, 0, p))
        elif ftype == GOAWAY:
            self.goaway_received = True
        elif ftype == WINDOW_UPDATE:
            if len(p) != 8:
                raise SpdyError("bad WINDOW_UPDATE")
            sid, delta = struct.unpack(">II", p)
            sid &= 0x7FFFFFFF
            delta &= 0x7FFFFFFF
            with self._lock:
                self._peer_flow_control = True
                if sid == 0:
                    self._session_send_window += delta
                elif sid in self.streams:
                    self.streams[sid].send_window += delta
                self._window_cond.notify_all()
        # unknown control frame types are ignored, as the spec asks

    def _peer_initial_window_changed(self, value: int) -> None:
        with self._lock:
            delta = value - self._peer_initial_window
            self._peer_initial_window = value
            self._peer_flow_control = True
            for st in self.streams.values():
                st.send_window += delta
            self._window_cond.notify_all()

    def _syn_stream(self, sid: int, flags: int, headers: Headers) -> None:
        peer_parity = 1 if self.server else 0
        if sid == 0 or sid % 2 != peer_parity or sid <= self._last_peer_id:
            raise SpdyError(f"bad stream id {sid}")
        self._last_peer_id = sid
        with self._lock:
            refuse = len(self.streams) >= self.max_streams or self.on_stream is None
            if not refuse:
                st = SpdyStream(self, sid, headers, self.recv_window, self._peer_initial_window)
                st.local_closed = bool(flags & FLAG_UNIDIRECTIONAL)
                self.streams[sid] = st
        if refuse:
            self._send(control_frame(RST_STREAM, 0, struct.pack(">II", sid, REFUSED_STREAM)))
            return
        if flags & FLAG_FIN:
            self._remote_fin(st)
        assert self.on_stream is not None
        self.on_stream(st)

    def _remote_fin(self, st: SpdyStream) -> None:
        st.remote_closed = True
        st._inbox.finish()
        self._maybe_forget(st)

    def _data(self, sid: int, flags: int, payload: bytes) -> None:
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            # Dropped, but still credited to the session window. Data still in
            # flight for a stream that was reset is normal; a stream that was
            # never opened gets told so.
            self._consumed(None, len(payload))
            if st is None and (sid == 0 or sid > self._last_peer_id):
                self._send(control_frame(RST_STREAM, 0, struct.pack(">II", sid, INVALID_STREAM)))
            return
        # put() returns False if the stream went away while we waited: the data is dropped.
        accepted = not payload or st._inbox.put(
            payload, lambda: not self.closed.is_set() and not st.reset and not self.idle())
        if not accepted:
            self._consumed(None, len(payload))
            if self.idle():
                # The application has not read this stream for the whole idle timeout
                # and nothing else moved: treat the session as abandoned.
                raise TimeoutError("stream buffer full for the idle timeout")
        if flags & FLAG_FIN:
            self._remote_fin(st)

    # teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Tear down: every stream sees EOF/reset, writers and readers wake up."""
        if self.closed.is_set():
            return
        self.closed.set()
        with self._lock:
            streams = list(self.streams.values())
            self.streams.clear()
            self._window_cond.notify_all()
        for st in streams:
            st.reset = True
            if not st.replied.is_set():
                st.refused = True
                st.replied.set()
            st._inbox.finish()
        try:
            self.t.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.on_close is not None:
            self.on_close()
