"""The CRI streaming server (exec, attach, port-forward over SPDY/3.1 and WebSocket).

The backend here runs real host processes (a pty for tty sessions) and forwards
to a real TCP echo server, so the protocol layers carry real bytes. Clients:
a small SPDY client written here, a WebSocket client on wsproto's client side,
hand-made frames for the protocol errors, and the real crictl when it is
installed (it speaks the Go spdystream / gorilla websocket implementations that
kubelet and kubectl use, which is the independent check of our framing).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
import zlib
from typing import Any

import pytest

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from pycri.cri import spdy, wsstream
from pycri.cri._gen import api_pb2
from pycri.cri.streaming import ResizeQueue, StreamingServer
from pycri.errors import InvalidArgumentError, ResourceExhaustedError

CRICTL = os.environ.get("CRICTL") or shutil.which("crictl") or "/work/peers/bin/crictl"
HAVE_CRICTL = os.path.isfile(CRICTL) and os.access(CRICTL, os.X_OK)


# ---------------------------------------------------------------------------
# A backend made of host processes


def _copy_out(src_fd: int, dst: Any) -> None:
    """Copy a pipe or pty master to a client stream until EOF (EIO for a pty)."""
    while True:
        try:
            data = os.read(src_fd, 65536)
        except OSError:
            break
        if not data:
            break
        try:
            dst.write(data)
        except OSError:
            break


def _copy_in(src: Any, dst_fd: int, close: bool) -> None:
    try:
        while True:
            data = src.read(65536)
            if not data:
                break
            os.write(dst_fd, data)
    except OSError:
        pass
    if close:
        os.close(dst_fd)


def with_ctty(cmd: list[str]) -> list[str]:
    """Run cmd in a new session with its stdin (a pty) as controlling terminal,
    which stty and SIGWINCH need. util-linux setsid does it after exec, so no
    Python runs between fork and exec (unsafe here: gRPC threads are live)."""
    return ["setsid", "-c", *cmd]


class HostBackend:
    """exec runs cmd on the host; attach runs a stand-in "main process";
    port_forward connects to 127.0.0.1:<port>."""

    ATTACH_CMD = ("sh", "-c", "echo attached; echo to-stderr >&2; exec cat")

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.results: list[int] = []
        self.forwarded = 0
        self.forward_done = 0

    @staticmethod
    def _kill_on_cancel(proc: subprocess.Popen[bytes], cancel: threading.Event) -> None:
        while proc.poll() is None:
            if cancel.wait(0.05):
                proc.kill()
                return

    def _run(self, cmd: list[str], tty: bool, stdin: Any, stdout: Any, stderr: Any,
             resize: ResizeQueue, cancel: threading.Event) -> int:
        threads: list[threading.Thread] = []
        if tty:
            master, slave = pty.openpty()
            proc = subprocess.Popen(with_ctty(cmd), stdin=slave, stdout=slave, stderr=slave,
                                    close_fds=True)
            os.close(slave)
            threads.append(threading.Thread(target=self._kill_on_cancel, args=(proc, cancel),
                                            daemon=True))

            def apply_sizes() -> None:
                for width, height in resize:
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

            threads.append(threading.Thread(target=apply_sizes, daemon=True))
            if stdin is not None:
                threads.append(threading.Thread(target=_copy_in, args=(stdin, os.dup(master), True),
                                                daemon=True))
            out = threading.Thread(target=_copy_out, args=(master, stdout), daemon=True)
            for t in threads + [out]:
                t.start()
            rc = proc.wait()
            out.join(10)
            os.close(master)
            return rc
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True)
        assert proc.stdout and proc.stderr
        threads.append(threading.Thread(target=self._kill_on_cancel, args=(proc, cancel), daemon=True))
        outs = [threading.Thread(target=_copy_out, args=(proc.stdout.fileno(), stdout), daemon=True),
                threading.Thread(target=_copy_out,
                                 args=(proc.stderr.fileno(), stderr if stderr else stdout),
                                 daemon=True)]
        if stdin is not None:
            assert proc.stdin
            fd = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            threads.append(threading.Thread(target=_copy_in, args=(stdin, fd, True), daemon=True))
        for t in threads + outs:
            t.start()
        rc = proc.wait()
        for t in outs:
            t.join(10)
        proc.stdout.close()
        proc.stderr.close()
        return rc

    def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: Any, stdout: Any,
             stderr: Any, resize: ResizeQueue, cancel: threading.Event) -> int:
        self.calls.append(("exec", (container_id, cmd, tty)))
        if container_id == "broken":
            raise RuntimeError("container broken is not running")
        rc = self._run(cmd, tty, stdin, stdout, stderr, resize, cancel)
        self.results.append(rc)
        return rc

    def attach(self, container_id: str, *, tty: bool, stdin: Any, stdout: Any, stderr: Any,
               resize: ResizeQueue, cancel: threading.Event) -> None:
        # The stand-in main process lives only as long as the attach session; a
        # real runtime would detach on cancel and leave the container running.
        self.calls.append(("attach", (container_id, tty)))
        self._run(list(self.ATTACH_CMD), tty, stdin, stdout, stderr, resize, cancel)

    def port_forward(self, sandbox_id: str, port: int, sock: socket.socket) -> None:
        self.calls.append(("portforward", (sandbox_id, port)))
        pod = socket.create_connection(("127.0.0.1", port), timeout=5)
        pod.settimeout(None)
        self.forwarded += 1

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        up = threading.Thread(target=pipe, args=(sock, pod), daemon=True)
        up.start()
        pipe(pod, sock)
        up.join(30)
        pod.close()
        self.forward_done += 1


class EchoServer:
    """TCP echo on 127.0.0.1 (the "pod" port), half-close aware."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def backend() -> HostBackend:
    return HostBackend()


@pytest.fixture
def server(backend: HostBackend):
    srv = StreamingServer(backend, token_ttl=30, idle_timeout=30, stream_creation_timeout=5)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def echo():
    e = EchoServer()
    yield e
    e.close()


def exec_req(cmd: list[str], *, stdin=False, stdout=True, stderr=True, tty=False) -> api_pb2.ExecRequest:
    return api_pb2.ExecRequest(container_id="c1", cmd=cmd, stdin=stdin, stdout=stdout,
                               stderr=stderr, tty=tty)


# ---------------------------------------------------------------------------
# Clients


def http_upgrade(url: str, headers: list[tuple[str, str]], method: str = "POST"
                 ) -> tuple[socket.socket, int, dict[str, list[str]], bytes, bytes]:
    """Send an upgrade request; return (sock, status, headers, body-or-leftover)."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    target = u.path + (f"?{u.query}" if u.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc}"] + [f"{k}: {v}" for k, v in headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *hlines = head.decode().split("\r\n")
    status = int(status_line.split(" ")[1])
    hdrs: dict[str, list[str]] = {}
    for line in hlines:
        k, _, v = line.partition(":")
        hdrs.setdefault(k.strip().lower(), []).append(v.strip())
    body = rest
    if status != 101:
        n = int(hdrs.get("content-length", ["0"])[0])
        while len(body) < n:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
    return sock, status, hdrs, rest, body


def spdy_headers(protocols: list[str]) -> list[tuple[str, str]]:
    return [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")] + [
        ("X-Stream-Protocol-Version", p) for p in protocols]


class SpdyClient:
    def __init__(self, url: str, protocols: list[str]) -> None:
        sock, status, hdrs, rest, body = http_upgrade(url, spdy_headers(protocols))
        assert status == 101, (status, body)
        self.protocol = hdrs.get("x-stream-protocol-version", [""])[0]
        self.sock = sock
        sock.settimeout(None)
        self.conn = spdy.SpdyConnection(sock, server=False, idle_timeout=60)
        self.conn._rbuf += rest
        self.reader = threading.Thread(target=self.conn.run, daemon=True)
        self.reader.start()

    def open(self, **headers: str) -> spdy.SpdyStream:
        return self.conn.open_stream({k.lower(): [v] for k, v in headers.items()}, timeout=10)

    def close(self) -> None:
        self.conn.close()
        self.sock.close()


def read_all(stream: spdy.SpdyStream, timeout: float = 20) -> bytes:
    out = b""
    while True:
        data = stream.read(65536, timeout=timeout)
        if not data:
            return out
        out += data


def spdy_exec(url: str, req: Any, stdin_data: bytes | None = None,
              sizes: list[tuple[int, int]] | None = None,
              protocol: str = "v4.channel.k8s.io") -> tuple[bytes, bytes, bytes]:
    """Do what client-go's v4 executor does; return (stdout, stderr, error stream)."""
    c = SpdyClient(url, [protocol])
    assert c.protocol == protocol
    try:
        err = c.open(streamType="error")
        err.close_write()
        stdin = c.open(streamType="stdin") if req.stdin else None
        stdout = c.open(streamType="stdout") if req.stdout else None
        if stdout:
            stdout.close_write()
        stderr = c.open(streamType="stderr") if req.stderr and not req.tty else None
        if stderr:
            stderr.close_write()
        resize = c.open(streamType="resize") if req.tty else None
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            f_out = pool.submit(read_all, stdout) if stdout else None
            f_err = pool.submit(read_all, stderr) if stderr else None
            if resize:
                for w, h in sizes or []:
                    resize.write(json.dumps({"Width": w, "Height": h}).encode())
            if stdin is not None:
                # Like client-go: the command may end before reading stdin, and
                # then the server closes the stream under us.
                with contextlib.suppress(OSError):
                    if stdin_data:
                        stdin.write(stdin_data)
                    stdin.close_write()
            error = read_all(err)
            out = f_out.result(30) if f_out else b""
            errout = f_err.result(30) if f_err else b""
        return out, errout, error
    finally:
        c.close()


def ws_connect(url: str, protocols: list[str]) -> tuple[wsstream.WebSocket, str]:
    """Open a WebSocket with wsproto's client handshake (which checks the accept key)."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    conn = WSConnection(ConnectionType.CLIENT)
    target = u.path + (f"?{u.query}" if u.query else "")
    sock.sendall(conn.send(Request(host=u.netloc, target=target, subprotocols=protocols)))
    while True:
        data = sock.recv(4096)
        assert data, "server hung up during the handshake"
        conn.receive_data(data)
        for ev in conn.events():
            assert not isinstance(ev, RejectConnection), ev
            if isinstance(ev, AcceptConnection):
                assert conn.connection is not None
                sock.settimeout(None)
                return wsstream.WebSocket(sock, conn.connection), ev.subprotocol or ""


def ws_exec(url: str, req: Any, stdin_data: bytes | None = None, protocol: str = "v5.channel.k8s.io",
            sizes: list[tuple[int, int]] | None = None) -> dict[int, bytes]:
    ws, chosen = ws_connect(url, [protocol])
    assert chosen == protocol
    codec = wsstream.ChannelCodec(protocol)
    for w, h in sizes or []:
        ws.send_message(*codec.encode(4, json.dumps({"Width": w, "Height": h}).encode()))
    if stdin_data is not None:
        ws.send_message(*codec.encode(0, stdin_data))
        if codec.version >= 5:
            ws.send_message(bytes([255, 0]))
    got: dict[int, bytes] = {}
    while True:
        msg = ws.recv_message()
        if msg is None:
            break
        ch, data = codec.decode(*msg)
        got[ch] = got.get(ch, b"") + data
    ws.sock.close()
    return got


# ---------------------------------------------------------------------------
# Request validation, tokens, binding


def test_requests_validated_like_kubelet(server: StreamingServer) -> None:
    with pytest.raises(InvalidArgumentError):
        server.get_exec(exec_req(["true"], stdin=False, stdout=False, stderr=False))
    with pytest.raises(InvalidArgumentError):
        server.get_exec(exec_req(["true"], tty=True, stderr=True))
    with pytest.raises(InvalidArgumentError):
        server.get_exec(exec_req([]))
    with pytest.raises(InvalidArgumentError):
        server.get_exec(api_pb2.ExecRequest(cmd=["true"], stdout=True))
    with pytest.raises(InvalidArgumentError):
        server.get_attach(api_pb2.AttachRequest(container_id="c1", tty=True, stderr=True, stdout=True))
    with pytest.raises(InvalidArgumentError):
        server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[70000]))
    with pytest.raises(InvalidArgumentError):
        server.get_port_forward(api_pb2.PortForwardRequest(port=[80]))
    assert server.outstanding_tokens == 0


def test_urls_are_loopback_and_random(server: StreamingServer) -> None:
    urls = {server.get_exec(exec_req(["true"])).url for _ in range(20)}
    assert len(urls) == 20
    for url in urls:
        u = urllib.parse.urlsplit(url)
        assert u.scheme == "http" and u.hostname == "127.0.0.1" and u.port == server.port
        kind, token = u.path.strip("/").split("/")
        assert kind == "exec" and len(token) >= 40
    assert server.get_attach(api_pb2.AttachRequest(container_id="c", stdout=True)).url.split("/")[3] == "attach"
    assert server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url.split("/")[3] == "portforward"


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.1", "example.com", ""])
def test_non_loopback_bind_refused(backend: HostBackend, address: str) -> None:
    with pytest.raises(InvalidArgumentError):
        StreamingServer(backend, address=address)


def test_localhost_binds_loopback_only(backend: HostBackend) -> None:
    with StreamingServer(backend, address="localhost") as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        # The port is not reachable on another local address of this host.
        others = [a for a in _local_addresses() if not a.startswith("127.")]
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, srv.port), timeout=1).close()


def test_ipv6_loopback(backend: HostBackend) -> None:
    try:
        srv = StreamingServer(backend, address="::1")
        srv.start()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        req = exec_req(["echo", "v6"])
        url = srv.get_exec(req).url
        assert url.startswith(f"http://[::1]:{srv.port}/exec/")
        out, _, _ = spdy_exec(url, req)
        assert out == b"v6\n"
    finally:
        srv.stop()


def _local_addresses() -> list[str]:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out.split() if "." in a]


def test_token_is_single_use(server: StreamingServer) -> None:
    url = server.get_exec(exec_req(["echo", "once"])).url
    out, _, status = spdy_exec(url, exec_req(["echo", "once"]))
    assert out == b"once\n"
    assert json.loads(status)["status"] == "Success"
    sock, code, _, _, body = http_upgrade(url, spdy_headers(["v4.channel.k8s.io"]))
    sock.close()
    assert code == 404 and b"token" in body


def test_token_kind_must_match_path(server: StreamingServer) -> None:
    url = server.get_exec(exec_req(["true"])).url
    wrong = url.replace("/exec/", "/attach/")
    sock, code, _, _, _ = http_upgrade(wrong, spdy_headers(["v4.channel.k8s.io"]))
    sock.close()
    assert code == 404


def test_expired_token_rejected(backend: HostBackend) -> None:
    with StreamingServer(backend, token_ttl=0.3) as srv:
        url = srv.get_exec(exec_req(["true"])).url
        time.sleep(0.6)
        sock, code, _, _, _ = http_upgrade(url, spdy_headers(["v4.channel.k8s.io"]))
        sock.close()
        assert code == 404
        assert srv.outstanding_tokens == 0


def test_outstanding_tokens_bounded(backend: HostBackend) -> None:
    with StreamingServer(backend, max_tokens=3) as srv:
        for _ in range(3):
            srv.get_exec(exec_req(["true"]))
        with pytest.raises(ResourceExhaustedError):
            srv.get_exec(exec_req(["true"]))


def test_unknown_paths_and_bad_upgrades(server: StreamingServer) -> None:
    base = server.base_url
    for path in ["/", "/exec", "/exec/", "/foo/abc", "/exec/abc/def", "/exec/nosuchtoken"]:
        sock, code, _, _, _ = http_upgrade(base + path, spdy_headers(["v4.channel.k8s.io"]))
        sock.close()
        assert code == 404, path
    url = server.get_exec(exec_req(["echo", "still-valid"])).url
    # Not an upgrade at all.
    sock, code, _, _, _ = http_upgrade(url, [])
    sock.close()
    assert code == 400
    # A protocol we do not speak: 403 with the list we do (like kubelet).
    sock, code, hdrs, _, _ = http_upgrade(url, spdy_headers(["v9.channel.k8s.io"]))
    sock.close()
    assert code == 403
    assert "v4.channel.k8s.io" in hdrs["x-accept-stream-protocol-version"]
    # A failed negotiation streamed nothing, so the token still works once.
    out, _, _ = spdy_exec(url, exec_req(["echo", "still-valid"]))
    assert out == b"still-valid\n"


def test_oversized_request_head_rejected(server: StreamingServer) -> None:
    url = server.get_exec(exec_req(["true"])).url
    sock, code, _, _, _ = http_upgrade(url, [("X-Junk", "a" * 20000)])
    sock.close()
    assert code == 431


def test_slow_request_head_dropped(backend: HostBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from pycri.cri import streaming

    monkeypatch.setattr(streaming, "REQUEST_HEAD_TIMEOUT", 0.5)
    with StreamingServer(backend) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET /exec/x HTTP/1.1\r\n")  # and never finish
        s.settimeout(5)
        assert s.recv(100) == b""  # server hung up
        s.close()
        _wait(lambda: srv.active_connections == 0)


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_connection_count_bounded(backend: HostBackend) -> None:
    with StreamingServer(backend, max_connections=2) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        _wait(lambda: srv.active_connections == 2)
        url = srv.get_exec(exec_req(["true"])).url
        sock, code, _, _, _ = http_upgrade(url, spdy_headers(["v4.channel.k8s.io"]))
        sock.close()
        assert code == 503
        for s in idle:
            s.close()


# ---------------------------------------------------------------------------
# SPDY exec / attach


def test_spdy_exec_stdout_stderr_separate(server: StreamingServer) -> None:
    req = exec_req(["sh", "-c", "echo out; echo err >&2; echo out2"])
    out, err, status = spdy_exec(server.get_exec(req).url, req)
    assert out == b"out\nout2\n"
    assert err == b"err\n"
    assert json.loads(status) == {"metadata": {}, "status": "Success"}


def test_spdy_exec_nonzero_exit_code(server: StreamingServer) -> None:
    req = exec_req(["sh", "-c", "exit 7"])
    _, _, status = spdy_exec(server.get_exec(req).url, req)
    st = json.loads(status)
    assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
    assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]


def test_spdy_exec_killed_by_signal(server: StreamingServer) -> None:
    req = exec_req(["sh", "-c", "kill -TERM $$"])
    _, _, status = spdy_exec(server.get_exec(req).url, req)
    assert json.loads(status)["details"]["causes"] == [{"reason": "ExitCode", "message": "143"}]


def test_spdy_exec_backend_failure_reported(server: StreamingServer) -> None:
    req = api_pb2.ExecRequest(container_id="broken", cmd=["true"], stdout=True)
    _, _, status = spdy_exec(server.get_exec(req).url, req)
    st = json.loads(status)
    assert st["status"] == "Failure" and "not running" in st["message"]


@pytest.mark.parametrize("protocol", ["v3.channel.k8s.io", "v2.channel.k8s.io"])
def test_spdy_exec_old_protocols_plain_error(server: StreamingServer, protocol: str) -> None:
    req = exec_req(["sh", "-c", "echo hi; exit 3"])
    out, _, status = spdy_exec(server.get_exec(req).url, req, protocol=protocol)
    assert out == b"hi\n"
    assert b"exit" in status and not status.startswith(b"{")
    req = exec_req(["true"])
    _, _, status = spdy_exec(server.get_exec(req).url, req, protocol=protocol)
    assert status == b""


def test_spdy_exec_stdin_then_eof(server: StreamingServer) -> None:
    data = os.urandom(300_000)  # several windows' worth: flow control both ways
    req = exec_req(["cat"], stdin=True)
    out, err, status = spdy_exec(server.get_exec(req).url, req, stdin_data=data)
    assert out == data and err == b""
    assert json.loads(status)["status"] == "Success"


def test_spdy_exec_large_output(server: StreamingServer) -> None:
    req = exec_req(["head", "-c", "3000000", "/dev/zero"])
    out, _, status = spdy_exec(server.get_exec(req).url, req)
    assert out == bytes(3_000_000)
    assert json.loads(status)["status"] == "Success"


def test_spdy_server_honours_client_window(server: StreamingServer) -> None:
    """A flow-controlling client with a small window: the server never has more
    unacknowledged data in flight on a stream than the client allowed."""
    req = exec_req(["head", "-c", "1000000", "/dev/zero"], stderr=False)
    sock, code, _, rest, _ = http_upgrade(server.get_exec(req).url, spdy_headers(["v4.channel.k8s.io"]))
    assert code == 101
    window = 16 * 1024
    conn = spdy.SpdyConnection(sock, server=False, recv_window=window)
    conn._rbuf += rest
    violations: list[int] = []
    plain_data = conn._data

    def checked_data(sid: int, flags: int, payload: bytes) -> None:
        st = conn.streams.get(sid)
        if st is not None:
            outstanding = st._inbox.size + st._unacked + len(payload)
            if outstanding > window:
                violations.append(outstanding)
        plain_data(sid, flags, payload)

    conn._data = checked_data  # type: ignore[method-assign]
    conn.start()  # SETTINGS: our 16 KiB stream window
    threading.Thread(target=conn.run, daemon=True).start()
    err = conn.open_stream({"streamtype": ["error"]})
    out = conn.open_stream({"streamtype": ["stdout"]})
    got = 0
    while True:
        data = out.read(4096, timeout=20)
        if not data:
            break
        got += len(data)
        time.sleep(0.0005)  # a slow reader
    assert got == 1_000_000
    assert json.loads(read_all(err))["status"] == "Success"
    assert violations == []
    conn.close()
    sock.close()


def test_spdy_client_without_flow_control(server: StreamingServer) -> None:
    """Go's spdystream never sends WINDOW_UPDATE: after the first 64 KiB window the
    server stops waiting for updates that will not come, and delivers everything."""
    req = exec_req(["head", "-c", "1000000", "/dev/zero"], stderr=False)
    c = SpdyClient(server.get_exec(req).url, ["v4.channel.k8s.io"])
    c.conn._consumed = lambda stream, n: None  # type: ignore[method-assign]
    err = c.open(streamType="error")
    out = c.open(streamType="stdout")
    t0 = time.monotonic()
    assert len(read_all(out)) == 1_000_000
    assert json.loads(read_all(err))["status"] == "Success"
    assert time.monotonic() - t0 < 10
    c.close()


def test_spdy_exec_tty_with_resize(server: StreamingServer) -> None:
    script = ('for i in $(seq 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.05; done; '
              'echo "size=$s"; [ -t 0 ] && echo tty')
    req = exec_req(["sh", "-c", script], stdin=False, stderr=False, tty=True)
    out, _, status = spdy_exec(server.get_exec(req).url, req, sizes=[(120, 40)])
    assert b"size=40 120" in out and b"tty" in out
    assert json.loads(status)["status"] == "Success"


def test_spdy_exec_tty_stdin(server: StreamingServer) -> None:
    req = exec_req(["sh", "-c", "read line; echo got:$line"], stdin=True, stderr=False, tty=True)
    out, _, _ = spdy_exec(server.get_exec(req).url, req, stdin_data=b"hello\n", sizes=[(80, 24)])
    assert b"got:hello" in out


def test_spdy_attach(server: StreamingServer, backend: HostBackend) -> None:
    req = api_pb2.AttachRequest(container_id="c9", stdin=True, stdout=True, stderr=True)
    out, err, status = spdy_exec(server.get_attach(req).url, req, stdin_data=b"typed\n")
    assert out == b"attached\ntyped\n" and err == b"to-stderr\n"
    assert json.loads(status)["status"] == "Success"
    assert ("attach", ("c9", False)) in backend.calls


def test_spdy_missing_streams_time_out(backend: HostBackend) -> None:
    with StreamingServer(backend, stream_creation_timeout=0.5) as srv:
        req = exec_req(["echo", "never"])
        c = SpdyClient(srv.get_exec(req).url, ["v4.channel.k8s.io"])
        c.open(streamType="error")  # but never stdout / stderr
        assert c.conn.closed.wait(5), "server should give up and hang up"
        c.close()
        assert backend.calls == []


def test_spdy_unexpected_stream_refused(server: StreamingServer) -> None:
    req = exec_req(["echo", "x"], stderr=False)
    c = SpdyClient(server.get_exec(req).url, ["v4.channel.k8s.io"])
    with pytest.raises(ConnectionResetError):
        c.open(streamType="stderr")  # not asked for
    with pytest.raises(ConnectionResetError):
        c.open(streamType="bogus")
    c.close()


def test_spdy_idle_connection_closed(backend: HostBackend) -> None:
    with StreamingServer(backend, idle_timeout=1.0) as srv:
        req = exec_req(["sleep", "1000"], stdin=True)
        c = SpdyClient(srv.get_exec(req).url, ["v4.channel.k8s.io"])
        c.open(streamType="error")
        assert c.conn.closed.wait(10), "idle connection was not closed"
        c.close()
        _wait(lambda: srv.active_connections == 0)


def test_spdy_client_gone_cancels_exec(server: StreamingServer, backend: HostBackend) -> None:
    req = exec_req(["sh", "-c", "echo started; exec sleep 1000"])
    c = SpdyClient(server.get_exec(req).url, ["v4.channel.k8s.io"])
    c.open(streamType="error")
    out = c.open(streamType="stdout")
    c.open(streamType="stderr")
    assert out.read(100, timeout=10) == b"started\n"
    c.close()  # hang up without a word
    _wait(lambda: backend.results == [-9])
    _wait(lambda: server.active_connections == 0)


def test_spdy_garbage_after_upgrade(server: StreamingServer) -> None:
    req = exec_req(["true"])
    sock, code, _, _, _ = http_upgrade(server.get_exec(req).url, spdy_headers(["v4.channel.k8s.io"]))
    assert code == 101
    # A control frame of an unknown version, then an oversized frame length.
    sock.sendall(b"\x80\x07\x00\x01\x00\x00\x00\x00" + b"\x00" * 16)
    sock.settimeout(10)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data  # our SETTINGS + GOAWAY, then the server hung up
    _wait(lambda: server.active_connections == 0)


def test_spdy_oversize_frame_refused(server: StreamingServer) -> None:
    req = exec_req(["cat"], stdin=True)
    sock, code, _, rest, _ = http_upgrade(server.get_exec(req).url, spdy_headers(["v4.channel.k8s.io"]))
    assert code == 101
    # A DATA frame header announcing 16 MiB - 1: refused before any of it is buffered.
    sock.sendall(struct.pack(">II", 1, 0xFFFFFF))
    frames = read_raw_frames(sock, rest)
    sock.close()
    assert frames[-1][0] == spdy.GOAWAY
    _wait(lambda: server.active_connections == 0)


def test_spdy_header_blocks() -> None:
    comp, decomp = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    for headers in [{"streamtype": ["error"]}, {"streamtype": ["data"], "port": ["80"], "requestid": ["0"]},
                    {"x": ["a", "b"]}, {}]:
        assert decomp.decompress(comp.compress(headers)) == headers  # one zlib stream throughout
    assert spdy.decode_header_block(spdy.encode_header_block({"StreamType": ["x"]})) == {"streamtype": ["x"]}
    for raw in [b"", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
                struct.pack(">I", 10_000), struct.pack(">III", 1, 0, 0)]:
        with pytest.raises(spdy.SpdyError):
            spdy.decode_header_block(raw)
    with pytest.raises(spdy.SpdyError):
        spdy.HeaderDecompressor().decompress(b"not zlib at all")


def test_spdy_decompression_bomb_refused() -> None:
    comp = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", 10_000_000) + bytes(10_000_000)
    data = comp.compress(block) + comp.flush(zlib.Z_SYNC_FLUSH)
    assert len(data) < 20_000
    with pytest.raises(spdy.SpdyError):
        spdy.HeaderDecompressor().decompress(data)


def test_spdy_stdin_backpressure_bounded(backend: HostBackend) -> None:
    """A client that ignores flow control floods stdin of a process that never
    reads: the server's memory stays bounded (TCP pushes back on the client), and
    once nothing has moved for the idle timeout the session is dropped and the
    command cancelled."""
    with StreamingServer(backend, buffer_size=64 * 1024, idle_timeout=1.5) as srv:
        req = exec_req(["sleep", "1000"], stdin=True)
        c = SpdyClient(srv.get_exec(req).url, ["v4.channel.k8s.io"])
        c.open(streamType="error")
        stdin = c.open(streamType="stdin")
        c.open(streamType="stdout")
        c.open(streamType="stderr")
        c.conn._ignore_send_windows = True  # behave like spdystream
        sent = 0
        c.sock.settimeout(1)
        chunk = bytes(32 * 1024)
        with contextlib.suppress(OSError):
            while sent < 64 * 1024 * 1024:
                stdin.write(chunk)
                sent += len(chunk)
        assert sent < 32 * 1024 * 1024, "server accepted far more than its buffers"
        _wait(lambda: backend.results == [-9])
        _wait(lambda: srv.active_connections == 0)
        c.close()


def test_spdy_ping_answered(server: StreamingServer) -> None:
    req = exec_req(["true"])
    sock, code, _, _, _ = http_upgrade(server.get_exec(req).url, spdy_headers(["v4.channel.k8s.io"]))
    assert code == 101
    sock.sendall(spdy.control_frame(spdy.PING, 0, struct.pack(">I", 41)))
    sock.settimeout(5)
    buf = b""
    deadline = time.monotonic() + 5
    while spdy.control_frame(spdy.PING, 0, struct.pack(">I", 41)) not in buf:
        assert time.monotonic() < deadline
        buf += sock.recv(4096)
    sock.close()


# What crictl 1.36 (client-go over moby/spdystream, Go's zlib) sent after the
# upgrade for `crictl exec -i c1 ...` with stdin "hello from go\n", recorded on
# the wire: SYN_STREAMs for error, stdin, stdout, stderr (ids 1, 3, 5, 7; header
# blocks in one continuing zlib stream), a DATA frame on stdin, then stdin's FIN.
# Replaying it checks our framing against an independent implementation in CI,
# where crictl is absent.
GO_EXEC_FRAMES = bytes.fromhex(
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800"
    "000000ffff800300010000001700000003000000000000c22e555c92929907000000ffff8003000100000019"
    "00000005000000000000c22ac5565c92925f5a02000000ffff800300010000001500000007000000000000c2"
    "29975a5404000000ffff000000030000000e68656c6c6f2066726f6d20676f0a0000000301000000"
)


def read_raw_frames(sock: socket.socket, buf: bytes = b"") -> list[tuple[int, int, int, bytes]]:
    """(control type or -1 for data, stream id, flags, payload) until EOF."""
    sock.settimeout(20)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    frames = []
    while buf:
        word, flags_len = struct.unpack(">II", buf[:8])
        n = flags_len & 0xFFFFFF
        payload, buf = buf[8 : 8 + n], buf[8 + n :]
        if word & 0x80000000:
            sid = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
            frames.append((word & 0xFFFF, sid, flags_len >> 24, payload))
        else:
            frames.append((-1, word, flags_len >> 24, payload))
    return frames


def test_spdy_replay_of_go_client(server: StreamingServer) -> None:
    req = exec_req(["cat"], stdin=True)
    sock, code, _, rest, _ = http_upgrade(server.get_exec(req).url, spdy_headers(
        ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io"]))
    assert code == 101
    sock.sendall(GO_EXEC_FRAMES)
    frames = read_raw_frames(sock, rest)
    sock.close()
    replies = {sid for kind, sid, _, _ in frames if kind == spdy.SYN_REPLY}
    assert replies == {1, 3, 5, 7}
    data: dict[int, bytes] = {}
    fins = set()
    for kind, sid, flags, payload in frames:
        if kind == -1:
            data[sid] = data.get(sid, b"") + payload
            if flags & spdy.FLAG_FIN:
                fins.add(sid)
    assert data[5] == b"hello from go\n"
    assert json.loads(data[1]) == {"metadata": {}, "status": "Success"}
    assert {1, 5, 7} <= fins


# ---------------------------------------------------------------------------
# WebSocket exec / attach


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io",
                                      "v4.base64.channel.k8s.io", "channel.k8s.io"])
def test_ws_exec_channels(server: StreamingServer, protocol: str) -> None:
    req = exec_req(["sh", "-c", "echo out; echo err >&2; exit 4"])
    got = ws_exec(server.get_exec(req).url, req, protocol=protocol)
    assert got[1] == b"out\n" and got[2] == b"err\n"
    if protocol.startswith(("v4", "v5")):
        st = json.loads(got[3])
        assert st["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]
    else:
        assert b"exit" in got[3]


def test_ws_exec_success_status(server: StreamingServer) -> None:
    req = exec_req(["echo", "ok"])
    got = ws_exec(server.get_exec(req).url, req)
    assert got[1] == b"ok\n"
    assert json.loads(got[3]) == {"metadata": {}, "status": "Success"}


def test_ws_v5_stdin_close(server: StreamingServer) -> None:
    data = os.urandom(200_000)
    req = exec_req(["cat"], stdin=True)
    got = ws_exec(server.get_exec(req).url, req, stdin_data=data)
    assert got[1] == data
    assert json.loads(got[3])["status"] == "Success"


def test_ws_tty_resize(server: StreamingServer) -> None:
    script = ('for i in $(seq 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.05; done; '
              'echo "size=$s"')
    req = exec_req(["sh", "-c", script], stderr=False, tty=True)
    got = ws_exec(server.get_exec(req).url, req, sizes=[(100, 30)])
    assert b"size=30 100" in got[1]


def test_ws_attach(server: StreamingServer) -> None:
    req = api_pb2.AttachRequest(container_id="c2", stdin=True, stdout=True, stderr=True)
    got = ws_exec(server.get_attach(req).url, req, stdin_data=b"ws-typed\n")
    assert got[1] == b"attached\nws-typed\n" and got[2] == b"to-stderr\n"


def test_ws_oversize_message_closes(server: StreamingServer) -> None:
    req = exec_req(["cat"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    ws.send_message(b"\x00" + bytes(wsstream.MAX_MESSAGE + 10))
    while ws.recv_message() is not None:
        pass
    ws.sock.close()
    _wait(lambda: server.active_connections == 0)


def test_ws_unmasked_client_frame_is_protocol_error(server: StreamingServer) -> None:
    req = exec_req(["cat"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    ws.sock.sendall(b"\x82\x02\x00a")  # binary, unmasked
    ws.sock.settimeout(10)
    data = b""
    while True:
        chunk = ws.sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert struct.pack(">H", wsstream.CLOSE_PROTOCOL_ERROR) in data
    ws.sock.close()


def test_ws_idle_connection_closed(backend: HostBackend) -> None:
    with StreamingServer(backend, idle_timeout=1.0) as srv:
        req = exec_req(["sleep", "1000"], stdin=True)
        ws, _ = ws_connect(srv.get_exec(req).url, ["v5.channel.k8s.io"])
        t0 = time.monotonic()
        while ws.recv_message() is not None:  # the empty "ready" message, then the close
            pass
        assert time.monotonic() - t0 < 10
        ws.sock.close()
        _wait(lambda: srv.active_connections == 0)
        assert backend.results == [-9]  # cancel reached the backend, which killed sleep


def test_ws_pings_answered(server: StreamingServer) -> None:
    req = exec_req(["sh", "-c", "sleep 0.5; echo done"])
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    ws.ping(b"hb")
    ws.sock.settimeout(10)
    # The pong arrives before any data message; recv_message skips it, so read raw.
    raw = b""
    while b"\x8a\x02hb" not in raw:
        chunk = ws.sock.recv(4096)
        assert chunk
        raw += chunk
    ws.sock.close()


# ---------------------------------------------------------------------------
# WebSocket protocol errors, checked on the wire with hand-made frames


def raw_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
              length: int | None = None, key: bytes | None = None) -> bytes:
    """One client frame; `length` may claim more payload than is given."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if mask:
        key = os.urandom(4) if key is None else key
        head += key
        pad = (key * (len(payload) // 4 + 1))[: len(payload)]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(pad, "big")).to_bytes(
            len(payload), "big") if payload else b""
    return bytes(head) + payload


def server_frames(sock: socket.socket, timeout: float = 15) -> list[tuple[int, bytes]]:
    """Every frame the server sends until it hangs up: (opcode, payload)."""
    sock.settimeout(timeout)
    raw = b""
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    frames = []
    while raw:
        b0, b1 = raw[0], raw[1]
        assert not b1 & 0x80, "server frames are never masked"
        n, off = b1 & 0x7F, 2
        if n == 126:
            (n,), off = struct.unpack(">H", raw[2:4]), 4
        elif n == 127:
            (n,), off = struct.unpack(">Q", raw[2:10]), 10
        assert len(raw) >= off + n, "truncated frame"
        frames.append((b0 & 0x0F, raw[off: off + n]))
        raw = raw[off + n:]
    return frames


def close_code(frames: list[tuple[int, bytes]]) -> int:
    closes = [payload for op, payload in frames if op == 0x8]
    assert len(closes) == 1, frames
    return int(struct.unpack(">H", closes[0][:2])[0])


BAD_FRAMES = {
    "unmasked": (raw_frame(0x2, b"\x00a", mask=False), 1002),
    "reserved bit without extension": (raw_frame(0x2, b"\x00a", rsv=0x40), 1002),
    "unknown opcode": (raw_frame(0x3, b"x"), 1002),
    "fragmented ping": (raw_frame(0x9, b"p", fin=False), 1002),
    "ping over 125 bytes": (raw_frame(0x9, b"p" * 126), 1002),
    "continuation without a message": (raw_frame(0x0, b"\x00a"), 1002),
    "new message inside a fragmented one": (
        raw_frame(0x2, b"\x00a", fin=False) + raw_frame(0x2, b"\x00b"), 1002),
    "close code out of range": (raw_frame(0x8, struct.pack(">H", 999)), 1002),
    "text that is not UTF-8": (raw_frame(0x1, b"\x00\xff\xfe"), 1007),
    # Claims 1 TiB, sends a little over the 1 MiB message limit (a zero mask key
    # leaves the payload as is).
    "oversized frame": (raw_frame(0x2, bytes(wsstream.MAX_MESSAGE + 4096), length=1 << 40,
                                  key=b"\0\0\0\0"), 1009),
    "oversized fragmented message": (
        b"".join(raw_frame(0x2 if i == 0 else 0x0, bytes(65536), fin=False)
                 for i in range(wsstream.MAX_MESSAGE // 65536 + 1)), 1009),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_ws_bad_frame_closes_and_kills_exec(server: StreamingServer, backend: HostBackend,
                                            case: str) -> None:
    """A broken frame gets the close code RFC 6455 asks for, and the command
    the session was running is cancelled (killed), not left behind."""
    data, code = BAD_FRAMES[case]
    req = exec_req(["sleep", "1000"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    _wait(lambda: backend.calls)
    ws.sock.sendall(data)
    frames = server_frames(ws.sock)
    ws.sock.close()
    assert close_code(frames) == code
    assert not [f for f in frames if f[0] == 0x2 and f[1][:1] == b"\x03"]  # no status after
    _wait(lambda: backend.results == [-9])
    _wait(lambda: server.active_connections == 0)


def test_ws_bad_channel_message_closes(server: StreamingServer, backend: HostBackend) -> None:
    """Well-formed WebSocket, bad Kubernetes framing: a binary message on a base64 protocol."""
    req = exec_req(["sleep", "1000"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v4.base64.channel.k8s.io"])
    ws.send_message(b"0aGk=")  # binary, not text
    frames = server_frames(ws.sock)
    ws.sock.close()
    assert close_code(frames) == 1002
    _wait(lambda: backend.results == [-9])
    _wait(lambda: server.active_connections == 0)


def test_ws_client_close_answered_and_cancels(server: StreamingServer, backend: HostBackend) -> None:
    req = exec_req(["sleep", "1000"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    _wait(lambda: backend.calls)
    ws.sock.sendall(raw_frame(0x8, struct.pack(">H", 1000) + b"bye"))
    frames = server_frames(ws.sock)
    ws.sock.close()
    assert close_code(frames) == 1000  # the closing handshake is answered with the same code
    _wait(lambda: backend.results == [-9])
    _wait(lambda: server.active_connections == 0)


def test_ws_fragmented_stdin_with_ping_inside(server: StreamingServer) -> None:
    """A message split over frames, with a ping between them, arrives whole."""
    req = exec_req(["cat"], stdin=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    ws.sock.sendall(raw_frame(0x2, b"\x00frag", fin=False) + raw_frame(0x9, b"mid")
                    + raw_frame(0x0, b"mented ", fin=False) + raw_frame(0x0, b"stdin")
                    + raw_frame(0x2, bytes([255, 0])))
    frames = server_frames(ws.sock)
    ws.sock.close()
    assert (0xA, b"mid") in frames
    out = b"".join(p[1:] for op, p in frames if op == 0x2 and p[:1] == b"\x01")
    assert out == b"fragmented stdin"
    status = b"".join(p[1:] for op, p in frames if op == 0x2 and p[:1] == b"\x03")
    assert json.loads(status)["status"] == "Success"
    assert close_code(frames) == 1000


@pytest.mark.parametrize("headers,status", [
    ([("Sec-WebSocket-Version", "13")], 400),  # no key
    ([("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "8")], 426),
    ([("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], 400),  # no version
])
def test_ws_bad_handshake_clean_error(server: StreamingServer, backend: HostBackend,
                                      headers: list[tuple[str, str]], status: int) -> None:
    req = exec_req(["echo", "after"])
    url = server.get_exec(req).url
    sock, code, hdrs, _, body = http_upgrade(
        url, [("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"), *headers], method="GET")
    sock.close()
    assert code == status and b"websocket handshake" in body, (code, body)
    if status == 426:
        assert hdrs["sec-websocket-version"] == ["13"]
    assert backend.calls == []  # nothing was started
    # The token survives a handshake that went nowhere.
    assert ws_exec(url, req)[1] == b"after\n"


def test_ws_post_upgrade_refused(server: StreamingServer, backend: HostBackend) -> None:
    url = server.get_exec(exec_req(["true"])).url
    sock, code, _, _, _ = http_upgrade(
        url, [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")], method="POST")
    sock.close()
    assert code == 400 and backend.calls == []


def test_ws_unknown_subprotocol_refused(server: StreamingServer, backend: HostBackend) -> None:
    url = server.get_exec(exec_req(["true"])).url
    sock, code, _, _, body = http_upgrade(
        url, [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
              ("Sec-WebSocket-Protocol", "v9.channel.k8s.io")], method="GET")
    sock.close()
    assert code == 403 and b"v9.channel.k8s.io" in body and backend.calls == []


def test_ws_tty_stdin_and_several_resizes(server: StreamingServer) -> None:
    """tty exec: typed input echoes back through the pty; every size change is seen."""
    script = ('trap \'echo "winch=$(stty size)"\' WINCH; '
              'for i in $(seq 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.05; done; '
              'echo "size=$s"; read line; echo "got=$line"; '
              'for i in $(seq 100); do [ "$(stty size)" = "50 132" ] && break; sleep 0.05; done; '
              'echo "final=$(stty size)"; exit 3')
    req = exec_req(["sh", "-c", script], stdin=True, stderr=False, tty=True)
    ws, _ = ws_connect(server.get_exec(req).url, ["v5.channel.k8s.io"])
    ws.send_message(b"\x04" + json.dumps({"Width": 80, "Height": 24}).encode())
    got: dict[int, bytes] = {}

    def until(ch: int, text: bytes) -> None:
        while text not in got.get(ch, b""):
            msg = ws.recv_message()
            assert msg is not None, got
            got[msg[1][0]] = got.get(msg[1][0], b"") + msg[1][1:]

    until(1, b"size=24 80")
    ws.send_message(b"\x00hello tty\r")
    until(1, b"got=hello tty")
    ws.send_message(b"\x04" + json.dumps({"Width": 132, "Height": 50}).encode())
    until(1, b"final=50 132")
    until(3, b"}")
    status = json.loads(got[3])
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert b"hello tty" in got[1].split(b"got=")[0]  # the pty echoed the input
    assert ws.recv_message() is None  # the server closes after the status
    ws.sock.close()


def test_ws_v4_stdin_has_no_close_signal(server: StreamingServer) -> None:
    """[255, 0] means stdin EOF only in v5; in v4 it is data for channel 255 and ignored."""
    req = exec_req(["sh", "-c", "head -c 5; echo; echo done"], stdin=True)
    got = ws_exec(server.get_exec(req).url, req, stdin_data=b"12345", protocol="v4.channel.k8s.io")
    assert got[1] == b"12345\ndone\n"
    assert json.loads(got[3])["status"] == "Success"


# ---------------------------------------------------------------------------
# Port-forward


def spdy_forward(client: SpdyClient, port: int, request_id: str, payload: bytes) -> tuple[bytes, bytes]:
    err = client.open(streamType="error", port=str(port), requestID=request_id)
    err.close_write()
    data = client.open(streamType="data", port=str(port), requestID=request_id)
    data.write(payload)
    data.close_write()
    return read_all(data), read_all(err)


def test_spdy_port_forward_round_trip(server: StreamingServer, echo: EchoServer) -> None:
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url
    c = SpdyClient(url, ["portforward.k8s.io"])
    assert c.protocol == "portforward.k8s.io"
    payload = os.urandom(500_000)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: spdy_forward(c, echo.port, str(i), payload), range(3)))
    for back, err in results:
        assert back == payload and err == b""
    c.close()


def test_spdy_port_forward_closed_port_error(server: StreamingServer) -> None:
    port = closed_port()
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="pod1")).url
    c = SpdyClient(url, ["portforward.k8s.io"])
    back, err = spdy_forward(c, port, "0", b"hello")
    assert back == b""
    assert f"error forwarding port {port}".encode() in err and b"refused" in err.lower()
    c.close()


def test_spdy_port_forward_only_requested_ports(server: StreamingServer, echo: EchoServer) -> None:
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[1])).url
    c = SpdyClient(url, ["portforward.k8s.io"])
    back, err = spdy_forward(c, echo.port, "0", b"x")
    assert back == b"" and b"not requested" in err
    c.close()


def test_spdy_port_forward_bad_headers_reset(server: StreamingServer) -> None:
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url
    c = SpdyClient(url, ["portforward.k8s.io"])
    for hdrs in [{"streamType": "data", "port": "0", "requestID": "1"},
                 {"streamType": "data", "port": "http", "requestID": "1"},
                 {"streamType": "other", "port": "80", "requestID": "1"}]:
        with pytest.raises(ConnectionResetError):
            c.open(**hdrs)
    c.close()


def test_spdy_port_forward_client_gone(server: StreamingServer, backend: HostBackend) -> None:
    """The pod keeps talking after the client vanished: the backend call still ends."""
    talker = socket.create_server(("127.0.0.1", 0))

    def talk() -> None:
        conn, _ = talker.accept()
        with contextlib.suppress(OSError):
            while True:
                conn.sendall(bytes(65536))
        conn.close()

    threading.Thread(target=talk, daemon=True).start()
    port = talker.getsockname()[1]
    c = SpdyClient(server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url,
                   ["portforward.k8s.io"])
    c.open(streamType="error", port=str(port), requestID="1")
    data = c.open(streamType="data", port=str(port), requestID="1")
    assert data.read(10, timeout=10)
    c.close()
    _wait(lambda: backend.forward_done == 1)
    _wait(lambda: server.active_connections == 0)
    talker.close()


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"])
def test_ws_port_forward(server: StreamingServer, echo: EchoServer, protocol: str) -> None:
    port = closed_port()
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url
    ws, chosen = ws_connect(f"{url}?port={echo.port}&port={port}", [protocol])
    codec = wsstream.ChannelCodec(chosen)
    payload = os.urandom(100_000)
    ws.send_message(*codec.encode(0, payload))
    got: dict[int, bytes] = {}
    first: dict[int, bytes] = {}
    while len(got.get(0, b"")) < len(payload) + 2 or b"refused" not in got.get(3, b"").lower():
        msg = ws.recv_message()
        assert msg is not None, got
        ch, data = codec.decode(*msg)
        if ch not in first:
            first[ch] = data
        got[ch] = got.get(ch, b"") + data
    assert first[0] == first[1] == struct.pack("<H", echo.port)
    assert first[2] == first[3] == struct.pack("<H", port)
    assert got[0][2:] == payload
    ws.close()
    ws.sock.close()


def test_ws_port_forward_pod_speaks_first(server: StreamingServer) -> None:
    """Data both ways, starting from the pod: a greeting, then a request and its answer."""
    pod = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = pod.accept()
        with conn:
            conn.sendall(b"220 hello from the pod\r\n")
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    return
                line += chunk
            conn.sendall(line.upper() + bytes(200_000) + b"END")

    threading.Thread(target=serve, daemon=True).start()
    port = pod.getsockname()[1]
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[port])).url
    ws, chosen = ws_connect(f"{url}?port={port}", ["v4.channel.k8s.io"])
    ch = wsstream.Channels(ws, chosen)
    data = b""

    def until(text: bytes) -> None:
        nonlocal data
        while text not in data:
            msg = ch.recv()
            assert msg is not None, data[:200]
            if msg[0] == 0:
                data += msg[1]
            else:
                assert msg[0] == 1 and msg[1] == struct.pack("<H", port), msg

    until(b"hello from the pod")
    assert data.startswith(struct.pack("<H", port) + b"220 ")
    ch.send(0, b"quit now\n")
    until(b"END")
    assert data.endswith(b"QUIT NOW\n" + bytes(200_000) + b"END")
    ws.close()
    ws.sock.close()
    pod.close()
    _wait(lambda: server.active_connections == 0)


def test_ws_spdy_tunnel_port_forward(server: StreamingServer, echo: EchoServer) -> None:
    url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url
    ws, chosen = ws_connect(url, ["SPDY/3.1+portforward.k8s.io"])
    assert chosen == "SPDY/3.1+portforward.k8s.io"

    class Tunnel:
        buf = b""

        def recv(self, n: int) -> bytes:
            while not self.buf:
                msg = ws.recv_message()
                if msg is None:
                    return b""
                self.buf = msg[1]
            out, self.buf = self.buf[:n], self.buf[n:]
            return out

        def sendall(self, data: bytes) -> None:
            ws.send_message(data)

        def shutdown(self, how: int) -> None:
            ws.close()

        def close(self) -> None:
            ws.close()

    conn = spdy.SpdyConnection(Tunnel(), server=False)
    threading.Thread(target=conn.run, daemon=True).start()
    err = conn.open_stream({"streamtype": ["error"], "port": [str(echo.port)], "requestid": ["7"]})
    err.close_write()
    data = conn.open_stream({"streamtype": ["data"], "port": [str(echo.port)], "requestid": ["7"]})
    data.write(b"through the tunnel")
    data.close_write()
    assert read_all(data) == b"through the tunnel"
    assert read_all(err) == b""
    conn.close()
    ws.sock.close()


# ---------------------------------------------------------------------------
# Lifecycle


def test_stop_closes_live_sessions(backend: HostBackend) -> None:
    srv = StreamingServer(backend)
    srv.start()
    req = exec_req(["sleep", "1000"])
    c = SpdyClient(srv.get_exec(req).url, ["v4.channel.k8s.io"])
    c.open(streamType="error")
    c.open(streamType="stdout")
    c.open(streamType="stderr")
    _wait(lambda: backend.calls)
    before = threading.active_count()
    srv.stop()
    assert c.conn.closed.wait(10)
    c.close()
    assert srv.active_connections == 0
    assert backend.results == [-9]  # the running command was cancelled
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
    _wait(lambda: threading.active_count() < before, timeout=15)


def test_no_thread_or_fd_leak(server: StreamingServer, echo: EchoServer) -> None:
    def one_round() -> None:
        req = exec_req(["sh", "-c", "echo a; echo b >&2"], stdin=True)
        spdy_exec(server.get_exec(req).url, req, stdin_data=b"x")
        ws_exec(server.get_exec(req).url, req, stdin_data=b"x")
        c = SpdyClient(server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url,
                       ["portforward.k8s.io"])
        spdy_forward(c, echo.port, "1", b"abc")
        c.close()
        url = server.get_port_forward(api_pb2.PortForwardRequest(pod_sandbox_id="p")).url
        ws, _ = ws_connect(f"{url}?port={echo.port}", ["v4.channel.k8s.io"])
        ws.send_message(b"\x00abc")
        got = b""
        while len(got) < 5:
            msg = ws.recv_message()
            assert msg is not None
            if msg[1][:1] == b"\x00":
                got += msg[1][1:]
        ws.close()
        while ws.recv_message() is not None:
            pass
        ws.sock.close()
        req = exec_req(["true"])
        sock, code, _, _, _ = http_upgrade(server.get_exec(req).url, spdy_headers(["v9"]))
        sock.close()
        assert code == 403

    one_round()
    _wait(lambda: server.active_connections == 0)
    time.sleep(0.5)
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        one_round()
    _wait(lambda: server.active_connections == 0)
    _wait(lambda: threading.active_count() <= threads + 1)
    _wait(lambda: len(os.listdir("/proc/self/fd")) <= fds + 2)


# ---------------------------------------------------------------------------
# The real crictl, against a minimal CRI gRPC server handing out our URLs

needs_crictl = pytest.mark.skipif(not HAVE_CRICTL, reason="crictl is not installed (CI has none); "
                                  "the Python clients above cover the same behaviour")


@pytest.fixture
def cri(server: StreamingServer, tmp_path: Any):
    grpc = pytest.importorskip("grpc")
    from pycri.cri._gen import api_pb2_grpc

    class Runtime(api_pb2_grpc.RuntimeServiceServicer):
        def Version(self, request: Any, context: Any) -> Any:
            return api_pb2.VersionResponse(version="0.1.0", runtime_name="pycri-test",
                                           runtime_version="0.1.0", runtime_api_version="v1")

        def Status(self, request: Any, context: Any) -> Any:
            return api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(conditions=[
                api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
                api_pb2.RuntimeCondition(type="NetworkReady", status=True)]))

        def ContainerStatus(self, request: Any, context: Any) -> Any:
            return api_pb2.ContainerStatusResponse(status=api_pb2.ContainerStatus(
                id=request.container_id, state=api_pb2.CONTAINER_RUNNING))

        def Exec(self, request: Any, context: Any) -> Any:
            return server.get_exec(request)

        def Attach(self, request: Any, context: Any) -> Any:
            return server.get_attach(request)

        def PortForward(self, request: Any, context: Any) -> Any:
            return server.get_port_forward(request)

    class Images(api_pb2_grpc.ImageServiceServicer):
        # crictl checks that the image API answers before exec/attach.
        def ImageFsInfo(self, request: Any, context: Any) -> Any:
            return api_pb2.ImageFsInfoResponse()

        def ListImages(self, request: Any, context: Any) -> Any:
            return api_pb2.ListImagesResponse()

    sock = os.path.join(str(tmp_path), "cri.sock")
    g = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(Runtime(), g)
    api_pb2_grpc.add_ImageServiceServicer_to_server(Images(), g)
    g.add_insecure_port(f"unix://{sock}")
    g.start()
    yield sock
    g.stop(0)


def crictl(sock: str, *args: str, input: bytes | None = None, timeout: float = 30
           ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CRICTL, "--runtime-endpoint", f"unix://{sock}", "--timeout", "10s", *args],
                          input=input, capture_output=True, timeout=timeout, check=False)


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec(cri: str, transport: str) -> None:
    r = crictl(cri, "exec", "--transport", transport, "c1", "sh", "-c", "echo hi; echo oops >&2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hi\n" and b"oops\n" in r.stderr


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec_exit_code(cri: str, transport: str) -> None:
    r = crictl(cri, "exec", "--transport", transport, "c1", "sh", "-c", "exit 5")
    # client-go turns the status' ExitCode cause into "command terminated with
    # exit code 5" (crictl itself then exits 1).
    assert r.returncode != 0
    assert b"command terminated with exit code 5" in r.stderr, r.stderr


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec_stdin(cri: str, transport: str) -> None:
    data = os.urandom(1_000_000)
    r = crictl(cri, "exec", "-i", "--transport", transport, "c1", "cat", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec_tty(cri: str, transport: str) -> None:
    # crictl only sends sizes when its own stdin is a terminal: give it a pty.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    script = ('for i in $(seq 100); do s=$(stty size); [ "$s" != "0 0" ] && break; sleep 0.05; done; '
              'echo "size=$s"')
    proc = subprocess.Popen(with_ctty([CRICTL, "--runtime-endpoint", f"unix://{cri}", "exec", "-it",
                                       "--transport", transport, "c1", "sh", "-c", script]),
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    assert b"size=33 111" in out, out


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_exec_tty_interactive_resize(cri: str, transport: str) -> None:
    """An interactive shell through crictl: typed input, a window resize in the
    middle of the session, and the exit code at the end."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(with_ctty([CRICTL, "--runtime-endpoint", f"unix://{cri}", "exec", "-it",
                                       "--transport", transport, "c1", "sh"]),
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""

    def expect(text: bytes) -> None:
        nonlocal out
        deadline = time.monotonic() + 20
        while text not in out:
            assert time.monotonic() < deadline, out
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    chunk = b""
                assert chunk, out
                out += chunk

    try:
        os.write(master, b'echo "sz=$(stty size)"\r')
        expect(b"sz=24 80")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        os.write(master, b'for i in $(seq 100); do [ "$(stty size)" = "50 132" ] && break; '
                         b'sleep 0.05; done; echo "sz=$(stty size)"\r')
        expect(b"sz=50 132")
        os.write(master, b"exit 3\r")
        expect(b"exit code 3")
        assert proc.wait(10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_attach(cri: str, transport: str) -> None:
    r = crictl(cri, "attach", "-i", "--transport", transport, "c1", input=b"via-crictl\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"attached\nvia-crictl\n"


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_port_forward(cri: str, echo: EchoServer, transport: str) -> None:
    local = closed_port()
    proc = subprocess.Popen([CRICTL, "--runtime-endpoint", f"unix://{cri}", "port-forward",
                             "--transport", transport, "pod1", f"{local}:{echo.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", local), timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                time.sleep(0.1)
        payload = os.urandom(300_000)
        s.settimeout(20)
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        back = b""
        while len(back) < len(payload):
            chunk = s.recv(65536)
            assert chunk
            back += chunk
        sender.join()
        assert back == payload
        s.close()
    finally:
        proc.terminate()
        proc.wait(10)


@needs_crictl
@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_crictl_port_forward_closed_port(cri: str, transport: str) -> None:
    local, dead = closed_port(), closed_port()
    proc = subprocess.Popen([CRICTL, "--runtime-endpoint", f"unix://{cri}", "port-forward",
                             "--transport", transport, "pod1", f"{local}:{dead}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", local), timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        s.settimeout(10)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"error forwarding port {dead}".encode() in err, err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
