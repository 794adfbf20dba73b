"""The C boundary: the only module that imports the compiled ``pycri._core``.

One small, typed Python function or class per C entry point. A C failure
(rc < 0) becomes ``OSError(errno, message, path)``; Python picks the subclass
(FileNotFoundError, PermissionError ...) from errno. Domain meaning is added by
the callers with ``raise ... from``.

Sections below follow the csrc/api/ headers; keep each section to its concern.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

from pycri import _core

ffi = _core.ffi
lib = _core.lib


def _new_err():  # type: ignore[no-untyped-def]
    return ffi.new("struct pycri_error *")


def _raise(err, path: str | None = None) -> NoReturn:  # type: ignore[no-untyped-def]
    msg = ffi.string(err.msg).decode("utf-8", "replace") or "pycri core error"
    if path is None:
        raise OSError(err.code or 0, msg)
    raise OSError(err.code or 0, msg, path)


def _check(rc: int, err, path: str | None = None) -> int:  # type: ignore[no-untyped-def]
    if rc < 0:
        _raise(err, path)
    return rc


# --- digest (csrc/sha256.c) -------------------------------------------------


class Sha256:
    """Incremental SHA-256 in C (OpenSSL's SHA-NI code); the GIL is released per update."""

    __slots__ = ("_done", "_err", "_h")

    def __init__(self) -> None:
        self._h = ffi.new("struct pycri_sha256 *")
        self._err = _new_err()
        self._done: str | None = None
        _check(lib.pycri_sha256_init(self._h, self._err), self._err)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._done is not None:
            raise ValueError("Sha256.update after hexdigest")
        buf = ffi.from_buffer(data)
        _check(lib.pycri_sha256_update(self._h, buf, len(buf), self._err), self._err)

    def hexdigest(self) -> str:
        if self._done is None:
            out = ffi.new("char[65]")
            _check(lib.pycri_sha256_final(self._h, out, self._err), self._err)
            self._done = ffi.string(out).decode("ascii")
        return self._done


def sha256_fd(fd: int) -> tuple[str, int]:
    """Hash all of fd from its current offset; returns (hex digest, byte count)."""
    err = _new_err()
    out = ffi.new("char[65]")
    n = ffi.new("unsigned long long *")
    _check(lib.pycri_sha256_fd(fd, out, n, err), err)
    return ffi.string(out).decode("ascii"), int(n[0])


# --- layer apply (csrc/layer.c) ---------------------------------------------


class LayerStats(NamedTuple):
    """Counters from the C layer writer (see csrc/api/layer.h)."""

    bytes: int
    entries: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    devices: int
    whiteouts: int
    xattrs_dropped: int
    lower_copies: int


class LayerWriter:
    """Streams an uncompressed layer tar into ``dest`` (an existing directory).

    ``open`` happens in the constructor; then ``feed`` chunks, ``finish`` (returns
    the diff_id hex) and ``close`` (idempotent; also done by ``with``). A failed
    ``feed`` or ``finish`` raises ``OSError`` and the writer refuses further
    input. ``lowers`` are the directories of the layers below (top first), used
    only for hardlinks to files this layer does not contain. Zero limits mean
    the C defaults. ``feed`` releases the GIL while C parses and writes.
    """

    __slots__ = ("_l", "_err", "_dest")

    def __init__(self, dest: str, *, lowers: Sequence[str] = (), max_entries: int = 0,
                 max_bytes: int = 0, max_meta_size: int = 0, max_path_len: int = 0) -> None:
        self._dest = dest
        self._err = _new_err()
        self._l = ffi.new("struct pycri_layer *")
        lim = ffi.new("struct pycri_layer_limits *")
        lim.max_entries = max_entries
        lim.max_bytes = max_bytes
        lim.max_meta_size = max_meta_size
        lim.max_path_len = max_path_len
        fds: list[int] = []
        try:
            for d in lowers:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            arr = ffi.new("int[]", fds) if fds else ffi.NULL
            rc = lib.pycri_layer_open(self._l, -100, os.fsencode(dest), lim, arr, len(fds),
                                      self._err)
            if rc < 0:
                lib.pycri_layer_close(self._l)
                _raise(self._err, dest)
        finally:
            for fd in fds:
                os.close(fd)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = ffi.from_buffer(data)
        _check(lib.pycri_layer_feed(self._l, buf, len(buf), self._err), self._err, self._dest)

    def finish(self) -> str:
        out = ffi.new("char[65]")
        _check(lib.pycri_layer_finish(self._l, out, self._err), self._err, self._dest)
        return ffi.string(out).decode("ascii")

    @property
    def stats(self) -> LayerStats:
        s = self._l.stats
        return LayerStats(*(int(getattr(s, f)) for f in LayerStats._fields))

    def close(self) -> None:
        lib.pycri_layer_close(self._l)

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- spawn (csrc/spawn.c) ---------------------------------------------------

# --- mounts (csrc/mount.c) --------------------------------------------------

# --- cgroups (csrc/cgroup.c) ------------------------------------------------

CGROUP_UNKNOWN = 0
CGROUP_V1 = 1
CGROUP_V2 = 2


def cgroup_fstype(path: str) -> int:
    """CGROUP_V2 for a cgroup2 mount, CGROUP_V1 for a v1 one, else CGROUP_UNKNOWN."""
    err = _new_err()
    return _check(lib.pycri_cgroup_fstype(path.encode(), err), err, path)


def cgroup_open(path: str) -> int:
    """An O_DIRECTORY fd on a cgroup dir; the caller closes it."""
    err = _new_err()
    return _check(lib.pycri_cgroup_open(path.encode(), err), err, path)


def cgroup_write(dirfd: int, name: str, value: str) -> None:
    """Write value to name beneath dirfd in one write(2); names cannot escape dirfd."""
    err = _new_err()
    data = value.encode()
    _check(lib.pycri_cgroup_write(dirfd, name.encode(), data, len(data), err), err, name)


def cgroup_write_batch(dirfd: int, pairs: list[tuple[str, str]]) -> None:
    """Write (name, value) pairs in order; on failure the OSError carries
    ``.failed_index`` (how many writes succeeded before it)."""
    err = _new_err()
    keep = [(ffi.new("char[]", n.encode()), ffi.new("char[]", v.encode())) for n, v in pairs]
    names = ffi.new("const char *[]", [k[0] for k in keep] or [ffi.NULL])
    values = ffi.new("const char *[]", [k[1] for k in keep] or [ffi.NULL])
    failed = ffi.new("int *")
    rc = lib.pycri_cgroup_write_batch(dirfd, names, values, len(pairs), failed, err)
    if rc < 0:
        idx = int(failed[0])
        msg = ffi.string(err.msg).decode("utf-8", "replace")
        e = OSError(err.code or 0, msg, pairs[idx][0] if idx < len(pairs) else None)
        e.failed_index = idx  # type: ignore[attr-defined]
        raise e


def cgroup_read(dirfd: int, name: str, cap: int = 1 << 16) -> str:
    """The text of the file name beneath dirfd (EFBIG past cap bytes)."""
    err = _new_err()
    buf = ffi.new("char[]", cap)
    n = _check(lib.pycri_cgroup_read(dirfd, name.encode(), buf, cap, err), err, name)
    return bytes(ffi.buffer(buf, n)).decode("utf-8", "replace")


def cgroup_kill(procs_dirfd: int, freezer_dirfd: int, v2: bool, timeout: float) -> int:
    """SIGKILL everything in the cgroup until cgroup.procs is empty; returns signals sent.
    Raises TimeoutError (ETIMEDOUT) when processes remain after timeout seconds."""
    err = _new_err()
    return _check(lib.pycri_cgroup_kill(procs_dirfd, freezer_dirfd, 1 if v2 else 0,
                                        int(timeout * 1000), err), err)


def cgroup_rmdir(path: str, timeout: float) -> None:
    """rmdir a cgroup dir, retrying EBUSY up to timeout seconds; missing is fine."""
    err = _new_err()
    _check(lib.pycri_cgroup_rmdir(path.encode(), int(timeout * 1000), err), err, path)


# --- monitor (csrc/main_monitor.c -> pycri/pycri-monitor) ---------------------
#
# The monitor is an executable, not a function of _core: it must outlive this
# process. Its command line, log format, exit file and attach protocol are
# documented at the top of csrc/main_monitor.c; the helpers below build the
# command, launch it detached, and read what it leaves behind.

ATTACH_STDIN = 0
ATTACH_STDOUT = 1
ATTACH_STDERR = 2
ATTACH_EXIT = 3
ATTACH_RESIZE = 4
ATTACH_CLOSE_STDIN = 5
ATTACH_MAX_FRAME = 65536


def monitor_path() -> str:
    """Absolute path of the built pycri-monitor (FileNotFoundError if not built)."""
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pycri-monitor")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(2, "pycri-monitor is not built (run setup.py build_ext)", path)
    return path


def monitor_command(exit_file: str, log: str, *, argv: Sequence[str] | None = None,
                    adopt: int | None = None, stdin: bool = False, tty: bool = False,
                    attach_socket: str | None = None, ready_fd: int | None = None,
                    pid_file: str | None = None, log_max_line: int | None = None,
                    detach: bool = False, stdout_fd: int | None = None,
                    stderr_fd: int | None = None, stdin_fd: int | None = None,
                    pty_master_fd: int | None = None, oom_file: str | None = None) -> list[str]:
    """The argv that runs a monitor; exactly one of ``argv`` / ``adopt``."""
    if (argv is None) == (adopt is None):
        raise ValueError("give exactly one of argv and adopt")
    cmd = [monitor_path(), "--exit-file", exit_file, "--log", log]
    if stdin:
        cmd.append("--stdin")
    if tty:
        cmd.append("--tty")
    if detach:
        cmd.append("--detach")
    for flag, val in (("--attach-socket", attach_socket), ("--ready-fd", ready_fd),
                      ("--pid-file", pid_file), ("--log-max-line", log_max_line),
                      ("--stdout-fd", stdout_fd), ("--stderr-fd", stderr_fd),
                      ("--stdin-fd", stdin_fd), ("--pty-master-fd", pty_master_fd),
                      ("--oom-file", oom_file)):
        if val is not None:
            cmd += [flag, str(val)]
    if adopt is not None:
        cmd += ["--adopt", str(adopt)]
    else:
        assert argv is not None
        if not argv:
            raise ValueError("argv is empty")
        cmd += ["--", *argv]
    return cmd


def launch_monitor(exit_file: str, log: str, argv: Sequence[str], *, timeout: float = 30.0,
                   **kw: Any) -> tuple[int, int]:
    """Start a detached monitor that runs argv; returns (monitor pid, container pid)
    once it is ready. The intermediate process is reaped here, so the monitor is
    nobody's child in this process and survives it. Setup failures raise OSError
    with the monitor's message."""
    import subprocess

    cmd = monitor_command(exit_file, log, argv=argv, detach=True, **kw)
    r = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                       close_fds=True)
    if r.returncode != 0:
        raise OSError(0, r.stderr.decode("utf-8", "replace").strip() or "pycri-monitor failed")
    mon, ctr = r.stdout.split()
    return int(mon), int(ctr)


@dataclass(frozen=True)
class ExitStatus:
    """What the monitor recorded when the container process ended."""

    pid: int
    exit_code: int
    signal: int
    exited_at_ns: int
    oom_killed: bool


def read_exit_file(path: str) -> ExitStatus | None:
    """The exit file written by the monitor, or None while the container runs.
    A malformed file raises ValueError (the monitor writes it atomically)."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    try:
        return ExitStatus(int(data["pid"]), int(data["exit_code"]), int(data["signal"]),
                          int(data["exited_at_ns"]), bool(data["oom_killed"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed exit file {path}: {e}") from e


def attach_frame(kind: int, data: bytes = b"") -> bytes:
    """One client->monitor frame (ATTACH_STDIN, ATTACH_RESIZE, ATTACH_CLOSE_STDIN)."""
    if len(data) > ATTACH_MAX_FRAME:
        raise ValueError("attach frame too large")
    return bytes([kind]) + len(data).to_bytes(4, "big") + data


def attach_resize_frame(rows: int, cols: int) -> bytes:
    return attach_frame(ATTACH_RESIZE, rows.to_bytes(2, "big") + cols.to_bytes(2, "big"))


def attach_read_frame(sock: Any) -> tuple[int, bytes] | None:
    """Read one monitor->client frame from a blocking socket; None at EOF."""

    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    hdr = exact(5)
    if hdr is None:
        return None
    n = int.from_bytes(hdr[1:], "big")
    body = exact(n) if n else b""
    if body is None:
        return None
    return hdr[0], body


# --- pinned namespaces (csrc/ns.c) -------------------------------------------

PIN_NET = 1
PIN_IPC = 2
PIN_UTS = 4


def ns_pin(kinds: int, net: str | None, ipc: str | None, uts: str | None,
           hostname: str = "", sysctls: dict[str, str] | None = None) -> None:
    """Create and pin new namespaces onto the given (existing, empty) files."""
    from pycri.config import sysctl_namespace

    err = _new_err()
    items = list((sysctls or {}).items())
    for k, _ in items:  # never let a host-wide sysctl through, whoever calls this
        sysctl_namespace(k)
    blob = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in items)

    def c(s: str | None):  # type: ignore[no-untyped-def]
        return s.encode() if s else ffi.NULL

    _check(lib.pycri_ns_pin(kinds, c(net), c(ipc), c(uts), hostname.encode(),
                            blob or ffi.NULL, len(items), err), err)


def ns_unpin(path: str) -> None:
    err = _new_err()
    _check(lib.pycri_ns_unpin(path.encode(), err), err, path)


def ns_inode(path: str) -> int:
    err = _new_err()
    ino = ffi.new("unsigned long long *")
    _check(lib.pycri_ns_inode(path.encode(), ino, err), err, path)
    return int(ino[0])
