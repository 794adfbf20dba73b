"""The C boundary: the only module that imports the compiled ``pycri._core``.

One small, typed Python function or class per C entry point. A C failure
(rc < 0) becomes ``OSError(errno, message, path)``; Python picks the subclass
(FileNotFoundError, PermissionError ...) from errno. Domain meaning is added by
the callers with ``raise ... from``.

Sections below follow the csrc/api/ headers; keep each section to its concern.
"""

from __future__ import annotations

from typing import NoReturn

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

# --- spawn (csrc/spawn.c) ---------------------------------------------------

# --- mounts (csrc/mount.c) --------------------------------------------------

# --- cgroups (csrc/cgroup.c) ------------------------------------------------

# --- monitor (csrc/monitor.c) -----------------------------------------------

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
