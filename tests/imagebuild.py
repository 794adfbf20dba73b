#!/usr/bin/env python3
"""Build real OCI (or Docker schema 2) images in memory, and push them to a registry.

A test helper and a tiny CLI. Everything is deterministic: fixed mtimes, no
user/group names, gzip without a timestamp, so the same inputs always give the
same digests.

    from imagebuild import File, Dir, layer_tar, busybox_layer, build_image, push
    img = build_image([busybox_layer(), layer_tar([File("hello", b"hi\\n")])],
                      config={"Cmd": ["sh"]})
    push("127.0.0.1:5000", "library/busybox", "latest", img)

CLI::

    python3 tests/imagebuild.py push-busybox 127.0.0.1:5000/library/busybox:latest
    python3 tests/imagebuild.py push-busybox --docker --compression zstd HOST/REPO:TAG
    python3 tests/imagebuild.py oci-layout DIR TAG
    python3 tests/imagebuild.py docker-archive FILE.tar REPO:TAG

Writing tar with ``tarfile`` is fine here; pycri itself never *extracts* with it.
Entries are written exactly as given (absolute names, ``..``, odd types), so the
same helpers build hostile layers for the layer-apply tests.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

# --- media types --------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_OCI_LAYER_TYPES = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_DOCKER_LAYER_TYPES = {"none": DOCKER_LAYER, "gzip": DOCKER_LAYER_GZIP,
                       # Docker has no zstd type of its own; registries and containerd
                       # accept the OCI one inside a Docker manifest.
                       "zstd": OCI_LAYER_ZSTD}

MTIME = 1_700_000_000  # fixed timestamp for every entry: stable digests
CREATED = "2023-11-14T22:13:20Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- layer entries --------------------------------------------------------------


@dataclass(frozen=True)
class File:
    path: str
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)  # written as SCHILY.xattr.* PAX


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str  # the path of an earlier entry in the same layer (tar linkname)


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers: an empty ``dir/.wh.name`` file."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything lower layers have under ``dir``: ``dir/.wh..wh..opq``."""

    dir: str


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644


@dataclass(frozen=True)
class CharDev:
    path: str
    major: int = 1
    minor: int = 3
    mode: int = 0o666


@dataclass(frozen=True)
class BlockDev:
    path: str
    major: int = 7
    minor: int = 0
    mode: int = 0o660


@dataclass(frozen=True)
class Raw:
    """Escape hatch for hostile tests: a TarInfo written as is, with ``data``."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Fifo | CharDev | BlockDev | Raw


def _info(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = MTIME
    return ti


def _split(path: str) -> tuple[str, str]:
    path = path.rstrip("/")
    d, _, base = path.rpartition("/")
    return d, base


def layer_tar(entries: list[Entry] | tuple[Entry, ...]) -> bytes:
    """An uncompressed layer tarball of ``entries``, in order, names as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            data = None
            if isinstance(e, File):
                ti = _info(e.path, tarfile.REGTYPE, e.mode, e.uid, e.gid)
                ti.size = len(e.data)
                if e.xattrs:
                    ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e.xattrs.items()}
                data = e.data
            elif isinstance(e, Dir):
                ti = _info(e.path, tarfile.DIRTYPE, e.mode, e.uid, e.gid)
            elif isinstance(e, Symlink):
                ti = _info(e.path, tarfile.SYMTYPE, 0o777, e.uid, e.gid)
                ti.linkname = e.target
            elif isinstance(e, Hardlink):
                ti = _info(e.path, tarfile.LNKTYPE, 0o644)
                ti.linkname = e.target
            elif isinstance(e, Whiteout):
                d, base = _split(e.path)
                ti = _info(f"{d}/.wh.{base}" if d else f".wh.{base}", tarfile.REGTYPE, 0o644)
            elif isinstance(e, Opaque):
                d = e.dir.rstrip("/")
                ti = _info(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq", tarfile.REGTYPE, 0o644)
            elif isinstance(e, Fifo):
                ti = _info(e.path, tarfile.FIFOTYPE, e.mode)
            elif isinstance(e, CharDev):
                ti = _info(e.path, tarfile.CHRTYPE, e.mode)
                ti.devmajor, ti.devminor = e.major, e.minor
            elif isinstance(e, BlockDev):
                ti = _info(e.path, tarfile.BLKTYPE, e.mode)
                ti.devmajor, ti.devminor = e.major, e.minor
            elif isinstance(e, Raw):
                ti, data = e.info, e.data
            else:
                raise TypeError(f"not a layer entry: {e!r}")
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


BUSYBOX = "/bin/busybox"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\nnobody:x:65534:\n"


def busybox_applets(busybox: str = BUSYBOX) -> list[str]:
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def busybox_layer(static: bool = True, links: str = "hardlink",
                  busybox: str = BUSYBOX) -> bytes:
    """A small root filesystem: static busybox, every applet in /bin, passwd/group, /tmp.

    ``links`` is "hardlink" (like the official busybox image) or "symlink".
    Only a statically linked busybox is supported (the image has no libc).
    """
    if not static:
        raise ValueError("busybox_layer: only the static busybox (busybox-static) is supported")
    if links not in ("hardlink", "symlink"):
        raise ValueError("links must be 'hardlink' or 'symlink'")
    with open(busybox, "rb") as f:
        binary = f.read()
    entries: list[Entry] = [
        Dir("bin"),
        File("bin/busybox", binary, 0o755),
    ]
    for applet in busybox_applets(busybox):
        if links == "hardlink":
            entries.append(Hardlink(f"bin/{applet}", "bin/busybox"))
        else:
            entries.append(Symlink(f"bin/{applet}", "busybox"))
    entries += [
        Dir("dev"), Dir("proc", 0o555), Dir("sys", 0o555),
        Dir("etc"),
        File("etc/passwd", PASSWD.encode()),
        File("etc/group", GROUP.encode()),
        Dir("home"), Dir("home/app", 0o755, 1000, 1000),
        Dir("root", 0o700),
        Dir("tmp", 0o1777),
        Dir("usr"), Dir("usr/bin"), Dir("usr/sbin"), Dir("sbin"),
        Dir("var"), Dir("var/tmp", 0o1777),
    ]
    return layer_tar(entries)


# --- compression ------------------------------------------------------------------


def compress(tar: bytes, kind: str = "gzip") -> tuple[bytes, str]:
    """Return (blob, OCI layer media type) for ``kind`` in gzip | zstd | none."""
    if kind == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0), OCI_LAYER_GZIP
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(tar), OCI_LAYER_ZSTD
    if kind == "none":
        return tar, OCI_LAYER
    raise ValueError(f"unknown compression {kind!r}")


# --- images -------------------------------------------------------------------------


@dataclass
class BuiltImage:
    manifest: bytes
    manifest_digest: str
    media_type: str
    config: bytes
    config_digest: str
    blobs: dict[str, bytes]          # config and layer blobs by digest
    diff_ids: list[str]
    layer_digests: list[str]         # compressed blob digests, in order
    layer_tars: list[bytes]          # the uncompressed tars, in order
    layer_media_types: list[str]

    @property
    def digest(self) -> str:
        return self.manifest_digest

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.manifest_digest,
                "size": len(self.manifest)}

    def all_blobs(self) -> dict[str, bytes]:
        """Every blob including the manifest itself."""
        return {**self.blobs, self.manifest_digest: self.manifest}


@dataclass
class BuiltIndex:
    manifest: bytes
    manifest_digest: str
    media_type: str
    children: list[BuiltImage]

    @property
    def digest(self) -> str:
        return self.manifest_digest

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.manifest_digest,
                "size": len(self.manifest)}

    @property
    def blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for c in self.children:
            out.update(c.blobs)
        return out

    def all_blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for c in self.children:
            out.update(c.all_blobs())
        out[self.manifest_digest] = self.manifest
        return out


Built = BuiltImage | BuiltIndex


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=None, separators=(",", ":")).encode()


def build_image(layers: list[bytes], compression: str | list[str] = "gzip",
                config: dict[str, Any] | None = None, os: str = "linux",
                architecture: str = "amd64", variant: str = "", docker: bool = False,
                image_config: dict[str, Any] | None = None,
                config_bytes: bytes | None = None,
                manifest_extra: dict[str, Any] | None = None) -> BuiltImage:
    """An image from uncompressed layer tars.

    ``config`` is the runtime section of the image config (``Env``, ``Cmd``,
    ``User``, ``WorkingDir`` ...; default: PATH only). ``image_config`` is merged
    over the top-level config fields; ``config_bytes`` replaces the config blob
    verbatim (hostile tests). ``manifest_extra`` is merged into the manifest JSON.
    """
    kinds = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    if len(kinds) != len(layers):
        raise ValueError("one compression per layer")
    blobs: dict[str, bytes] = {}
    descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    digests: list[str] = []
    mtypes: list[str] = []
    for tar, kind in zip(layers, kinds, strict=True):
        blob, mt = compress(tar, kind)
        if docker:
            mt = _DOCKER_LAYER_TYPES[kind]
        d = sha256_digest(blob)
        blobs[d] = blob
        diff_ids.append(sha256_digest(tar))
        digests.append(d)
        mtypes.append(mt)
        descs.append({"mediaType": mt, "digest": d, "size": len(blob)})
    if config_bytes is None:
        rc: dict[str, Any] = {"Env": [f"PATH={DEFAULT_PATH}"]}
        if config is not None:
            rc = dict(config)
        cfg: dict[str, Any] = {
            "created": CREATED,
            "architecture": architecture,
            "os": os,
            "config": rc,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": "imagebuild"} for _ in layers],
        }
        if variant:
            cfg["variant"] = variant
        if image_config:
            cfg.update(image_config)
        config_bytes = _json(cfg)
    cdig = sha256_digest(config_bytes)
    blobs[cdig] = config_bytes
    mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mtype,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                   "digest": cdig, "size": len(config_bytes)},
        "layers": descs,
    }
    if manifest_extra:
        manifest.update(manifest_extra)
    mbytes = _json(manifest)
    return BuiltImage(mbytes, sha256_digest(mbytes), mtype, config_bytes, cdig, blobs,
                      diff_ids, digests, list(layers), mtypes)


def build_index(images: list[tuple[BuiltImage, dict[str, str]]], docker: bool = False,
                index_extra: dict[str, Any] | None = None) -> BuiltIndex:
    """An image index (or Docker manifest list) of ``(image, platform)`` pairs.

    ``platform`` is e.g. ``{"os": "linux", "architecture": "arm64", "variant": "v8"}``.
    """
    mtype = DOCKER_LIST if docker else OCI_INDEX
    entries = []
    for img, plat in images:
        d = dict(img.descriptor)
        d["platform"] = dict(plat)
        entries.append(d)
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": mtype, "manifests": entries}
    if index_extra:
        index.update(index_extra)
    data = _json(index)
    return BuiltIndex(data, sha256_digest(data), mtype, [img for img, _ in images])


def busybox_image(compression: str = "gzip", docker: bool = False,
                  architecture: str = "amd64") -> BuiltImage:
    """One busybox layer, Cmd ["sh"], the default PATH."""
    return build_image([busybox_layer()], compression,
                       config={"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"]},
                       architecture=architecture, docker=docker)


# --- pushing -----------------------------------------------------------------------


def _pool():  # type: ignore[no-untyped-def]
    import urllib3

    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=60), retries=False)


def push_blob(base: str, repo: str, digest: str, data: bytes,
              headers: dict[str, str] | None = None, http=None) -> None:  # type: ignore[no-untyped-def]
    """Upload one blob (monolithic: POST to start, PUT with ?digest=) unless HEAD finds it."""
    http = http or _pool()
    h = dict(headers or {})
    r = http.request("HEAD", f"{base}/v2/{repo}/blobs/{digest}", headers=h, redirect=False)
    if r.status == 200:
        return
    r = http.request("POST", f"{base}/v2/{repo}/blobs/uploads/", headers=h, redirect=False)
    if r.status != 202:
        raise RuntimeError(f"POST {base}/v2/{repo}/blobs/uploads/: HTTP {r.status} {r.data[:300]!r}")
    loc = urljoin(f"{base}/v2/{repo}/blobs/uploads/", r.headers["Location"])
    loc += ("&" if urlsplit(loc).query else "?") + "digest=" + digest
    r = http.request("PUT", loc, body=data,
                     headers={**h, "Content-Type": "application/octet-stream",
                              "Content-Length": str(len(data))}, redirect=False)
    if r.status != 201:
        raise RuntimeError(f"PUT blob {digest} to {base}/v2/{repo}: HTTP {r.status} {r.data[:300]!r}")


def push_manifest(base: str, repo: str, ref: str, data: bytes, media_type: str,
                  headers: dict[str, str] | None = None, http=None) -> None:  # type: ignore[no-untyped-def]
    http = http or _pool()
    r = http.request("PUT", f"{base}/v2/{repo}/manifests/{ref}", body=data,
                     headers={**(headers or {}), "Content-Type": media_type}, redirect=False)
    if r.status != 201:
        raise RuntimeError(f"PUT manifest {repo}:{ref} to {base}: HTTP {r.status} {r.data[:300]!r}")


def push(registry_host: str, repo: str, ref: str | None, built: Built,
         headers: dict[str, str] | None = None, scheme: str = "http") -> str:
    """Push ``built`` to ``registry_host`` (``host:port``) as ``repo:ref``.

    ``ref`` is a tag, a digest, or None (push by the manifest's own digest). Blobs
    first (skipped when HEAD finds them), then child manifests by digest, then the
    top manifest. ``headers`` (e.g. Authorization) go with every request.
    Returns the top manifest's digest.
    """
    base = f"{scheme}://{registry_host}"
    http = _pool()
    children = built.children if isinstance(built, BuiltIndex) else [built]
    for img in children:
        for d, data in img.blobs.items():
            push_blob(base, repo, d, data, headers, http)
    if isinstance(built, BuiltIndex):
        for img in built.children:
            push_manifest(base, repo, img.manifest_digest, img.manifest, img.media_type,
                          headers, http)
    push_manifest(base, repo, ref or built.manifest_digest, built.manifest, built.media_type,
                  headers, http)
    return built.manifest_digest


# --- on-disk formats -------------------------------------------------------------------


def write_oci_layout(dir: str, built: Built, tag: str | None = None) -> None:
    """An OCI image layout: oci-layout, index.json naming ``built`` (ref.name = tag), blobs/."""
    bdir = os.path.join(dir, "blobs", "sha256")
    os.makedirs(bdir, exist_ok=True)
    for d, data in built.all_blobs().items():
        with open(os.path.join(bdir, d.split(":", 1)[1]), "wb") as f:
            f.write(data)
    with open(os.path.join(dir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    desc = dict(built.descriptor)
    if tag:
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(dir, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}, f)


def write_docker_archive(path: str, built: BuiltImage, repo_tag: str | None) -> None:
    """A ``docker save`` tarball: manifest.json, <config-hex>.json, <id>/layer.tar, repositories.

    Layers are stored uncompressed, as ``docker save`` does.
    """
    if not isinstance(built, BuiltImage):
        raise TypeError("a docker archive holds single-platform images only")
    cfg_name = built.config_digest.split(":", 1)[1] + ".json"
    entries: list[Entry] = [File(cfg_name, built.config)]
    layer_paths = []
    for tar, diff_id in zip(built.layer_tars, built.diff_ids, strict=True):
        lid = diff_id.split(":", 1)[1]
        entries += [Dir(lid), File(f"{lid}/VERSION", b"1.0"), File(f"{lid}/layer.tar", tar)]
        layer_paths.append(f"{lid}/layer.tar")
    manifest = [{"Config": cfg_name, "RepoTags": [repo_tag] if repo_tag else None,
                 "Layers": layer_paths}]
    entries.append(File("manifest.json", _json(manifest)))
    if repo_tag and layer_paths:
        repo, _, tag = repo_tag.rpartition(":")
        if "/" in tag or not repo:
            repo, tag = repo_tag, "latest"
        top = layer_paths[-1].split("/", 1)[0]
        entries.append(File("repositories", _json({repo: {tag: top}})))
    with open(path, "wb") as f:
        f.write(layer_tar(entries))


# --- CLI ---------------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, str, str]:
    """``host[:port]/repo[:tag|@digest]`` -> (host, repo, tag-or-digest)."""
    host, _, rest = ref.partition("/")
    if not rest:
        raise SystemExit(f"reference must be HOST/REPO[:TAG]: {ref!r}")
    if "@" in rest:
        repo, _, tag = rest.partition("@")
    else:
        repo, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    return host, repo, tag or "latest"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imagebuild", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("push-busybox", help="push a one-layer busybox image")
    pb.add_argument("ref", help="HOST:PORT/REPO[:TAG]")
    pb.add_argument("--docker", action="store_true", help="Docker schema 2 media types")
    pb.add_argument("--compression", default="gzip", choices=["gzip", "zstd", "none"])
    po = sub.add_parser("oci-layout", help="write the busybox image as an OCI layout")
    po.add_argument("dir")
    po.add_argument("tag", nargs="?", default="latest")
    pd = sub.add_parser("docker-archive", help="write the busybox image as a docker-save tar")
    pd.add_argument("path")
    pd.add_argument("repo_tag", nargs="?", default="busybox:latest")
    a = p.parse_args(argv)
    if a.cmd == "push-busybox":
        host, repo, ref = _split_ref(a.ref)
        img = busybox_image(a.compression, a.docker)
        digest = push(host, repo, ref, img)
        print(f"{host}/{repo}:{ref}@{digest}" if not ref.startswith("sha256:")
              else f"{host}/{repo}@{digest}")
    elif a.cmd == "oci-layout":
        write_oci_layout(a.dir, busybox_image(), a.tag)
    elif a.cmd == "docker-archive":
        write_docker_archive(a.path, busybox_image(), a.repo_tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
