"""Images: the content store, pulls, layer unpacking, import/export and GC.

The store lives under ``<root>`` (layout in pycri.store). Content is published
only after it is verified: blobs are hashed while they stream and renamed into
``blobs/sha256/`` when the digest matches; layers are built in a temp dir and
renamed to ``layers/<chainid>/`` when both the blob digest and the diff_id
match. An image record is written after everything it names exists, and its
names (tags and repo digests) after the record, under one lock; so a crash at
any point leaves either no image or a complete one.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import functools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pycri import oci, reference, slots, store
from pycri.config import Auth, Platform
from pycri.errors import (
    DigestMismatchError,
    InvalidArgumentError,
    InvalidImageError,
    NotFoundError,
    ResourceExhaustedError,
)
from pycri.oci import Descriptor, ImageConfig

_READ = 1 << 20


@dataclass(frozen=True)
class PullProgress:
    """One progress report of a pull: bytes of one blob done so far."""

    ref: str
    digest: str
    completed: int
    total: int
    status: str  # "resolving", "downloading", "exists", "done"


ProgressCallback = Callable[[PullProgress], None]


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    size: int
    media_type: str
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class Image:
    """A snapshot of one image as recorded on disk."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    config: ImageConfig
    manifest_digest: str
    manifest_media_type: str
    layers: tuple[LayerInfo, ...]
    pulled_at: float
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def chain_ids(self) -> tuple[str, ...]:
        return tuple(x.chain_id for x in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "RepoTags": list(self.repo_tags),
            "RepoDigests": list(self.repo_digests),
            "Size": self.size,
            "ManifestDigest": self.manifest_digest,
            "ManifestMediaType": self.manifest_media_type,
            "Layers": [
                {"digest": x.digest, "size": x.size, "mediaType": x.media_type,
                 "diffId": x.diff_id, "chainId": x.chain_id}
                for x in self.layers
            ],
            "PulledAt": self.pulled_at,
            "Config": self.config.to_json(),
        }


@dataclass(frozen=True)
class FsInfo:
    path: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


@dataclass(frozen=True)
class _Names:
    """names.json as read once: the map, and each image's (tags, repo digests)."""

    key: tuple[int, ...]
    names: dict[str, str]
    by_id: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]


_NO_NAMES = _Names((), {}, {})


def _file_key(file: int | str) -> tuple[int, ...]:
    """Identifies one version of a file that is only ever replaced by rename: a
    rewrite is a new inode (and a new ctime), so an unchanged key means unchanged bytes.
    A cache hit needs only a stat of the path; what is cached was read through an fd
    whose key was taken from that same fd."""
    st = os.stat(file)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Layers being fetched by this process, keyed by (root, chain id): concurrent
# pulls that need the same layer wait for one download instead of starting two.
_inflight_lock = threading.Lock()
_inflight: dict[tuple[str, str], Future[None]] = {}


class ImageStore:
    """Pull, list, inspect, tag, remove, import and export images under one root."""

    def __init__(
        self,
        root: str,
        registry_config_dir: str | None = None,
        docker_config: str | None = None,
        platform: Platform | None = None,
        insecure_registries: tuple[str, ...] = (),
        max_parallel_layers: int = 3,
    ) -> None:
        self.root = os.path.abspath(root)
        self.platform = platform or Platform.host()
        self.max_parallel_layers = max(1, max_parallel_layers)
        self._registry_args = (registry_config_dir, docker_config, insecure_registries)
        self._registry: Any = None
        # chain ids that must survive GC even without an image (set by the Runtime:
        # the layers of existing containers' root filesystems)
        self.layer_roots: Callable[[], set[str]] = set
        self._gc_lock = threading.Lock()
        self._gc_pending = False
        self._registry_lock = threading.Lock()
        # Parsed names.json and image records, reused while their file is the same
        # version (_file_key): queries stat instead of re-reading and re-parsing.
        self._names_cache: _Names = _NO_NAMES
        self._image_cache: dict[str, tuple[tuple[int, ...], tuple[int, ...], Image, str]] = {}
        for d in ("blobs/sha256", "ingest", "images", "locks"):
            store.makedirs(os.path.join(self.root, d))
        # layer dirs are overlay lower dirs: a container's mapped root must reach them
        store.makedirs(os.path.join(self.root, "layers"), 0o711)
        os.chmod(os.path.join(self.root, "layers"), 0o711)
        self.recover()

    # -- paths ---------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", store.validate_digest(digest))

    def layer_path(self, chain_id: str) -> str:
        return os.path.join(self.root, "layers", store.validate_digest(chain_id))

    def _lock(self, name: str) -> str:
        return os.path.join(self.root, "locks", name)

    def _record_path(self, image_id: str) -> str:
        return os.path.join(self.root, "images", store.validate_digest(image_id) + ".json")

    @property
    def _names_path(self) -> str:
        return os.path.join(self.root, "images", "names.json")

    @property
    def registry(self) -> Any:
        with self._registry_lock:
            if self._registry is None:
                from pycri.registry import Registry

                cfg_dir, docker_cfg, insecure = self._registry_args
                self._registry = Registry(config_dir=cfg_dir, docker_config=docker_cfg,
                                          insecure=insecure)
            return self._registry

    # -- records ---------------------------------------------------------------

    def _read_names(self) -> dict[str, str]:
        try:
            names = store.read_json(self._names_path)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in names.items()}

    def _names(self) -> _Names:
        """names.json for queries: shared and read-only (writers use _read_names)."""
        cached = self._names_cache
        try:
            if cached.key and _file_key(self._names_path) == cached.key:
                return cached
            f = open(self._names_path, "rb")
        except FileNotFoundError:
            return _NO_NAMES
        with f:
            key = _file_key(f.fileno())
            data = f.read()
        names = {str(k): str(v) for k, v in json.loads(data).items()}
        mine: dict[str, builtins.list[str]] = {}
        for n in sorted(names):
            mine.setdefault(names[n], []).append(n)
        state = _Names(key, names, {
            i: (tuple(n for n in ns if "@" not in n), tuple(n for n in ns if "@" in n))
            for i, ns in mine.items()})
        self._names_cache = state
        return state

    def _image_of(self, image_id: str, names: _Names) -> Image:
        """_image through the cache: the record file's version and the names' version
        decide whether the Image made last time still holds."""
        hit = self._image_cache.get(image_id)
        path = hit[3] if hit is not None else self._record_path(image_id)  # (validated once)
        try:
            if hit is not None and hit[1] == names.key and hit[0] == _file_key(path):
                return hit[2]
            f = open(path, "rb")
        except FileNotFoundError:
            self._image_cache.pop(image_id, None)
            raise NotFoundError(f"image {image_id} not found") from None
        with f:
            key = _file_key(f.fileno())
            rec = json.loads(f.read())
        tags, digests = names.by_id.get(image_id, ((), ()))
        img = self._image_from(image_id, rec, tags, digests)
        self._image_cache[image_id] = (key, names.key, img, path)
        return img

    def _read_record(self, image_id: str) -> dict[str, Any]:
        try:
            return store.read_json(self._record_path(image_id))  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise NotFoundError(f"image {image_id} not found") from None

    def _image_from(self, image_id: str, rec: dict[str, Any], tags: tuple[str, ...],
                    digests: tuple[str, ...]) -> Image:
        config = _config(self.blob_path(image_id))
        return Image(
            id=image_id,
            repo_tags=tags,
            repo_digests=digests,
            size=int(rec["size"]),
            config=config,
            manifest_digest=rec["manifest_digest"],
            manifest_media_type=rec["manifest_media_type"],
            layers=tuple(LayerInfo(**x) for x in rec["layers"]),
            pulled_at=float(rec["pulled_at"]),
            annotations=dict(rec.get("annotations") or {}),
        )

    def _resolve_id(self, ref: str, names: dict[str, str]) -> str:
        """Map a reference, full id, bare hex id or unique id prefix to an image id."""
        if not isinstance(ref, str) or not ref:
            raise InvalidArgumentError("image reference must be a non-empty string")
        s = ref.removeprefix("sha256:")
        if len(s) == 64 and all(c in "0123456789abcdef" for c in s):
            if os.path.exists(self._record_path("sha256:" + s)):
                return "sha256:" + s
        try:
            parsed = reference.parse(ref)
        except InvalidArgumentError:
            parsed = None
        if parsed is not None:
            key = f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed)
            if key in names:
                return names[key]
        if 6 <= len(s) < 64 and all(c in "0123456789abcdef" for c in s):
            hits = {i for i in names.values() if i[7:].startswith(s)}
            if len(hits) == 1:
                return hits.pop()
            if len(hits) > 1:
                raise InvalidArgumentError(f"image id prefix {s!r} is ambiguous")
        raise NotFoundError(f"image {ref!r} not found")

    # -- queries ---------------------------------------------------------------

    def get(self, ref: str) -> Image:
        """The image named by tag, digest reference, id or unique id prefix.

        Images are snapshots shared between callers: treat them as read-only."""
        names = self._names()
        return self._image_of(self._resolve_id(ref, names.names), names)

    def status(self, ref: str) -> Image | None:
        """Like get(), but None when the image does not exist."""
        try:
            return self.get(ref)
        except NotFoundError:
            return None

    def list(self) -> builtins.list[Image]:
        names = self._names()
        out = []
        for image_id in sorted(names.by_id):
            with contextlib.suppress(NotFoundError, FileNotFoundError):
                out.append(self._image_of(image_id, names))
        return out

    def layer_dirs(self, image: Image) -> builtins.list[str]:
        """Overlay lowerdirs of an image, top layer first."""
        return [self.layer_path(c) for c in reversed(image.chain_ids)]

    def fs_info(self) -> FsInfo:
        """Bytes and inodes used by blobs and unpacked layers."""
        used = inodes = 0
        for top in ("blobs", "layers"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, top)):
                for n in dirnames + filenames:
                    with contextlib.suppress(FileNotFoundError):
                        st = os.lstat(os.path.join(dirpath, n))
                        used += st.st_blocks * 512
                        inodes += 1
        return FsInfo(self.root, used, inodes, time.time_ns())

    # -- names -----------------------------------------------------------------

    def _set_names(self, image_id: str, add: builtins.list[str]) -> None:
        with store.flock(self._lock("images.lock")):
            names = self._read_names()
            for n in add:
                names[n] = image_id
            store.write_json(self._names_path, names)

    def tag(self, source: str, target: str) -> Image:
        """Give the image named by ``source`` the extra name ``target`` (moved if taken)."""
        ref = reference.parse(target)
        if ref.digest:
            raise InvalidArgumentError("a tag cannot contain a digest")
        image = self.get(source)
        self._set_names(image.id, [str(ref)])
        return self.get(image.id)

    def remove(self, ref: str, collect: bool = True) -> None:
        """Remove one name, or by id every name; the image goes with its last name.

        Blobs and layers no remaining image uses are then garbage collected: right
        away, or with ``collect=False`` soon after in the background (gc_soon), as a
        busy server wants: the caller does not wait for large trees to be deleted.
        """
        with store.flock(self._lock("images.lock")):
            names = self._read_names()
            image_id = self._resolve_id(ref, names)
            s = ref.removeprefix("sha256:")
            by_id = image_id[7:].startswith(s) and all(c in "0123456789abcdef" for c in s)
            if by_id:
                names = {n: i for n, i in names.items() if i != image_id}
            else:
                parsed = reference.parse(ref)
                key = f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed)
                names.pop(key, None)
                if not any(i == image_id and "@" not in n for n, i in names.items()):
                    # the last tag is gone: its repo digests go with it
                    names = {n: i for n, i in names.items() if i != image_id}
            store.write_json(self._names_path, names)
            if image_id not in names.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._record_path(image_id))
        if collect:
            self.gc()
        else:
            self.gc_soon()

    # -- garbage collection and recovery ---------------------------------------

    @contextlib.contextmanager
    def _content_busy(self) -> Iterator[None]:
        """Held (shared) while a pull or import may create unreferenced content."""
        with store.flock(self._lock("content.lock"), shared=True):
            yield

    def _try_exclusive(self) -> int | None:
        fd = os.open(self._lock("content.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def gc(self) -> int:
        """Delete blobs, layers and records no named image uses. Returns items removed.

        Skipped (returns 0) while a pull or import is running anywhere on this root;
        the next remove or Runtime start collects what was left.
        """
        fd = self._try_exclusive()
        if fd is None:
            return 0
        try:
            with store.flock(self._lock("images.lock")):
                names = self._read_names()
                live_ids = set(names.values())
                keep_blobs: set[str] = set()
                keep_layers: set[str] = set()
                for rec_name in os.listdir(os.path.join(self.root, "images")):
                    if not rec_name.endswith(".json") or rec_name == "names.json":
                        continue
                    image_id = "sha256:" + rec_name[:-5]
                    if image_id not in live_ids:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(os.path.join(self.root, "images", rec_name))
                        continue
                    try:
                        rec = self._read_record(image_id)
                    except (NotFoundError, ValueError):
                        continue
                    keep_blobs.update(x[7:] for x in rec.get("blobs", []))
                    keep_blobs.add(image_id[7:])
                    for x in rec["layers"]:
                        keep_blobs.add(x["digest"][7:])
                        keep_layers.add(x["chain_id"][7:])
                keep_layers.update(c[7:] for c in self.layer_roots())
                removed = 0
                bdir = os.path.join(self.root, "blobs", "sha256")
                for b in os.listdir(bdir):
                    if b not in keep_blobs:
                        os.unlink(os.path.join(bdir, b))
                        removed += 1
                ldir = os.path.join(self.root, "layers")
                gone = 0
                for name in os.listdir(ldir):
                    if name not in keep_layers:
                        shutil.rmtree(os.path.join(ldir, name), ignore_errors=True)
                        gone += 1
                if gone:    # (an overlay this process keeps for reuse may hold them)
                    slots.drop_stale_overlays(self.root)
                return removed + gone
        finally:
            os.close(fd)

    def gc_soon(self, delay: float = 2.0) -> None:
        """Collect garbage in a background thread after ``delay`` seconds; calls made
        while one is pending share it."""
        with self._gc_lock:
            if self._gc_pending:
                return
            self._gc_pending = True

        def run() -> None:
            time.sleep(delay)
            with self._gc_lock:
                self._gc_pending = False
            with contextlib.suppress(Exception):  # best effort; the next remove retries
                self.gc()

        threading.Thread(target=run, name="pycri-gc", daemon=True).start()

    def recover(self) -> None:
        """Clean up after a crash: half-built layers and stray temp files.

        Partial downloads in ingest/ are kept: the next pull of that blob resumes them.
        """
        fd = self._try_exclusive()
        if fd is None:
            return
        try:
            for sub in ("layers", "blobs/sha256", "images"):
                d = os.path.join(self.root, sub)
                for name in os.listdir(d):
                    if name.startswith(".tmp-"):
                        p = os.path.join(d, name)
                        if os.path.isdir(p) and not os.path.islink(p):
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(p)
        finally:
            os.close(fd)
        self.gc()

    # -- pull ------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        auth: Auth | None = None,
        progress: ProgressCallback | None = None,
        platform: Platform | None = None,
    ) -> Image:
        """Fetch ``ref`` from its registry (or a configured mirror), verify and unpack it."""
        parsed = reference.parse(ref)
        want = platform or self.platform
        reg = self.registry
        with self._content_busy():
            top = reg.get_manifest(parsed, auth=auth)
            mt, doc = oci.document_type(top.data, top.media_type)
            manifest_bytes, manifest_digest = top.data, top.digest
            index_digest = None
            if mt in oci.INDEX_TYPES:
                index_digest = top.digest
                self._put_blob_bytes(top.data, top.digest)
                entry = oci.select_platform(oci.parse_index(doc), want)
                child = reg.get_manifest(parsed.with_digest(entry.digest), auth=auth)
                if child.digest != entry.digest:
                    raise DigestMismatchError(
                        f"manifest {entry.digest} arrived with digest {child.digest}",
                        entry.digest, child.digest)
                mt, doc = oci.document_type(child.data, child.media_type)
                if mt not in oci.MANIFEST_TYPES:
                    raise InvalidImageError(f"index entry {entry.digest} is not an image manifest")
                if entry.media_type and entry.media_type != mt:
                    raise InvalidImageError(
                        f"index says {entry.digest} is {entry.media_type} but it is {mt}")
                manifest_bytes, manifest_digest = child.data, child.digest
            manifest = oci.parse_manifest(mt, doc)

            def fetch_from(desc: Descriptor, offset: int) -> Iterator[bytes]:
                return iter(reg.get_blob(parsed, desc.digest, desc.size, auth=auth, offset=offset))

            image_id = self._store_image(
                manifest, manifest_bytes, manifest_digest, fetch_from, str(parsed), progress,
                extra_blobs=[index_digest] if index_digest else [],
            )
            names = [f"{parsed.name}@{index_digest or manifest_digest}"]
            if parsed.tag:
                names.append(f"{parsed.name}:{parsed.tag}")
            self._set_names(image_id, names)
        return self.get(image_id)

    def _store_image(
        self,
        manifest: oci.Manifest,
        manifest_bytes: bytes,
        manifest_digest: str,
        fetch_from: Callable[[Descriptor, int], Iterator[bytes]],
        label: str,
        progress: ProgressCallback | None,
        extra_blobs: builtins.list[str],
        annotations: dict[str, str] | None = None,
    ) -> str:
        """Fetch (or read) config and layers, unpack, and write the image record."""
        self._put_blob_bytes(manifest_bytes, manifest_digest)
        cfg_desc = manifest.config
        if cfg_desc.size > oci.MAX_CONFIG_SIZE:
            raise ResourceExhaustedError(
                f"image config is {cfg_desc.size} bytes (limit {oci.MAX_CONFIG_SIZE})")
        cfg_path = self.blob_path(cfg_desc.digest)
        if not os.path.exists(cfg_path):
            data = b"".join(_capped(fetch_from(cfg_desc, 0), cfg_desc.size, "image config"))
            self._put_blob_bytes(data, cfg_desc.digest)
        with open(cfg_path, "rb") as f:
            config = oci.parse_config(f.read())
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidImageError(
                f"image config lists {len(config.diff_ids)} diff_ids "
                f"but the manifest has {len(manifest.layers)} layers")
        chains = oci.chain_ids(list(config.diff_ids))
        layers = [
            LayerInfo(d.digest, d.size, d.media_type, diff, chain)
            for d, diff, chain in zip(manifest.layers, config.diff_ids, chains, strict=True)
        ]
        self._fetch_layers(layers, fetch_from, label, progress)
        record = {
            "id": cfg_desc.digest,
            "manifest_digest": manifest_digest,
            "manifest_media_type": manifest.media_type,
            "layers": [x.__dict__ for x in layers],
            "blobs": [manifest_digest, *extra_blobs],
            "size": cfg_desc.size + sum(x.size for x in layers),
            "pulled_at": time.time(),
            "annotations": annotations or {},
        }
        with store.flock(self._lock("images.lock")):
            store.write_json(self._record_path(cfg_desc.digest), record)
        return cfg_desc.digest

    def _fetch_layers(
        self,
        layers: builtins.list[LayerInfo],
        fetch_from: Callable[[Descriptor, int], Iterator[bytes]],
        label: str,
        progress: ProgressCallback | None,
    ) -> None:
        """Download and unpack every missing layer, in parallel, each once."""
        mine: builtins.list[tuple[LayerInfo, Future[None]]] = []
        waits: builtins.list[tuple[LayerInfo, Future[None]]] = []
        with _inflight_lock:
            for info in layers:
                key = (self.root, info.chain_id)
                if key in _inflight:
                    waits.append((info, _inflight[key]))
                else:
                    fut: Future[None] = Future()
                    _inflight[key] = fut
                    mine.append((info, fut))
        try:
            if mine:
                workers = min(self.max_parallel_layers, len(mine))
                with ThreadPoolExecutor(workers, thread_name_prefix="pycri-layer") as pool:
                    results = [
                        (fut, pool.submit(self._ensure_layer, info, fetch_from, label, progress))
                        for info, fut in mine
                    ]
                    for fut, res in results:
                        exc = res.exception()
                        if exc is None:
                            fut.set_result(None)
                        else:
                            fut.set_exception(exc)
        finally:
            with _inflight_lock:
                for info, fut in mine:
                    _inflight.pop((self.root, info.chain_id), None)
                    if not fut.done():
                        fut.set_exception(RuntimeError("layer fetch abandoned"))
        for _, fut in mine:
            fut.result()
        for info, fut in waits:
            # Another pull was fetching this layer. If it failed (its registry
            # credentials, its cancelled client...), fetch it ourselves with ours.
            if fut.exception() is not None:
                self._ensure_layer(info, fetch_from, label, progress)

    def _ensure_layer(
        self,
        info: LayerInfo,
        fetch_from: Callable[[Descriptor, int], Iterator[bytes]],
        label: str,
        progress: ProgressCallback | None,
    ) -> None:
        final = self.layer_path(info.chain_id)
        blob = self.blob_path(info.digest)
        # One process at a time per layer; others wait here, then find it done.
        with store.flock(self._lock("layer-" + info.chain_id[7:] + ".lock")):
            if os.path.isdir(final) and os.path.exists(blob):
                if progress:
                    progress(PullProgress(label, info.digest, info.size, info.size, "exists"))
                return
            desc = Descriptor(info.media_type, info.digest, info.size)
            for attempt in (0, 1):
                tmp = tempfile.mkdtemp(prefix=".tmp-" + info.chain_id[7:19] + "-",
                                       dir=os.path.join(self.root, "layers"))
                os.chmod(tmp, 0o755)
                ingest = os.path.join(self.root, "ingest", info.digest[7:])
                try:
                    have_blob = os.path.exists(blob)
                    chunks = (
                        _read_file(blob) if have_blob
                        else self._ingest_chunks(desc, ingest, fetch_from, label, progress)
                    )
                    from pycri.layer import apply_layer

                    apply_layer(
                        chunks, info.media_type, tmp,
                        expected_digest=info.digest, expected_diff_id=info.diff_id,
                    )
                    if not have_blob:
                        os.rename(ingest, blob)
                        store.fsync_dir(os.path.dirname(blob))
                    if os.path.isdir(final):  # built meanwhile by an import in this process
                        shutil.rmtree(tmp)
                    else:
                        os.rename(tmp, final)
                    store.fsync_dir(os.path.dirname(final))
                    if progress:
                        progress(PullProgress(label, info.digest, info.size, info.size, "done"))
                    return
                except DigestMismatchError:
                    shutil.rmtree(tmp, ignore_errors=True)
                    resumed = os.path.exists(ingest)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(ingest)
                    if attempt == 0 and resumed:
                        continue  # a stale partial download: start over once from zero
                    raise
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise

    def _ingest_chunks(
        self,
        desc: Descriptor,
        ingest: str,
        fetch_from: Callable[[Descriptor, int], Iterator[bytes]],
        label: str,
        progress: ProgressCallback | None,
    ) -> Iterator[bytes]:
        """Yield the blob's bytes while saving them to ``ingest``; resume a partial file."""
        fd = os.open(ingest, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b", buffering=0) as f:
            have = 0
            if os.fstat(fd).st_size > desc.size:
                f.truncate(0)
            while True:  # replay what an earlier, interrupted pull saved
                b = f.read(_READ)
                if not b:
                    break
                have += len(b)
                yield b
            if progress:
                progress(PullProgress(label, desc.digest, have, desc.size, "downloading"))
            last, last_bytes = time.monotonic(), have
            for chunk in fetch_from(desc, have):
                if have + len(chunk) > desc.size:
                    raise ResourceExhaustedError(
                        f"blob {desc.digest} is larger than its descriptor's {desc.size} bytes")
                f.write(chunk)
                have += len(chunk)
                now = time.monotonic()
                # report every 100 ms, and at least every 4 MiB on a fast link
                if progress and (now - last > 0.1 or have - last_bytes >= 4 << 20):
                    last, last_bytes = now, have
                    progress(PullProgress(label, desc.digest, have, desc.size, "downloading"))
                yield chunk
            os.fsync(fd)
            if have != desc.size:
                raise DigestMismatchError(
                    f"blob {desc.digest}: got {have} bytes, descriptor says {desc.size}",
                    desc.digest, "")

    def _put_blob_bytes(self, data: bytes, digest: str) -> None:
        """Verify small in-memory content and publish it in the content store."""
        path = self.blob_path(digest)
        actual = oci.sha256_digest(data)
        if actual != digest:
            raise DigestMismatchError(f"content {digest} has digest {actual}", digest, actual)
        if not os.path.exists(path):
            store.atomic_write(path, data, mode=0o644)

    # -- import / export ---------------------------------------------------------

    def import_archive(self, path: str, progress: ProgressCallback | None = None) -> builtins.list[Image]:
        """Import an OCI image layout (a directory or a tar of one) or a `docker save` tar."""
        from pycri import archive

        return archive.import_archive(self, path, progress)

    def export(self, refs: builtins.list[str], path: str) -> None:
        """Write the named images as an OCI image layout tar at ``path``."""
        from pycri import archive

        archive.export_oci(self, [self.get(r) for r in refs], refs, path)


@functools.lru_cache(maxsize=1024)
def _config(blob_path: str) -> ImageConfig:
    """An image config, parsed once: blobs are immutable and named by their digest,
    so a cached parse can never disagree with the disk."""
    with open(blob_path, "rb") as f:
        return oci.parse_config(f.read())


def _read_file(path: str) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(_READ)
            if not b:
                return
            yield b


def _capped(chunks: Iterator[bytes], size: int, what: str) -> Iterator[bytes]:
    n = 0
    for c in chunks:
        n += len(c)
        if n > size:
            raise ResourceExhaustedError(f"{what} is larger than its descriptor's {size} bytes")
        yield c
