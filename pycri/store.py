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
      sandboxes/<id>/record.json    sandbox record (runtime issue)
      containers/<id>/record.json   container record (runtime issue)
      locks/                        flock files (images.lock, content.lock, <id>.lock)
    <state> (default /run/pycri; runtime state that should die with the boot)
      sandboxes/<id>/, containers/<id>/   pinned namespaces, pids + start times,
                                    exit status, rootfs mount points, sockets

Rules: every record is written to a temp file in the same directory, fsynced,
renamed over the old one, and the directory fsynced; a reader sees the old or
the new record, never a torn one. Digests are validated (``validate_digest``)
before they become path components. Directories that hold state are 0700.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

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


def atomic_write(path: str, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see old or new, never partial."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
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
