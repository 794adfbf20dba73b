"""OCI and Docker image documents: media types, parsing and validation.

Everything here treats its input as hostile: sizes are capped before parsing,
types are checked field by field, and anything odd becomes InvalidImageError
(or UnsupportedError for formats pycri refuses, such as Docker schema 1).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pycri.config import Platform
from pycri.errors import InvalidImageError, NotFoundError, ResourceExhaustedError, UnsupportedError
from pycri.store import validate_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20
MAX_LAYERS = 255
MAX_INDEX_ENTRIES = 4096
MAX_ENV = 8192
MAX_ENV_BYTES = 1 << 20
MAX_BLOB_SIZE = 1 << 40


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI ChainID of each layer: chain[0] = diff[0]; chain[n] = sha256(chain[n-1] + " " + diff[n])."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out


def load_json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(data) > limit:
        raise ResourceExhaustedError(f"{what} is {len(data)} bytes, over the {limit}-byte limit")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise InvalidImageError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidImageError(f"{what} must be a JSON object")
    return obj


def _str(obj: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        raise InvalidImageError(f"{what}: field {key!r} must be a string")
    return v


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            p = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            d["platform"] = p
        return d


def parse_descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidImageError(f"{what}: descriptor must be an object")
    mt = _str(obj, "mediaType", what, "")
    digest = obj.get("digest")
    try:
        validate_digest(digest)
    except (ValueError, UnsupportedError) as e:
        raise InvalidImageError(f"{what}: {e}") from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_BLOB_SIZE:
        raise InvalidImageError(f"{what}: size must be a non-negative integer, got {size!r}")
    plat = None
    p = obj.get("platform")
    if p is not None:
        if not isinstance(p, dict):
            raise InvalidImageError(f"{what}: platform must be an object")
        plat = Platform(_str(p, "os", what, ""), _str(p, "architecture", what, ""),
                        _str(p, "variant", what, ""))
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
    ):
        raise InvalidImageError(f"{what}: annotations must map strings to strings")
    return Descriptor(mt, digest, size, plat, ann)  # type: ignore[arg-type]


def _reject_schema1(media_type: str, obj: dict[str, Any]) -> None:
    if media_type in DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
        raise UnsupportedError(
            "Docker image manifest schema 1 is not supported (deprecated since 2017); "
            "push the image again with a current client to get schema 2 or OCI"
        )


def document_type(data: bytes, content_type: str) -> tuple[str, dict[str, Any]]:
    """Work out what a fetched manifest-ish document is: (media type, parsed JSON)."""
    obj = load_json(data, "manifest", MAX_MANIFEST_SIZE)
    declared = obj.get("mediaType")
    ct = (content_type or "").split(";")[0].strip()
    _reject_schema1(ct, obj)
    if declared is not None and not isinstance(declared, str):
        raise InvalidImageError("manifest: mediaType must be a string")
    if "layers" in obj and "manifests" in obj:
        raise InvalidImageError("manifest has both 'layers' and 'manifests': ambiguous document")
    known = INDEX_TYPES + MANIFEST_TYPES
    if declared and ct in known and declared != ct:
        raise InvalidImageError(f"manifest mediaType {declared!r} disagrees with content type {ct!r}")
    mt = declared or (ct if ct in known else "")
    if not mt:
        mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST if "layers" in obj else ""
    if mt not in known:
        raise UnsupportedError(f"unsupported manifest media type {mt or ct!r}")
    if mt in INDEX_TYPES and "layers" in obj:
        raise InvalidImageError(f"an index ({mt}) must not have 'layers'")
    if mt in MANIFEST_TYPES and "manifests" in obj:
        raise InvalidImageError(f"an image manifest ({mt}) must not have 'manifests'")
    return mt, obj


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_manifest(media_type: str, obj: dict[str, Any]) -> Manifest:
    if obj.get("schemaVersion") != 2:
        raise InvalidImageError("manifest: schemaVersion must be 2")
    config = parse_descriptor(obj.get("config"), "manifest config")
    if config.media_type and config.media_type not in CONFIG_TYPES:
        raise UnsupportedError(f"manifest config media type {config.media_type!r} is not an image config")
    layers_raw = obj.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidImageError("manifest: 'layers' must be a list")
    if len(layers_raw) > MAX_LAYERS:
        raise ResourceExhaustedError(f"manifest has {len(layers_raw)} layers (limit {MAX_LAYERS})")
    layers = tuple(parse_descriptor(x, f"manifest layer {i}") for i, x in enumerate(layers_raw))
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedError(f"manifest layer {i}: unsupported media type {layer.media_type!r}")
    return Manifest(media_type, config, layers)


def parse_index(obj: dict[str, Any]) -> list[Descriptor]:
    if obj.get("schemaVersion") != 2:
        raise InvalidImageError("index: schemaVersion must be 2")
    raw = obj.get("manifests")
    if not isinstance(raw, list):
        raise InvalidImageError("index: 'manifests' must be a list")
    if len(raw) > MAX_INDEX_ENTRIES:
        raise ResourceExhaustedError(f"index has {len(raw)} entries (limit {MAX_INDEX_ENTRIES})")
    return [parse_descriptor(x, f"index entry {i}") for i, x in enumerate(raw)]


def select_platform(entries: list[Descriptor], want: Platform) -> Descriptor:
    """Pick the index entry for ``want``: exact variant first, then any variant of the arch."""
    cands = [d for d in entries if d.media_type in MANIFEST_TYPES + INDEX_TYPES or not d.media_type]
    exact = [d for d in cands if d.platform and d.platform.os == want.os
             and d.platform.architecture == want.architecture
             and (d.platform.variant or "") == (want.variant or "")]
    loose = [d for d in cands if d.platform and d.platform.os == want.os
             and d.platform.architecture == want.architecture]
    if exact or loose:
        return (exact or loose)[0]
    have = ", ".join(str(d.platform) for d in cands if d.platform) or "none"
    raise NotFoundError(f"no image for platform {want} in the index (it has: {have})")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config a runtime uses."""

    user: str = ""
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    volumes: tuple[str, ...] = ()
    exposed_ports: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    os: str = "linux"
    architecture: str = ""
    variant: str = ""
    created: str = ""
    diff_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "User": self.user, "Env": list(self.env), "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd), "WorkingDir": self.working_dir, "Volumes": list(self.volumes),
            "ExposedPorts": list(self.exposed_ports), "Labels": dict(self.labels),
            "StopSignal": self.stop_signal, "os": self.os, "architecture": self.architecture,
            "variant": self.variant, "created": self.created, "diff_ids": list(self.diff_ids),
        }


def _str_list(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise InvalidImageError(f"image config: {what} must be a list of strings")
    if any("\0" in x for x in v):
        raise InvalidImageError(f"image config: {what} contains a NUL byte")
    return tuple(v)


def _keys(v: Any, what: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise InvalidImageError(f"image config: {what} must be an object")
    return tuple(sorted(str(k) for k in v))


def _check_user(user: str) -> None:
    if "\0" in user or "\n" in user or len(user) > 256:
        raise InvalidImageError("image config: User is malformed")
    for part in user.split(":", 1):
        if part.isdigit() and int(part) > 2**31 - 1:
            raise InvalidImageError(f"image config: User id {part} is above the int32 range")


def _check_volume(v: str) -> str:
    if not v or not v.startswith("/"):
        raise InvalidImageError(f"image config: volume {v!r} is not an absolute path")
    if "\0" in v or any(p == ".." for p in v.split("/")):
        raise InvalidImageError(f"image config: volume {v!r} contains '..'")
    norm = posixpath.normpath(v)
    if norm == "/":
        raise InvalidImageError("image config: a volume at '/' is not allowed")
    return norm


def dedupe_env(env: tuple[str, ...]) -> tuple[str, ...]:
    """Keep the last value of each variable, in first-seen order (what a shell would see)."""
    last: dict[str, str] = {}
    for e in env:
        last[e.split("=", 1)[0]] = e
    return tuple(last.values())


def parse_config(data: bytes) -> ImageConfig:
    obj = load_json(data, "image config", MAX_CONFIG_SIZE)
    c = obj.get("config") or {}
    if not isinstance(c, dict):
        raise InvalidImageError("image config: 'config' must be an object")
    user = _str(c, "User", "image config", "")
    _check_user(user)
    env = _str_list(c.get("Env"), "Env")
    if len(env) > MAX_ENV or sum(len(e) for e in env) > MAX_ENV_BYTES:
        raise ResourceExhaustedError(
            f"image config: Env has {len(env)} entries / {sum(len(e) for e in env)} bytes "
            f"(limits {MAX_ENV} / {MAX_ENV_BYTES})"
        )
    wd = _str(c, "WorkingDir", "image config", "")
    if wd and ("\0" in wd or not wd.startswith("/")):
        raise InvalidImageError(f"image config: WorkingDir {wd!r} is not an absolute path")
    labels = c.get("Labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidImageError("image config: Labels must map strings to strings")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidImageError("image config: rootfs.type must be 'layers'")
    diff_ids = _str_list(rootfs.get("diff_ids"), "rootfs.diff_ids")
    for d in diff_ids:
        try:
            validate_digest(d)
        except (ValueError, UnsupportedError) as e:
            raise InvalidImageError(f"image config: diff_id {e}") from None
    created = obj.get("created", "")
    return ImageConfig(
        user=user,
        env=dedupe_env(env),
        entrypoint=_str_list(c.get("Entrypoint"), "Entrypoint"),
        cmd=_str_list(c.get("Cmd"), "Cmd"),
        working_dir=posixpath.normpath(wd) if wd else "",
        volumes=tuple(_check_volume(v) for v in _keys(c.get("Volumes"), "Volumes")),
        exposed_ports=_keys(c.get("ExposedPorts"), "ExposedPorts"),
        labels=dict(labels),
        stop_signal=_str(c, "StopSignal", "image config", ""),
        os=_str(obj, "os", "image config", "linux"),
        architecture=_str(obj, "architecture", "image config", ""),
        variant=_str(obj, "variant", "image config", ""),
        created=created if isinstance(created, str) else "",
        diff_ids=diff_ids,
    )
