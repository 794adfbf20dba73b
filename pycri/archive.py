"""Import and export of image archives: OCI image layouts and `docker save` tars.

Archives are read, never extracted: each blob is streamed out of the archive
into the same verify-then-publish path a registry pull uses, so a hostile
archive gets the same checks (digests, diff_ids, layer sandboxing) as a
hostile registry.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from pycri import oci, reference
from pycri.errors import InvalidArgumentError, InvalidImageError, NotFoundError, UnsupportedError
from pycri.oci import Descriptor

if TYPE_CHECKING:
    from pycri.image import Image, ImageStore, ProgressCallback

MAX_MEMBERS = 200_000
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


class _Source:
    """Files of an archive (a directory or a tar), looked up by normalised name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if os.path.isdir(path):
            return
        try:
            self.tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise InvalidArgumentError(f"{path}: not a directory or a readable tar archive: {e}") from None
        for i, m in enumerate(self.tar):
            if i >= MAX_MEMBERS:
                raise InvalidImageError(f"{path}: more than {MAX_MEMBERS} archive members")
            if m.isreg():
                self.members[posixpath.normpath(m.name.lstrip("/"))] = m

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        name = posixpath.normpath(name)
        if self.tar is None:
            return self._dir_path(name) is not None
        return name in self.members

    def _dir_path(self, name: str) -> str | None:
        if name.startswith("../") or name == ".." or name.startswith("/"):
            return None
        p = os.path.join(self.path, name)
        # refuse symlinks anywhere below the archive dir: names come from the archive
        real = os.path.realpath(p)
        if not real.startswith(os.path.realpath(self.path) + os.sep) or not os.path.isfile(real):
            return None
        return real

    def open(self, name: str) -> IO[bytes]:
        name = posixpath.normpath(name)
        if self.tar is None:
            p = self._dir_path(name)
            if p is None:
                raise InvalidImageError(f"archive has no file {name!r}")
            return open(p, "rb")
        m = self.members.get(name)
        f = self.tar.extractfile(m) if m is not None else None
        if f is None:
            raise InvalidImageError(f"archive has no file {name!r}")
        return f

    def size(self, name: str) -> int:
        name = posixpath.normpath(name)
        if self.tar is None:
            p = self._dir_path(name)
            return os.path.getsize(p) if p else -1
        m = self.members.get(name)
        return m.size if m else -1

    def read_json(self, name: str, limit: int) -> dict[str, Any]:
        if self.size(name) > limit:
            raise InvalidImageError(f"archive file {name} is over {limit} bytes")
        with self.open(name) as f:
            data = f.read(limit + 1)
        return oci.load_json(data, name, limit)

    def chunks(self, name: str, offset: int = 0) -> Iterator[bytes]:
        with self.open(name) as f:
            if offset:
                f.seek(offset)
            while True:
                b = f.read(1 << 20)
                if not b:
                    return
                yield b


def _blob_name(digest: str) -> str:
    algo, hexpart = digest.split(":", 1)
    return f"blobs/{algo}/{hexpart}"


def import_archive(store: ImageStore, path: str, progress: ProgressCallback | None) -> list[Image]:
    if not os.path.exists(path):
        raise NotFoundError(f"{path}: no such file or directory")
    src = _Source(path)
    try:
        with store._content_busy():
            if src.has("index.json"):
                ids = _import_oci(store, src, progress)
            elif src.has("manifest.json"):
                ids = _import_docker(store, src, progress)
            else:
                raise UnsupportedError(
                    f"{path}: neither an OCI image layout (index.json) nor a docker save "
                    "archive (manifest.json)")
    finally:
        src.close()
    return [store.get(i) for i in ids]


def _name_for(ann: dict[str, str], fallback: str) -> str:
    for key in (CONTAINERD_NAME, REF_NAME):
        v = ann.get(key, "")
        if v and ("/" in v or ":" in v.split("/")[-1]):
            try:
                return str(reference.parse(v))
            except InvalidArgumentError:
                pass
    tag = ann.get(REF_NAME, "")
    try:
        return str(reference.parse(f"localhost/{fallback}:{tag or 'latest'}"))
    except InvalidArgumentError:
        return f"localhost/{fallback}:latest"


def _import_oci(store: ImageStore, src: _Source, progress: ProgressCallback | None) -> list[str]:
    layout = src.read_json("oci-layout", 4096) if src.has("oci-layout") else {}
    if layout and layout.get("imageLayoutVersion") not in ("1.0.0", None):
        raise UnsupportedError(f"unsupported OCI layout version {layout.get('imageLayoutVersion')!r}")
    index = src.read_json("index.json", oci.MAX_MANIFEST_SIZE)
    ids: list[str] = []
    for top in oci.parse_index(index):
        if top.size > oci.MAX_MANIFEST_SIZE:
            raise InvalidImageError(f"manifest {top.digest} is too large")
        data = b"".join(src.chunks(_blob_name(top.digest)))
        mt, doc = oci.document_type(data, top.media_type)
        desc_digest = top.digest
        if mt in oci.INDEX_TYPES:
            store._put_blob_bytes(data, top.digest)
            entry = oci.select_platform(oci.parse_index(doc), store.platform)
            data = b"".join(src.chunks(_blob_name(entry.digest)))
            mt, doc = oci.document_type(data, entry.media_type)
            desc_digest = entry.digest
        manifest = oci.parse_manifest(mt, doc)

        def fetch(desc: Descriptor, offset: int) -> Iterator[bytes]:
            return src.chunks(_blob_name(desc.digest), offset)

        name = _name_for(top.annotations, "imported")
        image_id = store._store_image(
            manifest, data, desc_digest, fetch, name, progress,
            extra_blobs=[top.digest] if top.digest != desc_digest else [])
        parsed = reference.parse(name)
        store._set_names(image_id, [name, f"{parsed.name}@{top.digest}"])
        ids.append(image_id)
    return ids


def _import_docker(store: ImageStore, src: _Source, progress: ProgressCallback | None) -> list[str]:
    with src.open("manifest.json") as f:
        raw = f.read(oci.MAX_MANIFEST_SIZE + 1)
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise InvalidImageError(f"docker archive manifest.json is not JSON: {e}") from None
    if not isinstance(entries, list) or len(raw) > oci.MAX_MANIFEST_SIZE:
        raise InvalidImageError("docker archive manifest.json must be a list (and under 4 MiB)")
    ids: list[str] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) \
                or not isinstance(entry.get("Layers"), list):
            raise InvalidImageError(f"docker archive manifest.json entry {n} is malformed")
        config_bytes = b"".join(src.chunks(entry["Config"]))
        if len(config_bytes) > oci.MAX_CONFIG_SIZE:
            raise InvalidImageError("docker archive config is too large")
        config_digest = oci.sha256_digest(config_bytes)
        store._put_blob_bytes(config_bytes, config_digest)
        layers = []
        for lp in entry["Layers"]:
            if not isinstance(lp, str) or src.size(lp) < 0:
                raise InvalidImageError(f"docker archive names a missing layer {lp!r}")
            from pycri import _native

            h = _native.Sha256()
            with src.open(lp) as f:
                head = f.read(4)
                h.update(head)
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
            gz = head[:2] == b"\x1f\x8b"
            zst = head == b"\x28\xb5\x2f\xfd"
            media = "application/vnd.oci.image.layer.v1.tar" + (
                "+zstd" if zst else "+gzip" if gz else "")
            layers.append(({"mediaType": media, "size": src.size(lp),
                            "digest": "sha256:" + h.hexdigest()}, lp))
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "size": len(config_bytes),
                       "digest": config_digest},
            "layers": [x[0] for x in layers],
        }
        manifest_bytes = json.dumps(manifest_doc, separators=(",", ":")).encode()
        manifest = oci.parse_manifest(oci.OCI_MANIFEST, manifest_doc)
        paths: dict[str, str] = {str(x[0]["digest"]): x[1] for x in layers}

        def fetch(desc: Descriptor, offset: int, paths: dict[str, str] = paths) -> Iterator[bytes]:
            return src.chunks(paths[desc.digest], offset)

        tags = [t for t in (entry.get("RepoTags") or []) if isinstance(t, str)]
        names = []
        for t in tags:
            try:
                names.append(str(reference.parse(t)))
            except InvalidArgumentError:
                pass
        label = names[0] if names else "localhost/imported:latest"
        manifest_digest = oci.sha256_digest(manifest_bytes)
        image_id = store._store_image(manifest, manifest_bytes, manifest_digest, fetch,
                                      label, progress, extra_blobs=[])
        store._set_names(image_id, names or [label])
        ids.append(image_id)
    return ids


def export_oci(store: ImageStore, images: list[Image], refs: list[str], path: str) -> None:
    """Write an OCI image layout tar holding ``images`` (one index entry per ref)."""
    manifests = []
    blobs: list[str] = []
    for image, ref in zip(images, refs, strict=True):
        mt = image.manifest_media_type
        size = os.path.getsize(store.blob_path(image.manifest_digest))
        ann: dict[str, str] = {}
        try:
            parsed = reference.parse(ref)
            ann = {CONTAINERD_NAME: str(parsed), REF_NAME: parsed.tag or "latest"}
        except InvalidArgumentError:
            pass
        manifests.append(Descriptor(mt, image.manifest_digest, size, None, ann).to_json())
        for d in [image.manifest_digest, image.id, *(x.digest for x in image.layers)]:
            if d not in blobs:
                blobs.append(d)
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": manifests}
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        def add_bytes(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))

        add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes("index.json", json.dumps(index, separators=(",", ":")).encode())
        for d in blobs:
            bp = store.blob_path(d)
            if not os.path.exists(bp):
                raise NotFoundError(f"blob {d} is not in the content store; pull the image again")
            tar.add(bp, arcname=_blob_name(d), recursive=False)
    os.replace(tmp, path)
