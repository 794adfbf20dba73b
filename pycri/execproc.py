"""Processes that Container.exec starts beside a container's init: their stdio fds,
waiting for them, and collecting their output for exec_sync."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass

EXEC_OUTPUT_LIMIT = 16 << 20


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class ExecProcess:
    """A process started by Container.exec; -1 marks an fd it does not have."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int, pty: int) -> None:
        self.pid = pid
        self.stdin, self.stdout, self.stderr, self.pty = stdin, stdout, stderr, pty
        self.returncode: int | None = None

    def resize(self, rows: int, cols: int) -> None:
        if self.pty >= 0:
            import fcntl
            import struct
            import termios

            fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_stdin(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1

    def close(self) -> None:
        for name in ("stdin", "stdout", "stderr", "pty"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self) -> int:
        """Reap the process; its exit code (128 + signal when killed)."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            self.returncode = code if code >= 0 else 128 - code
        return self.returncode


def _readable(fds: list[int], timeout: float | None) -> list[int]:
    """Those of fds readable within timeout seconds: select (microseconds) while
    the fds fit its 1024-bit set, else poll (milliseconds)."""
    if max(fds) < 1024:
        return select.select(fds, [], [], timeout)[0]
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ev in p.poll(ms)]


def _collect(pid: int, out_r: int, err_r: int, timeout: float | None,
             limit: int) -> tuple[bytes, bytes, bool]:
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    while open_fds:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = None
            continue
        for fd in _readable(open_fds, left):
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = limit - len(bufs[fd])
            if room > 0:
                bufs[fd] += chunk[:room]
    return bytes(bufs[out_r]), bytes(bufs[err_r]), timed_out
