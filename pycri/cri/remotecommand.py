"""Exec and attach sessions of the CRI streaming server ("remote command").

The streaming server (streaming.py) answers the HTTP upgrade and hands the
connection here; the command itself runs in the backend's exec() or attach(),
which sees file objects for stdin/stdout/stderr and a ResizeQueue.

- SPDY: X-Stream-Protocol-Version v4.channel.k8s.io, v3.channel.k8s.io,
  v2.channel.k8s.io, channel.k8s.io. The client opens one stream per
  `streamType` (error, stdin, stdout, stderr, resize); the result goes on the
  error stream (a JSON metav1.Status in v4, a plain message on failure before
  that).
- WebSocket: subprotocols v5.channel.k8s.io, v4.channel.k8s.io,
  channel.k8s.io and the base64 variants; one byte (or digit) channel prefix
  0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; v5's [255, 0] closes stdin.
  The exit status goes on the error channel as in SPDY v4 (v4 and v5).
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from pycri.cri import spdy, wsstream
from pycri.cri.portforward import start_thread

__all__ = ["REMOTECOMMAND_PROTOCOLS", "WS_REMOTECOMMAND_PROTOCOLS", "RemoteCommand",
           "ResizeQueue"]

REMOTECOMMAND_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                           "channel.k8s.io")
WS_REMOTECOMMAND_PROTOCOLS = wsstream.BINARY_PROTOCOLS + wsstream.BASE64_PROTOCOLS

LINGER = 2.0  # seconds to let the reader thread see the end of a session

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4


class ResizeQueue:
    """Terminal size changes, (width, height), newest kept when the consumer lags.

    Iterate it (ends when the stream closes) or call get(timeout).
    """

    def __init__(self, maxsize: int = 16) -> None:
        self._q: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize + 1)
        self._maxsize = maxsize
        self._closed = False

    def put(self, width: int, height: int) -> None:
        if self._closed:
            return
        while self._q.qsize() >= self._maxsize:
            try:
                self._q.get_nowait()  # drop the oldest: only the latest size matters
            except queue.Empty:
                break
        self._q.put((width, height))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._q.put_nowait(None)
            except queue.Full:
                pass

    def get(self, timeout: float | None = None) -> tuple[int, int] | None:
        """The next size; None once closed (or on timeout)."""
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._q.put(None)  # keep reporting closed
        return item

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            item = self.get()
            if item is None:
                return
            yield item


# ---------------------------------------------------------------------------
# File-object adapters the backend sees


class _InputFile(io.RawIOBase):
    """Client-to-backend bytes (stdin, port-forward data) as a readable raw file."""

    def __init__(self, read: Any) -> None:
        self._read = read

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._read(len(b))
        b[: len(data)] = data
        return len(data)


class _OutputFile(io.RawIOBase):
    """Backend-to-client bytes (stdout, stderr) as a writable raw file."""

    def __init__(self, write: Any) -> None:
        self._write = write

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if data:
            self._write(data)
        return len(data)


# ---------------------------------------------------------------------------
# Status messages on the error stream


def _status_json(exit_code: int | None, error: str | None, cmd: list[str] | None) -> bytes:
    if error is None and not exit_code:
        status: dict[str, Any] = {"metadata": {}, "status": "Success"}
    elif error is None:
        status = {
            "metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: "
                       f"command {cmd!r} exited with {exit_code}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
        }
    else:
        status = {"metadata": {}, "status": "Failure", "message": error,
                  "reason": "InternalError", "code": 500,
                  "details": {"causes": [{"message": error}]}}
    return json.dumps(status, separators=(",", ":")).encode()


def _status_message(exit_code: int | None, error: str | None, cmd: list[str] | None,
                    v4: bool) -> bytes:
    """What goes on the error stream: JSON status (v4+), else a message only on failure."""
    if v4:
        return _status_json(exit_code, error, cmd)
    if error is not None:
        return error.encode()
    if exit_code:
        return f"command terminated with non-zero exit code: exit status {exit_code}".encode()
    return b""


class _JsonSizes:
    """Decodes back-to-back JSON objects {"Width":..,"Height":..} from a byte stream."""

    def __init__(self, resize: ResizeQueue) -> None:
        self.buf = ""
        self.resize = resize
        self.decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> None:
        self.buf += data.decode("utf-8", "replace")
        if len(self.buf) > 64 * 1024:
            self.buf = ""  # garbage; a size never needs this much
            return
        while True:
            s = self.buf.lstrip()
            if not s:
                self.buf = ""
                return
            try:
                obj, end = self.decoder.raw_decode(s)
            except ValueError:
                self.buf = s
                return
            self.buf = s[end:]
            if isinstance(obj, dict):
                try:
                    w, h = int(obj.get("Width", 0)), int(obj.get("Height", 0))
                except (TypeError, ValueError):
                    continue
                if 0 <= w <= 0xFFFF and 0 <= h <= 0xFFFF:
                    self.resize.put(w, h)


# ---------------------------------------------------------------------------
# Sessions


class RemoteCommand:
    """Serves exec and attach sessions for one streaming server.

    backend: its StreamBackend (exec and attach are used).
    stream_creation_timeout: seconds a SPDY client has to open the streams it needs.
    buffer_size: bytes of stdin buffered for a WebSocket session (SPDY streams
        have their own window).
    """

    def __init__(self, backend: Any, *, stream_creation_timeout: float, buffer_size: int) -> None:
        self.backend = backend
        self.stream_creation_timeout = stream_creation_timeout
        self.buffer_size = buffer_size

    def serve_spdy(self, conn: spdy.SpdyConnection,
                   arrivals: queue.Queue[spdy.SpdyStream | None],
                   kind: str, req: Any, protocol: str, cancel: threading.Event) -> None:
        """Wait for the streams the request needs, run the command, and send its
        status on the error stream. `cancel` is set when the connection ends."""
        expected = {"error"}
        if req.stdin:
            expected.add("stdin")
        if req.stdout:
            expected.add("stdout")
        if req.stderr and not req.tty:
            expected.add("stderr")
        if req.tty and protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io"):
            expected.add("resize")
        streams: dict[str, spdy.SpdyStream] = {}
        deadline = time.monotonic() + self.stream_creation_timeout
        while set(streams) != expected:
            left = deadline - time.monotonic()
            if left <= 0:
                return  # kubelet gives up the same way: timed out waiting for streams
            try:
                st = arrivals.get(timeout=left)
            except queue.Empty:
                continue
            if st is None:
                return
            stype = (st.header("streamtype") or "").lower()
            if stype not in expected or stype in streams:
                st.send_reset(spdy.REFUSED_STREAM)
                continue
            st.send_reply()
            streams[stype] = st
        resize = ResizeQueue()
        pumps = []
        if "resize" in streams:
            pumps.append(start_thread(self._pump_resize, streams["resize"], resize))
        else:
            resize.close()
        stdin = _InputFile(streams["stdin"].read) if "stdin" in streams else None
        stdout = _OutputFile(streams["stdout"].write) if "stdout" in streams else None
        stderr = _OutputFile(streams["stderr"].write) if "stderr" in streams else None
        exit_code, error = self._call_backend(kind, req, stdin, stdout, stderr, resize, cancel)
        resize.close()
        for name in ("stdout", "stderr"):
            if name in streams:
                streams[name].close_write()
        msg = _status_message(exit_code, error, list(getattr(req, "cmd", [])),
                              protocol == "v4.channel.k8s.io")
        err_stream = streams["error"]
        try:
            if msg:
                err_stream.write(msg)
        except OSError:
            pass
        err_stream.close_write()
        for t in pumps:
            t.join(0.1)

    def _call_backend(self, kind: str, req: Any, stdin: Any, stdout: Any, stderr: Any,
                      resize: ResizeQueue, cancel: threading.Event
                      ) -> tuple[int | None, str | None]:
        try:
            if kind == "exec":
                code = int(self.backend.exec(req.container_id, list(req.cmd), tty=req.tty,
                                             stdin=stdin, stdout=stdout, stderr=stderr,
                                             resize=resize, cancel=cancel))
                # A process killed by signal N (Python reports -N) exits 128+N, as
                # shells and runc report it; clients reject negative codes.
                return (128 - code if code < 0 else code), None
            self.backend.attach(req.container_id, tty=req.tty, stdin=stdin, stdout=stdout,
                                stderr=stderr, resize=resize, cancel=cancel)
            return 0, None
        except Exception as e:  # noqa: BLE001 - any backend failure becomes the client's error status
            what = "executing command in" if kind == "exec" else "attaching to"
            return None, f"error {what} container {req.container_id}: {e}"

    @staticmethod
    def _pump_resize(stream: spdy.SpdyStream, resize: ResizeQueue) -> None:
        parser = _JsonSizes(resize)
        while True:
            data = stream.read(4096)
            if not data:
                break
            parser.feed(data)
        resize.close()

    def serve_websocket(self, channels: wsstream.Channels, kind: str, req: Any) -> None:
        """Run the command with its streams on the channels; its status goes on
        the error channel. The client leaving (or going idle) cancels it."""
        ws = channels.ws
        stdin_box = spdy._Inbox(self.buffer_size) if req.stdin else None
        resize = ResizeQueue()
        sizes = _JsonSizes(resize)
        cancel = threading.Event()
        finished = threading.Event()

        def reader() -> None:
            while True:
                msg = channels.recv()
                if msg is None:
                    break
                ch, data = msg
                if ch == STDIN and stdin_box is not None:
                    accepted = not data or stdin_box.put(
                        data, lambda: not ws.closed and not ws.idle())
                    if not accepted and ws.idle():
                        break  # stdin unread for the whole idle timeout: abandoned
                elif ch == RESIZE and req.tty:
                    sizes.feed(data)
                elif (ch == wsstream.CHANNEL_CLOSE and channels.version >= 5
                      and data[:1] == bytes([STDIN]) and stdin_box is not None):
                    stdin_box.finish()
            if stdin_box is not None:
                stdin_box.finish()
            resize.close()
            if not finished.is_set():
                cancel.set()  # the client left (or went idle) while the command ran

        def read_stdin(n: int) -> bytes:
            assert stdin_box is not None
            return stdin_box.get(n, None) or b""

        # Tell the client the streams are up (kubelet writes an empty message to
        # the lowest channel the client reads).
        first = STDOUT if req.stdout else STDERR if req.stderr and not req.tty else ERROR
        channels.send(first, b"")
        t = start_thread(reader)
        stdin = _InputFile(read_stdin) if stdin_box is not None else None
        stdout = _OutputFile(lambda d: channels.send(STDOUT, d)) if req.stdout else None
        stderr = (_OutputFile(lambda d: channels.send(STDERR, d))
                  if req.stderr and not req.tty else None)
        if not req.tty:
            resize.close()
        exit_code, error = self._call_backend(kind, req, stdin, stdout, stderr, resize, cancel)
        finished.set()
        msg = _status_message(exit_code, error, list(getattr(req, "cmd", [])),
                              channels.version >= 4)
        try:
            if msg:
                channels.send(ERROR, msg)
        except OSError:
            pass
        ws.close()
        t.join(LINGER)
