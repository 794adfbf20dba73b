"""The streaming server's StreamBackend over a pycri Runtime.

exec runs Container.exec and pumps its fds; attach speaks the monitor's attach
frames (pycri._native.ATTACH_*); port_forward connects into the pod's network
namespace with ns_connect (or to the host's loopback for a host-network pod).
Like the rest of the CRI layer it keeps no state of its own: every call looks
its container or sandbox up in the Runtime.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any, BinaryIO

from pycri import _native
from pycri.cri.streaming import ResizeQueue
from pycri.errors import InvalidStateError
from pycri.runtime import Runtime

CHUNK = 32 * 1024
DRAIN_TIMEOUT = 10.0  # seconds to wait for output after the process exited


def _thread(target: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _fd_to_stream(fd: int, out: BinaryIO | None) -> None:
    """Copy an fd to a client stream until EOF (a pty master ends with EIO). Keeps
    reading (and dropping) when the client asked for no stream or went away, so the
    process never blocks on a full pipe."""
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            return
        if not data:
            return
        if out is not None:
            try:
                out.write(data)
            except OSError:
                out = None


def _stream_to_fd(src: BinaryIO, fd: int) -> None:
    """Copy the client's stdin to an fd; close the fd at the client's EOF."""
    try:
        while True:
            data = src.read(CHUNK)
            if not data:
                break
            os.write(fd, data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


class RuntimeBackend:
    """StreamBackend (pycri.cri.streaming) for one Runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def exec(self, container_id: str, cmd: list[str], *, tty: bool, stdin: BinaryIO | None,
             stdout: BinaryIO | None, stderr: BinaryIO | None, resize: ResizeQueue,
             cancel: threading.Event) -> int:
        proc = self.rt.container(container_id).exec(cmd, tty=tty, stdin=stdin is not None)
        done = threading.Event()

        def kill_on_cancel() -> None:
            while not done.is_set():
                if cancel.wait(0.1):
                    proc.kill()
                    return

        _thread(kill_on_cancel)
        outputs: list[threading.Thread] = []
        try:
            if tty:
                def apply_sizes() -> None:
                    for width, height in resize:
                        with contextlib.suppress(OSError):
                            proc.resize(height, width)

                _thread(apply_sizes)
                if stdin is not None:
                    _thread(_stream_to_fd, stdin, os.dup(proc.pty))
                outputs.append(_thread(_fd_to_stream, proc.pty, stdout))
            else:
                if stdin is not None:
                    fd, proc.stdin = proc.stdin, -1  # the pump thread owns and closes it
                    _thread(_stream_to_fd, stdin, fd)
                outputs.append(_thread(_fd_to_stream, proc.stdout, stdout))
                outputs.append(_thread(_fd_to_stream, proc.stderr, stderr))
            code = proc.wait()
            for t in outputs:
                t.join(DRAIN_TIMEOUT)
            return code
        finally:
            done.set()
            resize.close()
            proc.close()

    def attach(self, container_id: str, *, tty: bool, stdin: BinaryIO | None,
               stdout: BinaryIO | None, stderr: BinaryIO | None, resize: ResizeQueue,
               cancel: threading.Event) -> None:
        c = self.rt.container(container_id)
        stdin_once = c.config.stdin_once
        sock = c.attach()
        send_lock = threading.Lock()

        def send(frame: bytes) -> None:
            with send_lock:
                sock.sendall(frame)

        def pump_stdin() -> None:
            assert stdin is not None
            try:
                while True:
                    data = stdin.read(CHUNK)
                    if not data:
                        break
                    send(_native.attach_frame(_native.ATTACH_STDIN, data))
                if stdin_once:
                    send(_native.attach_frame(_native.ATTACH_CLOSE_STDIN))
            except OSError:
                pass

        def pump_resize() -> None:
            for width, height in resize:
                with contextlib.suppress(OSError):
                    send(_native.attach_resize_frame(height, width))

        def watch_cancel() -> None:
            cancel.wait()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        if stdin is not None:
            _thread(pump_stdin)
        if tty:
            _thread(pump_resize)
        _thread(watch_cancel)
        try:
            while True:
                try:
                    frame = _native.attach_read_frame(sock)
                except OSError:
                    return
                if frame is None:
                    return
                kind, data = frame
                if kind == _native.ATTACH_EXIT:
                    return
                target = stderr if kind == _native.ATTACH_STDERR and not tty else stdout
                if target is not None:
                    try:
                        target.write(data)
                    except OSError:
                        return  # the client is gone: detach, the container keeps running
        finally:
            resize.close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def port_forward(self, sandbox_id: str, port: int, sock: socket.socket) -> None:
        st = self.rt.sandbox(sandbox_id).status()
        if st.state != "ready":
            raise InvalidStateError(f"sandbox {sandbox_id} is {st.state}, not ready")
        if st.netns_path:
            pod = socket.socket(fileno=_native.ns_connect(st.netns_path, port))
        else:  # host network: the pod's ports are the host's
            pod = socket.create_connection(("127.0.0.1", port), timeout=10)
        pod.settimeout(None)

        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(CHUNK)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        up = _thread(copy, sock, pod)
        try:
            copy(pod, sock)
            up.join()
        finally:
            pod.close()
