"""Facts about processes read from /proc (alive, start time, caught signals, a
pty), and the start sockets of containers this process created (a start through
them skips the launcher: see csrc/api/launch.h)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time



def _pty_in(pid: int) -> tuple[int, int]:
    """A pty pair from the container's own devpts (so ``tty`` inside names it), or
    from the host's when the container's /dev/ptmx cannot be opened."""
    import fcntl

    try:
        master = os.open(f"/proc/{pid}/root/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return os.openpty()
    try:
        fcntl.ioctl(master, 0x40045431, b"\0\0\0\0")  # TIOCSPTLCK: unlock
        slave = fcntl.ioctl(master, 0x5441, os.O_RDWR | os.O_NOCTTY)  # TIOCGPTPEER
    except OSError:
        os.close(master)
        return os.openpty()
    return master, slave


def _catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status); True when
    unknown, so nothing is resent blindly."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except (OSError, ValueError):
        pass
    return True


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    return int(data[data.rindex(b")") + 2:].split()[19])


def _alive(pid: int, start_time: int) -> bool:
    """Is ``pid`` still the process we started (not a reused pid, not a zombie)?"""
    if pid <= 0:
        return False
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return False
    try:
        data = os.read(fd, 4096)    # (one read: the start time and the state together)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    rest = data[data.rindex(b")") + 2:]
    if start_time and int(rest.split()[19]) != start_time:
        return False
    return rest[:1] != b"Z"


class _HeldFds:
    """Fds this process holds per container it created (container id -> fds): the
    start and report sockets of one not started yet (``_direct``), the read end
    of the pipe its monitor closes once the exit is on disk (``_exits``). At most
    ``cap`` entries (``put`` then says False: the caller closes its fds and
    does without). A forked child drops its copies."""

    def __init__(self, cap: int = 1 << 30) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._fds: dict[str, tuple[int, ...]] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def put(self, cid: str, *fds: int) -> bool:
        with self._lock:
            old = self._fds.pop(cid, None)
            full = len(self._fds) >= self.cap
            if not full:
                self._fds[cid] = fds
        if old:
            _close_all(old)
        return not full

    def take(self, cid: str) -> tuple[int, ...] | None:
        with self._lock:
            return self._fds.pop(cid, None)

    def drop(self, cid: str) -> None:
        fds = self.take(cid)
        if fds:
            _close_all(fds)

    def _after_fork(self) -> None:
        for fds in self._fds.values():
            _close_all(fds)
        self._lock = threading.Lock()
        self._fds = {}


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


_direct = _HeldFds()
# (a cap: a long-running server must not run out of fds for containers it keeps)
_exits = _HeldFds(cap=256)


# The start time of a container, on its record dir (an xattr: no file made and
# deleted per container); a "started" file where the file system has no user xattrs.
STARTED_XATTR = "user.pycri.started"


def _started_at(record_dir: str) -> int | None:
    """When the container in record_dir was started (ns), None if it was not."""
    try:
        return int(os.getxattr(record_dir, STARTED_XATTR))
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    except ValueError:
        pass
    return _read_started(os.path.join(record_dir, "started"))


def mark_started(record_dir: str) -> None:
    """Record the start now (FileExistsError if it was recorded already)."""
    now = str(time.time_ns()).encode()
    try:
        os.setxattr(record_dir, STARTED_XATTR, now, os.XATTR_CREATE)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    fd = os.open(os.path.join(record_dir, "started"),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, now)
    finally:
        os.close(fd)


def _read_started(path: str) -> int | None:
    """The start time in a "started" file, None without one. A file cut short by a
    crash (created, not yet written) still means started: its mtime says when."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 32)
        try:
            return int(data)
        except ValueError:
            return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
