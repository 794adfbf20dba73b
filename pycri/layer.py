"""Apply one image layer blob into a directory (an overlay lowerdir).

Policy lives here; mechanism is in C (csrc/layer.c via ``_native.LayerWriter``).
One pass over the compressed bytes does four things at once:

* hashes them (the blob digest, checked against ``expected_digest``),
* decompresses them (gzip with ``isal``, zstd with ``zstandard``, or plain tar),
* hashes the tar bytes (the diff_id, computed by C's ``LayerWriter.hash``) and
  hands them to a feeder thread whose ``LayerWriter.feed`` applies the entries,
* enforces the size, ratio and entry limits of :class:`LayerLimits`.

Decompression runs in the calling thread while C writes files in the feeder
thread; both release the GIL, so the two overlap the way ``tar -xzf`` overlaps
gzip and tar.

What lands in ``dest``: every entry type of ustar/GNU/PAX archives (files,
dirs, symlinks, hardlinks, char/block devices, FIFOs) with owner, mode
(setuid/setgid/sticky kept) and mtime (nanoseconds); OCI whiteouts ``.wh.NAME``
become overlay whiteouts (a 0/0 char device NAME) and ``.wh..wh..opq`` becomes
``trusted.overlay.opaque=y`` on its directory. xattrs: ``user.*``,
``security.capability`` and POSIX ACLs are kept; ``trusted.*`` (it steers
overlayfs on the host: redirect, metacopy, opaque) and other ``security.*``
labels are dropped and counted in ``LayerResult.stats.xattrs_dropped``. Names
with ``..`` components are refused; absolute names and symlinks resolve inside
``dest`` (openat2 RESOLVE_IN_ROOT), never outside it.

Errors: an unknown media type is :class:`UnsupportedError`; a blob that does not
match its media type, a malformed, truncated or hostile archive is
:class:`InvalidLayerError` (the C message is kept: it names the entry and the
syscall); a limit is :class:`ResourceExhaustedError`; a digest or diff_id that
does not match is :class:`DigestMismatchError`, raised once the whole blob has
been read (when a broken archive stops extraction early and ``expected_digest``
is set, the rest of a compressed blob is still hashed, so corruption in transit
is reported as the digest mismatch it is; a plain tar blob's digest is its
diff_id, hashed once, so there a broken archive stays InvalidLayerError). Host failures (disk full, EIO, read-only
file system) stay ``OSError``: they say nothing about the layer. On any error
``dest`` holds a partial tree which the caller deletes.
"""

from __future__ import annotations

import errno
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pycri import _native
from pycri.errors import (
    DigestMismatchError,
    InvalidLayerError,
    ResourceExhaustedError,
    UnsupportedError,
)
from pycri.store import validate_digest

__all__ = ["MEDIA_TYPES", "LayerLimits", "LayerResult", "apply_layer", "apply_layer_file"]

_TAR, _GZIP, _ZSTD = "tar", "gzip", "zstd"

#: Layer media types this module applies, and their compression.
MEDIA_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": _TAR,
    "application/vnd.oci.image.layer.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _GZIP,
}

_MAGIC = {
    _GZIP: b"\x1f\x8b",
    _ZSTD: b"\x28\xb5\x2f\xfd",
    "xz": b"\xfd7zXZ\x00",
    "bzip2": b"BZh",
}

_CHUNK = 1 << 20  # decompressed piece handed to C at a time
_QUEUE_DEPTH = 8  # pieces in flight between decompression and C
_HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM}


@dataclass(frozen=True)
class LayerLimits:
    """Caps that turn hostile blobs into :class:`ResourceExhaustedError`.

    ``max_ratio`` (uncompressed / compressed bytes so far) is only checked once
    more than ``ratio_floor`` bytes came out, so small highly compressible
    layers pass. ``zstd_max_window`` bounds zstd decoder memory.
    """

    max_entries: int = 1_000_000
    max_size: int = 64 << 30
    max_ratio: int = 250
    ratio_floor: int = 256 << 20
    max_meta_size: int = 1 << 20
    max_path_len: int = 4096
    zstd_max_window: int = 1 << 27

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_size", "max_ratio", "max_meta_size", "max_path_len",
                     "zstd_max_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LayerLimits.{name} must be a positive int")
        if self.max_path_len > 4096:
            raise ValueError("LayerLimits.max_path_len is at most 4096 (PATH_MAX)")


@dataclass(frozen=True)
class LayerResult:
    """What :func:`apply_layer` applied: digests as ``sha256:<hex>``, sizes in bytes."""

    digest: str
    diff_id: str
    compressed_size: int
    size: int
    entries: int
    stats: _native.LayerStats = field(repr=False)


def _compression(media_type: str) -> str:
    try:
        return MEDIA_TYPES[media_type]
    except KeyError:
        raise UnsupportedError(f"layer media type {media_type!r} is not supported") from None


def _sniff(head: bytes) -> str:
    for name, magic in _MAGIC.items():
        if head.startswith(magic):
            return name
    return _TAR


class _Source:
    """The compressed chunks: counted, hashed and reported as they are pulled."""

    def __init__(self, chunks: Iterable[bytes], progress: Callable[[int], None] | None,
                 hashed: bool = True) -> None:
        self._it = iter(chunks)
        self._progress = progress
        # a plain tar blob is its own tar stream: C's diff_id is then the digest
        self.hasher = _native.Sha256() if hashed else None
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while True:
            chunk = next(self._it)
            if chunk:
                break
        if self.hasher is not None:
            self.hasher.update(chunk)
        self.size += len(chunk)
        if self._progress is not None:
            self._progress(self.size)
        return bytes(chunk) if not isinstance(chunk, bytes) else chunk

    def drain(self) -> None:
        for _ in self:
            pass


def _head(source: _Source, n: int) -> tuple[bytes, Iterator[bytes]]:
    """The first n bytes (fewer if the blob is shorter) and an iterator over all of it."""
    got: list[bytes] = []
    size = 0
    for chunk in source:
        got.append(chunk)
        size += len(chunk)
        if size >= n:
            break
    return b"".join(got)[:n], itertools.chain(got, source)


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """All members of a gzip stream (bounded output per step); NUL padding after
    the last member is tolerated, anything else is an error."""
    from isal import isal_zlib

    d = isal_zlib.decompressobj(wbits=16 + 15)
    started = False  # has the current member consumed any input?
    padding = False
    for chunk in chunks:
        data = chunk
        while data:
            if padding:
                if data.strip(b"\0"):
                    raise InvalidLayerError("layer: gzip stream has trailing garbage after its "
                                            "last member")
                break
            if not started and not data.startswith(b"\x1f\x8b"[: len(data)]):
                if data[0] == 0:
                    padding = True
                    continue
                raise InvalidLayerError("layer: gzip stream has trailing garbage after a member")
            started = True
            try:
                out = d.decompress(data, _CHUNK)
            except isal_zlib.error as e:  # type: ignore[misc]
                raise InvalidLayerError(f"layer: corrupt gzip data: {e}") from e
            if out:
                yield out
            if d.eof:
                data = d.unused_data
                d = isal_zlib.decompressobj(wbits=16 + 15)
                started = False
            else:
                data = d.unconsumed_tail
    if started:
        raise InvalidLayerError("layer: truncated gzip stream (the last member has no end)")


class _IterReader:
    """A minimal file object over an iterator of chunks, for zstandard's stream_reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return b""
            self._buf = memoryview(nxt)
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, memoryview(b"")
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out.tobytes()


class _ZstdFrames:
    """Walks zstd frame and block headers (RFC 8878) as the compressed bytes pass.

    zstandard's stream_reader bounds each read (so a bomb cannot balloon one
    call) but ends quietly when the input stops inside a frame; this walk tells
    a complete stream from a cut one, at a cost of a few operations per block.
    """

    _FRAME, _SKIPPABLE = 0xFD2FB528, 0x184D2A50

    def __init__(self) -> None:
        self._state = "magic"
        self._need = 4
        self._buf = bytearray()
        self._skip = 0
        self._checksum = False

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += data[i : i + k]
            i += k
            if len(self._buf) == self._need:
                field = int.from_bytes(self._buf, "little")
                self._buf.clear()
                self._step(field)

    def _expect(self, state: str, need: int) -> None:
        self._state, self._need = state, need

    def _step(self, field: int) -> None:
        st = self._state
        if st == "magic":
            if field == self._FRAME:
                self._expect("descriptor", 1)
            elif field & 0xFFFFFFF0 == self._SKIPPABLE:
                self._expect("skip-size", 4)
            else:
                raise InvalidLayerError("layer: zstd stream has bytes that are not a zstd frame "
                                        "(trailing garbage?)")
        elif st == "skip-size":
            self._skip = field
            self._expect("magic", 4)
        elif st == "descriptor":
            if field & 0x08:
                raise InvalidLayerError("layer: corrupt zstd frame header (reserved bit set)")
            single = (field >> 5) & 1
            self._checksum = bool((field >> 2) & 1)
            rest = (0 if single else 1) + (0, 1, 2, 4)[field & 3] + (single, 2, 4, 8)[field >> 6]
            if rest:
                self._expect("header-rest", rest)
            else:
                self._expect("block", 3)
        elif st == "header-rest":
            self._expect("block", 3)
        elif st == "block":
            kind = (field >> 1) & 3
            if kind == 3:
                raise InvalidLayerError("layer: corrupt zstd block (reserved block type)")
            self._skip = 1 if kind == 1 else field >> 3  # an RLE block carries one byte
            if field & 1:  # the last block of its frame
                if self._checksum:
                    self._expect("checksum", 4)
                else:
                    self._expect("magic", 4)
        else:  # checksum
            self._expect("magic", 4)

    @property
    def complete(self) -> bool:
        return self._state == "magic" and not self._buf and not self._skip


def _unzstd(chunks: Iterator[bytes], max_window: int) -> Iterator[bytes]:
    import zstandard

    frames = _ZstdFrames()

    def walked() -> Iterator[bytes]:
        for chunk in chunks:
            frames.feed(chunk)
            yield chunk

    source = walked()
    dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
    reader = dctx.stream_reader(_IterReader(source),  # type: ignore[arg-type]
                                read_size=_CHUNK, read_across_frames=True)
    try:
        while True:
            out = reader.read(_CHUNK)
            if not out:
                break
            yield out
    except zstandard.ZstdError as e:
        text = str(e)
        if "window" in text.lower() or "memory" in text.lower():
            raise ResourceExhaustedError(f"layer: zstd frame needs a window over {max_window} "
                                         f"bytes: {text}") from e
        raise InvalidLayerError(f"layer: corrupt zstd data: {text}") from e
    for _ in source:  # input the reader left unread must still be well-formed
        pass
    if not frames.complete:
        raise InvalidLayerError("layer: truncated zstd stream (it ends inside a frame)")


def _pieces(chunks: Iterator[bytes]) -> Iterator[bytes | memoryview]:
    for chunk in chunks:
        if len(chunk) <= _CHUNK:
            yield chunk
        else:
            mv = memoryview(chunk)
            for i in range(0, len(mv), _CHUNK):
                yield mv[i : i + _CHUNK]


class _Feeder:
    """A thread that feeds the C writer from a bounded queue. After a failure it
    keeps draining the queue (so the producer never blocks) and remembers the error."""

    def __init__(self, writer: _native.LayerWriter) -> None:
        self._writer = writer
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="pycri-layer-feed", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            piece = self._q.get()
            if piece is None:
                return
            if self.error is None:
                try:
                    self._writer.feed(piece)
                except BaseException as e:  # noqa: BLE001 - re-raised in the producer
                    self.error = e

    def put(self, piece: bytes | memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(piece)

    def join(self) -> None:
        self._q.put(None)
        self._t.join()


def _layer_error(e: OSError) -> Exception:
    msg = e.strerror or str(e)
    if e.errno == errno.EFBIG:
        return ResourceExhaustedError(msg)
    return InvalidLayerError(msg)


def apply_layer(
    chunks: Iterable[bytes],
    media_type: str,
    dest: str,
    *,
    expected_digest: str | None = None,
    expected_diff_id: str | None = None,
    lowers: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
    limits: LayerLimits = LayerLimits(),
) -> LayerResult:
    """Apply a layer blob, given as its compressed bytes in chunks, into ``dest``.

    ``dest`` must be an existing empty directory; the caller renames it into place
    on success and deletes it on failure. ``lowers`` are the unpacked layers below
    this one (top first), consulted only for hardlinks to files this layer lacks.
    ``progress`` is called with the number of compressed bytes consumed so far.
    Digests are ``sha256:<hex>``. See the module docstring for the errors.
    """
    kind = _compression(media_type)
    want_digest = validate_digest(expected_digest) if expected_digest is not None else None
    want_diff = validate_digest(expected_diff_id) if expected_diff_id is not None else None
    source = _Source(chunks, progress, hashed=kind != _TAR)
    try:
        size, entries, diff_hex, stats = _extract(source, kind, media_type, dest, lowers, limits)
    except InvalidLayerError as e:
        if want_digest is not None and source.hasher is not None:
            source.drain()
            got = source.hasher.hexdigest()
            if got != want_digest:
                raise DigestMismatchError(
                    f"layer blob digest mismatch: expected sha256:{want_digest}, got "
                    f"sha256:{got} (the blob is corrupt; the archive error was: {e})",
                    "sha256:" + want_digest, "sha256:" + got) from e
        raise
    # the tar ended: still hash whatever the blob carries after it
    source.drain()
    digest_hex = source.hasher.hexdigest() if source.hasher is not None else diff_hex
    if want_digest is not None and digest_hex != want_digest:
        raise DigestMismatchError(
            f"layer blob digest mismatch: expected sha256:{want_digest}, got sha256:{digest_hex}",
            "sha256:" + want_digest, "sha256:" + digest_hex)
    if want_diff is not None and diff_hex != want_diff:
        raise DigestMismatchError(
            f"layer diff_id mismatch: expected sha256:{want_diff}, got sha256:{diff_hex}",
            "sha256:" + want_diff, "sha256:" + diff_hex)
    return LayerResult("sha256:" + digest_hex, "sha256:" + diff_hex, source.size, size,
                       entries, stats)


def _extract(source: _Source, kind: str, media_type: str, dest: str, lowers: Sequence[str],
             limits: LayerLimits) -> tuple[int, int, str, _native.LayerStats]:
    head, stream = _head(source, 8)
    found = _sniff(head)
    if found != kind:
        what = "plain tar (or not compressed at all)" if found == _TAR else found
        raise InvalidLayerError(f"layer: media type {media_type} says {kind}, but the blob "
                                f"looks like {what}")
    if kind == _GZIP:
        tar: Iterator[bytes | memoryview] = _gunzip(stream)
    elif kind == _ZSTD:
        tar = _unzstd(stream, limits.zstd_max_window)
    else:
        tar = _pieces(stream)
    try:
        writer = _native.LayerWriter(dest, lowers=lowers, max_entries=limits.max_entries,
                                     max_bytes=limits.max_size,
                                     max_meta_size=limits.max_meta_size,
                                     max_path_len=limits.max_path_len,
                                     hash_separately=True)
    except OSError as e:
        if e.errno in _HOST_ERRNOS or e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
            raise
        raise _layer_error(e) from e
    try:
        feeder = _Feeder(writer)
        size = 0
        try:
            for piece in tar:
                size += len(piece)
                if size > limits.max_size:
                    raise ResourceExhaustedError(
                        f"layer: uncompressed size exceeds the limit of {limits.max_size} bytes")
                if size > limits.ratio_floor and size > limits.max_ratio * max(source.size, 1):
                    raise ResourceExhaustedError(
                        f"layer: decompresses more than {limits.max_ratio}x ({size} bytes out of "
                        f"{source.size}): refusing a likely decompression bomb")
                writer.hash(piece)  # here, so it overlaps with C writing files
                feeder.put(piece)
        finally:
            feeder.join()
        if feeder.error is not None:
            raise feeder.error
        diff_hex = writer.finish()
        stats = writer.stats
    except OSError as e:
        if e.errno in _HOST_ERRNOS:
            raise
        raise _layer_error(e) from e
    finally:
        writer.close()
    return size, stats.entries, diff_hex, stats


def apply_layer_file(path: str, media_type: str, dest: str, *, chunk_size: int = 1 << 20,
                     expected_digest: str | None = None, expected_diff_id: str | None = None,
                     lowers: Sequence[str] = (), progress: Callable[[int], None] | None = None,
                     limits: LayerLimits = LayerLimits()) -> LayerResult:
    """:func:`apply_layer` for a blob on disk (read in ``chunk_size`` pieces)."""

    def read() -> Iterator[bytes]:
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(chunk_size)
                if not b:
                    return
                yield b

    return apply_layer(read(), media_type, dest, expected_digest=expected_digest,
                       expected_diff_id=expected_diff_id, lowers=lowers, progress=progress,
                       limits=limits)
