"""The on-disk layout of pycri, and the primitives every record goes through.

Layout version 1::

    <root>  (default /var/lib/pycri; persistent)
      VERSION                       "1"
      blobs/sha256/<hex>            content store: immutable, verified blobs
      ingest/<random>               partial downloads (resumable; safe to delete)
      layers/<chainid-hex>/         one unpacked layer each (an overlay lowerdir),
                                    shared by every image that has it
      layers/.tmp-*/                layers being built; removed on recovery
      images/<config-hex>.json      image record: config digest, manifest digest,
                                    repo tags, repo digests, layer chain ids, size
      images/names.json             {"name:tag" or "name@digest": config-hex}
      sandboxes/<id>/record.json    sandbox record
      containers/<id>/record.json   container record (config, pids, state)
      containers/<id>/exit.json     written once by the container's monitor at exit
      containers/<id>/  xattr user.pycri.started   its start time (ns); a "started"
                                    file instead where the file system has no user xattrs
      containers/<id>/fs/           writable layer (upper, work) and rootfs mount point
      slots/<pid>.<start>.<pod>.<id>/   a container's record dir made ahead by process
                                    <pid> (pycri/slots.py); deleted once that is gone
      slots/<pid>.<start>.spare.<r>/    a removed container's fs/, as made, for a next one
      locks/                        flock files (images.lock, content.lock, sandbox-<id>.lock;
                                    a container flocks its record dir)
      trash/                        removed trees, deleted in the background (Trash)
    <state> (default /run/pycri; runtime state that should die with the boot)
      sandboxes/<id>/, containers/<id>/   pinned namespaces, pod files, image volumes
      sockets/                      monitors' start and attach sockets
      trash/                        as above

Rules: every record is written to a temp file in the same directory and renamed
over the old one; a reader sees the old or the new record, never a torn one.
Image content and image records are fsynced (with their directory) before the
rename; container and sandbox records and exit files are not: they describe
processes that do not outlive a power loss either, and recovery settles them. Digests are validated (``validate_digest``)
before they become path components. Directories that hold state are 0700.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pycri.errors import InvalidArgumentError

LAYOUT_VERSION = "1"

_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")


def validate_digest(digest: object) -> str:
    """Return the hex part of a ``sha256:<64 hex>`` digest, or raise.

    Other well-formed algorithms are refused as unsupported; anything with a
    ``/``, ``..`` or other odd characters is refused as invalid, so a digest is
    always safe to use as a file name.
    """
    if not isinstance(digest, str):
        raise InvalidArgumentError(f"digest must be a string, got {type(digest).__name__}")
    if _SHA256_RE.match(digest):
        return digest[7:]
    if _DIGEST_RE.match(digest) and len(digest) <= 200:
        from pycri.errors import UnsupportedError

        algo = digest.split(":", 1)[0]
        if algo == "sha256":
            raise InvalidArgumentError(f"malformed sha256 digest {digest!r}")
        raise UnsupportedError(f"unsupported digest algorithm {algo!r} in {digest!r}")
    raise InvalidArgumentError(f"malformed digest {digest[:100]!r}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tmp_seq = itertools.count()


def atomic_write(path: str, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never partial."""
    d = os.path.dirname(path) or "."
    # a name no other writer (thread or process) uses at the same time
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{threading.get_ident()}-{next(_tmp_seq)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if mode != 0o600:
                os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(d)


def write_json(path: str, obj: Any, sync: bool = True) -> None:
    atomic_write(path, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode(), sync=sync)


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def makedirs(path: str, mode: int = 0o700) -> str:
    os.makedirs(path, mode=mode, exist_ok=True)
    return path


_T = TypeVar("_T")


class ParsedRecord:
    """One version of a container's or sandbox's record file, parsed: shared by
    every reader of those bytes (ParsedFiles); its config object (of
    ``config_type``) is made when first asked for."""

    __slots__ = ("rec", "_config", "_type")

    def __init__(self, data: bytes, config_type: type) -> None:
        self.rec: dict[str, Any] = json.loads(data)
        self._config: Any = None
        self._type = config_type

    @property
    def config(self) -> Any:
        if self._config is None:
            from pycri.config import from_json

            cfg = from_json(self._type, self.rec["config"])
            assert isinstance(cfg, self._type)
            self._config = cfg
        return self._config


class ParsedFiles:
    """What was made from small record files (their parse, config objects), reused
    while a file holds the very bytes it was made from.

    Callers still read the file on every use; only the work after the read is
    skipped. So a write by anyone, this process or another Runtime on the same root,
    shows at the next read, without trusting timestamps (a rename within one clock
    tick, onto a recycled inode number, can leave a stat key unchanged). What
    ``get`` returns is shared: treat it as read-only. At most ``limit`` files are
    remembered; the oldest goes first.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._made: dict[str, tuple[bytes, Any]] = {}

    def get(self, path: str, data: bytes, make: Callable[[bytes], _T]) -> _T:
        """``make(data)``, or what it gave last time ``path`` held ``data``."""
        hit = self._made.get(path)
        if hit is not None and hit[0] == data:
            return hit[1]  # type: ignore[no-any-return]
        made = make(data)
        with self._lock:
            self._made.pop(path, None)
            while len(self._made) >= self.limit:
                self._made.pop(next(iter(self._made)))
            self._made[path] = (data, made)
        return made

    def forget(self, path: str) -> None:
        with self._lock:  # (every change under the lock: eviction iterates the dict)
            self._made.pop(path, None)


def read_bytes(path: str) -> bytes:
    """A small file's bytes (plain fd reads: half the cost of a Python file object)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def drop_lock_file(path: str) -> None:
    """Unlink the lock file of an object just deleted, while its lock is held. One
    who opened it before and waits gets the lock on the unlinked file and finds the
    object gone (every locked operation reads the record first): no harm done."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep_lock_files(root: str) -> None:
    """Unlink the lock files of containers and sandboxes that no longer exist
    (left by a process killed in a remove, or by an older pycri)."""
    locks = os.path.join(root, "locks")
    for name in os.listdir(locks):
        for kind, d in (("container-", "containers"), ("sandbox-", "sandboxes")):
            if name.startswith(kind) and name.endswith(".lock"):
                oid = name[len(kind):-len(".lock")]
                if not os.path.exists(os.path.join(root, d, oid)):
                    drop_lock_file(os.path.join(locks, name))


@contextlib.contextmanager
def flock(path: str, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing) for the ``with`` body.

    flocks are per open file description, so they also serialise threads of
    one process that each open the file, and die with a killed process.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)



class Trash:
    """Directory trees deleted off the caller's path.

    ``put`` renames a tree into ``<base>/trash/`` (one atomic rename: from then on
    it is gone for every reader) and a background thread deletes it. Deleting a
    container's writable layer and records costs a millisecond or more on a disk
    that discards freed blocks synchronously; nobody needs to wait for that.
    Trees left by a process that died before the thread finished are deleted by
    the next Trash on the same base; at interpreter exit the queue is drained for
    up to ``EXIT_DRAIN_S`` seconds. One thread serves every Trash of the process.
    """

    EXIT_DRAIN_S = 5.0

    def __init__(self, base: str) -> None:
        self.dir = makedirs(os.path.join(base, "trash"), 0o700)
        leftovers = [os.path.join(self.dir, n) for n in os.listdir(self.dir)]
        if leftovers:
            _deleter.enqueue(leftovers)

    def put(self, path: str, salvage: Callable[[str], bool] | None = None) -> None:
        """Take ``path`` (a directory on the base's filesystem) away now; delete it
        soon. A missing path is fine; across filesystems it is deleted right here.

        ``salvage``, if given, is called with the tree's trash path on the deleting
        thread first; when it returns True it has taken the tree (moved it out of
        the trash), else the tree is deleted as usual."""
        dest = os.path.join(self.dir, f"{os.path.basename(path)}.{os.urandom(4).hex()}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.rmtree(path, ignore_errors=True)
            return
        _deleter.enqueue([dest], salvage)

    @staticmethod
    def later(job: Callable[[], object]) -> None:
        """Run ``job`` on the deleting thread, before any tree still queued (it is
        small: an rmdir of an empty cgroup, say). Its errors are dropped."""
        _deleter.enqueue_job(job)

    @staticmethod
    def drain(timeout: float | None = None) -> bool:
        """Wait until everything put so far (by any Trash) is deleted; False on timeout."""
        return _deleter.drain(timeout)


class _Deleter:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[tuple[str, Callable[[str], bool] | None]] = []
        self._jobs: list[Callable[[], object]] = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def enqueue(self, paths: list[str], salvage: Callable[[str], bool] | None = None) -> None:
        self._add(lambda: self._queue.extend((p, salvage) for p in paths))

    def enqueue_job(self, job: Callable[[], object]) -> None:
        self._add(lambda: self._jobs.append(job))

    def _add(self, put: Callable[[], None]) -> None:
        with self._cv:
            put()
            if self._thread is None or not self._thread.is_alive():
                # (a forked child inherits the flag but not the thread)
                self._thread = threading.Thread(target=self._run, name="pycri-trash",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def drain(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._queue or self._jobs or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                while not self._queue and not self._jobs:
                    self._cv.wait()
                job = self._jobs.pop(0) if self._jobs else None
                path, salvage = self._queue.pop(0) if job is None else ("", None)
                self._busy = True
            if job is not None:
                with contextlib.suppress(Exception):
                    job()
                continue
            kept = False
            if salvage is not None:
                with contextlib.suppress(Exception):
                    kept = salvage(path)
            if not kept:
                remove_tree(path)


def remove_tree(path: str) -> None:
    """rm -rf in C (one call that frees the GIL for the whole tree: a Python rmtree
    takes it back between its syscalls, slowing the caller's next steps); what
    that cannot remove, shutil tries."""
    from pycri import _native

    try:
        _native.remove_tree(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


_deleter = _Deleter()


@atexit.register
def _drain_at_exit() -> None:
    _deleter.drain(Trash.EXIT_DRAIN_S)
