"""Port-forward sessions of the CRI streaming server.

The streaming server (streaming.py) answers the HTTP upgrade and hands the
connection here. Each forwarded TCP connection becomes one call of the
backend's port_forward() on one end of a socket pair; this module pumps the
other end to and from the client's streams.

- SPDY (portforward.k8s.io): the client opens a pair of streams, data and
  error, with the same requestID header (or, from old clients, error id =
  data id - 2) and a port header; one pair per TCP connection.
- WebSocket channel protocols (v4.channel.k8s.io, channel.k8s.io and the
  base64 variants): the ports come from the URL query (?port=80&port=443);
  port i has data channel 2i and error channel 2i+1, each first sent the port
  as 2 bytes little-endian. One TCP connection per port for the whole session.
- SPDY tunnelled in binary WebSocket messages (SPDY/3.1+portforward.k8s.io,
  what client-go's WebSocket port-forward dialer speaks): as SPDY above.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from typing import Any

from pycri.cri import spdy, wsstream
from pycri.cri._gen import api_pb2

__all__ = ["PORTFORWARD_PROTOCOL", "WS_PORTFORWARD_PROTOCOLS", "WS_SPDY_TUNNEL_PROTOCOL",
           "PortForwarder", "WebSocketPipe", "start_thread"]

PORTFORWARD_PROTOCOL = "portforward.k8s.io"
WS_PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                            "channel.k8s.io", "base64.channel.k8s.io")
WS_SPDY_TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"

LINGER = 2.0  # seconds to let a reader thread see the end of a session
MAX_WS_PORTS = 16
MAX_PENDING_PAIRS = 32


def start_thread(fn: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True, name=f"cri-streaming-{fn.__name__}")
    t.start()
    return t


def write_and_close(stream: spdy.SpdyStream, message: str) -> None:
    """Send a last message on a SPDY stream and half-close it."""
    try:
        stream.write(message.encode())
    except OSError:
        pass
    stream.close_write()


class PortForwarder:
    """Serves port-forward sessions for one streaming server.

    backend: its StreamBackend (only port_forward is used).
    idle_timeout: how long a pod-to-client copy may wait on a stalled client.
    stream_creation_timeout: seconds a SPDY client has to complete a stream pair.
    buffer_size: bytes buffered per WebSocket port (SPDY streams have their own window).
    """

    def __init__(self, backend: Any, *, idle_timeout: float, stream_creation_timeout: float,
                 buffer_size: int) -> None:
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.stream_creation_timeout = stream_creation_timeout
        self.buffer_size = buffer_size

    # SPDY --------------------------------------------------------------------
    def serve_spdy(self, conn: spdy.SpdyConnection,
                   arrivals: queue.Queue[spdy.SpdyStream | None],
                   req: api_pb2.PortForwardRequest) -> None:
        """Pair up the streams the client opens (until the connection ends) and
        forward each complete pair."""
        allowed = set(req.port)
        pairs: dict[str, dict[str, Any]] = {}
        workers: list[threading.Thread] = []
        while True:
            try:
                st = arrivals.get(timeout=1.0)
            except queue.Empty:
                st = None
                if not conn.closed.is_set():
                    self._expire_pairs(pairs)
                    workers = [w for w in workers if w.is_alive()]
                    continue
            if st is None:
                break
            stype = (st.header("streamtype") or "").lower()
            port_s = st.header("port") or ""
            request_id = st.header("requestid")
            if request_id is None:  # old clients: pair by stream id (data = error + 2)
                request_id = str(st.id if stype == "error" else st.id - 2)
            try:
                port = int(port_s)
            except ValueError:
                port = 0
            if stype not in ("data", "error") or not 0 < port <= 65535:
                st.send_reset(spdy.PROTOCOL_ERROR)
                continue
            st.send_reply()
            if allowed and port not in allowed:
                if stype == "error":
                    write_and_close(st, f"port {port} was not requested for forwarding")
                else:
                    st.close_write()
                continue
            pair = pairs.get(request_id)
            if pair is None:
                if len(pairs) >= MAX_PENDING_PAIRS:
                    st.send_reset(spdy.REFUSED_STREAM)
                    continue
                pair = pairs[request_id] = {"port": port, "created": time.monotonic()}
            if stype in pair or pair["port"] != port:
                st.send_reset(spdy.PROTOCOL_ERROR)
                continue
            pair[stype] = st
            if "data" in pair and "error" in pair:
                del pairs[request_id]
                workers.append(start_thread(self._forward_pair, req.pod_sandbox_id, port,
                                            pair["data"], pair["error"]))
        for pair in pairs.values():
            for key in ("data", "error"):
                if key in pair:
                    pair[key].send_reset(spdy.CANCEL)
        for w in workers:
            w.join(1.0)

    def _expire_pairs(self, pairs: dict[str, dict[str, Any]]) -> None:
        now = time.monotonic()
        for rid in [r for r, p in pairs.items() if now - p["created"] > self.stream_creation_timeout]:
            for key in ("data", "error"):
                if key in pairs[rid]:
                    pairs[rid][key].send_reset(spdy.CANCEL)
            del pairs[rid]

    def _forward_pair(self, sandbox_id: str, port: int, data: spdy.SpdyStream,
                      error: spdy.SpdyStream) -> None:
        err = self._forward(sandbox_id, port, data.read, data.write, data.close_write)
        if err:
            write_and_close(error, f"error forwarding port {port} to pod {sandbox_id}: {err}")
        else:
            error.close_write()
        data.close_write()

    # WebSocket channels ------------------------------------------------------------
    def serve_websocket(self, channels: wsstream.Channels, query_ports: list[str],
                        req: api_pb2.PortForwardRequest) -> None:
        """Forward the ports named in the URL query (else the request's) until each
        side is done; bad or unrequested ports close the WebSocket as a protocol error."""
        ws = channels.ws
        try:
            ports = [int(p) for p in query_ports] or list(req.port)
        except ValueError:
            ports = []
        if not ports or len(ports) > MAX_WS_PORTS or not all(0 < p <= 65535 for p in ports) or (
                req.port and not set(ports) <= set(req.port)):
            ws.close(wsstream.CLOSE_PROTOCOL_ERROR, "bad or unrequested ports")
            return
        boxes = [spdy._Inbox(self.buffer_size) for _ in ports]
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            channels.send(2 * i, prefix)
            channels.send(2 * i + 1, prefix)

        def reader() -> None:
            while True:
                msg = channels.recv()
                if msg is None:
                    break
                ch, data = msg
                if ch % 2 or ch // 2 >= len(boxes) or not data:
                    continue  # error channels are server-to-client only
                if not boxes[ch // 2].put(data, lambda: not ws.closed and not ws.idle()) \
                        and ws.idle():
                    break  # data unread for the whole idle timeout: abandoned
            for box in boxes:
                box.finish()

        def one(i: int, port: int) -> None:
            box = boxes[i]
            err = self._forward(req.pod_sandbox_id, port, lambda n: box.get(n, None) or b"",
                                lambda d: channels.send(2 * i, d), lambda: None)
            if err:
                with contextlib.suppress(OSError):
                    channels.send(2 * i + 1, f"error forwarding port {port} to pod "
                                             f"{req.pod_sandbox_id}: {err}".encode())

        rt = start_thread(reader)
        workers = [start_thread(one, i, p) for i, p in enumerate(ports)]
        for w in workers:
            w.join()
        ws.close()
        rt.join(LINGER)

    # the copy loop -------------------------------------------------------------------
    def _forward(self, sandbox_id: str, port: int, read: Any, write: Any, close_write: Any
                 ) -> str | None:
        """Run backend.port_forward on one end of a socket pair and pump the other
        end to/from a client stream. Returns an error message or None."""
        ours, theirs = socket.socketpair()
        ours.settimeout(None)

        def client_to_pod() -> None:
            try:
                while True:
                    chunk = read(65536)
                    if not chunk:
                        break
                    ours.sendall(chunk)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_WR)

        def pod_to_client() -> None:
            try:
                while True:
                    chunk = ours.recv(65536)
                    if not chunk:
                        break
                    write(chunk)
            except OSError:
                # The client is gone: make the backend's reads and writes fail too.
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                close_write()

        up = start_thread(client_to_pod)
        down = start_thread(pod_to_client)
        error = None
        try:
            self.backend.port_forward(sandbox_id, port, theirs)
        except Exception as e:  # noqa: BLE001 - reported to the client on the error stream
            error = str(e) or type(e).__name__
        finally:
            with contextlib.suppress(OSError):
                theirs.close()
        down.join(self.idle_timeout)
        with contextlib.suppress(OSError):
            ours.shutdown(socket.SHUT_RDWR)
        up.join(1.0)
        ours.close()
        return error


class WebSocketPipe:
    """A byte pipe made of binary WebSocket messages (SPDY tunnelled in WebSocket),
    with the socket-like methods SpdyConnection uses."""

    def __init__(self, ws: wsstream.WebSocket) -> None:
        self.ws = ws
        self._buf = b""

    def recv(self, n: int) -> bytes:
        while not self._buf:
            msg = self.ws.recv_message()
            if msg is None:
                return b""
            self._buf = msg[1]
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def sendall(self, data: bytes) -> None:
        self.ws.send_message(data)

    def shutdown(self, how: int) -> None:
        self.ws.close()
        if how == socket.SHUT_RDWR:
            with contextlib.suppress(OSError):
                self.ws.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.ws.close()
