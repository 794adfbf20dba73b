"""Pure conversions between pycri library objects and CRI v1 protobuf messages.

No I/O and no state: every function maps its arguments to a result, so each is
unit-tested on its own and the server stays a list of one-line calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Iterable

from pycri import reference
from pycri.config import Auth
from pycri.cri._gen import api_pb2
from pycri.errors import InvalidArgumentError
from pycri.image import FsInfo, Image

# Names the Docker Hub registry goes by in credentials (docker login writes the first).
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


# -- images ---------------------------------------------------------------------

def image_name(spec: api_pb2.ImageSpec | None, what: str = "image") -> str:
    """The image reference (tag, digest reference, id or id prefix) an ImageSpec names."""
    name = spec.image.strip() if spec is not None else ""
    if not name:
        raise InvalidArgumentError(f"{what}: ImageSpec.image must not be empty")
    return name


def user_of(user: str) -> tuple[int | None, str]:
    """Split an image config ``User`` into (uid, username) as CRI wants them.

    ``"1000"`` or ``"1000:50"`` give uid 1000; ``"nginx"`` or ``"nginx:web"`` give the
    name; ``""`` gives neither (the container then runs as root, uid 0, but CRI leaves
    both unset for that, as containerd and CRI-O do).
    """
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name


def image_to_proto(img: Image, pinned: bool = False) -> api_pb2.Image:
    """A pycri Image as a CRI Image: id is the config digest (= PullImage's image_ref)."""
    uid, username = user_of(img.config.user)
    spec_name = (img.repo_tags or img.repo_digests or (img.id,))[0]
    msg = api_pb2.Image(
        id=img.id,
        repo_tags=list(img.repo_tags),
        repo_digests=list(img.repo_digests),
        size=max(1, img.size),  # CRI: "Must be > 0"
        username=username,
        spec=api_pb2.ImageSpec(image=spec_name, annotations=dict(img.annotations)),
        pinned=pinned,
    )
    if uid is not None:
        msg.uid.value = uid
    return msg


def image_info(img: Image) -> dict[str, str]:
    """ImageStatus's verbose info map: values are JSON documents (crictl parses them)."""
    return {"info": json.dumps(img.to_json(), sort_keys=True)}


def is_pinned(img: Image, pinned_refs: Iterable[str]) -> bool:
    """Whether ``img`` carries one of ``pinned_refs`` (normalised) as a tag or digest name."""
    names = set(img.repo_tags) | set(img.repo_digests)
    for ref in pinned_refs:
        try:
            parsed = reference.parse(ref)
        except InvalidArgumentError:
            continue
        key = f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed)
        if key in names:
            return True
    return False


def fs_usage(fs: FsInfo) -> api_pb2.FilesystemUsage:
    return api_pb2.FilesystemUsage(
        timestamp=max(1, fs.timestamp_ns),  # CRI: "Must be > 0"
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=fs.path),
        used_bytes=api_pb2.UInt64Value(value=fs.used_bytes),
        inodes_used=api_pb2.UInt64Value(value=fs.inodes_used),
    )


# -- runtime status ---------------------------------------------------------------------

def network_condition(ready: bool, reason: str) -> api_pb2.RuntimeCondition:
    """The NetworkReady condition from the library's CNI status (ready, why not)."""
    if ready:
        return api_pb2.RuntimeCondition(type="NetworkReady", status=True)
    return api_pb2.RuntimeCondition(type="NetworkReady", status=False,
                                    reason="NetworkPluginNotReady",
                                    message="network plugin not ready: " + reason)


# -- credentials ------------------------------------------------------------------

def _host_of(server_address: str) -> str:
    """The host[:port] of a credential's server address (a URL or a bare host)."""
    s = server_address.strip()
    if "://" not in s:
        s = "//" + s
    host = urllib.parse.urlsplit(s).netloc.lower()
    return "docker.io" if host in _DOCKER_HUB else host


def auth_from_proto(cfg: api_pb2.AuthConfig | None, registry: str) -> Auth | None:
    """CRI AuthConfig -> pycri Auth for a pull from ``registry`` (None: anonymous).

    username/password win over ``auth`` (base64 of ``user:password``), as in Docker's
    config. Credentials whose ``server_address`` names another registry are not sent
    there: they are dropped and the pull goes anonymous, as containerd does.
    """
    if cfg is None:
        return None
    if cfg.server_address:
        want = "docker.io" if registry.lower() in _DOCKER_HUB else registry.lower()
        if _host_of(cfg.server_address) != want:
            return None
    username, password = cfg.username, cfg.password
    if not username and cfg.auth:
        try:
            decoded = base64.b64decode(cfg.auth, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidArgumentError("AuthConfig.auth is not base64 of 'user:password'") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise InvalidArgumentError("AuthConfig.auth must decode to 'user:password'")
    auth = Auth(username=username, password=password, identity_token=cfg.identity_token,
                registry_token=cfg.registry_token)
    return None if auth.empty else auth


def registry_of(ref: str) -> str:
    """The registry host a pull of ``ref`` goes to (raises InvalidArgumentError if malformed)."""
    return reference.parse(ref).registry
