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
from typing import NamedTuple, NoReturn, Self

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

    __slots__ = ("_h", "_err", "_done")

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

    With ``hash_separately=True``, ``feed`` does not hash: pass the same bytes to
    ``hash`` (it may run in another thread while ``feed`` works, so hashing and
    writing overlap); ``finish`` checks that both saw the same byte count.
    """

    __slots__ = ("_dest", "_err", "_l")

    def __init__(self, dest: str, *, lowers: Sequence[str] = (), max_entries: int = 0,
                 max_bytes: int = 0, max_meta_size: int = 0, max_path_len: int = 0,
                 hash_separately: bool = False) -> None:
        self._dest = dest
        self._err = _new_err()
        # closed by close(), or by the collector if a caller forgets
        self._l = ffi.gc(ffi.new("struct pycri_layer *"), lib.pycri_layer_close)
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
            flags = lib.PYCRI_LAYER_HASH_SEPARATELY if hash_separately else 0
            rc = lib.pycri_layer_open(self._l, -100, os.fsencode(dest), lim, arr, len(fds),
                                      flags, self._err)
            if rc < 0:
                lib.pycri_layer_close(self._l)
                _raise(self._err, dest)
        finally:
            for fd in fds:
                os.close(fd)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = ffi.from_buffer(data)
        _check(lib.pycri_layer_feed(self._l, buf, len(buf), self._err), self._err, self._dest)

    def hash(self, data: bytes | bytearray | memoryview) -> None:
        # its own error struct: it may run while feed (using self._err) is busy
        err = _new_err()
        buf = ffi.from_buffer(data)
        _check(lib.pycri_layer_hash(self._l, buf, len(buf), err), err, self._dest)

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- spawn (csrc/spawn.c) ---------------------------------------------------

# --- mounts (csrc/mount.c) --------------------------------------------------

# --- cgroups (csrc/cgroup.c) ------------------------------------------------

# --- monitor (csrc/monitor.c) -----------------------------------------------
