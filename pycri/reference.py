"""Image references: ``[registry/]repository[:tag][@digest]``, Docker's grammar.

``busybox`` means ``docker.io/library/busybox:latest``. A first component with a
``.`` or ``:``, or ``localhost``, is a registry host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pycri.errors import InvalidArgumentError
from pycri.store import validate_digest

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")
MAX_REF_LEN = 4096


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``, the name images are recorded under."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, None, digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def parse(ref: str, default_tag: str = "latest") -> Reference:
    """Parse and normalise ``ref``; raise InvalidArgumentError with the reason."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgumentError("image reference must be a non-empty string")
    if len(ref) > MAX_REF_LEN:
        raise InvalidArgumentError(f"image reference longer than {MAX_REF_LEN} characters")
    rest = ref
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        try:
            validate_digest(digest)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"invalid image reference {ref!r}: {e}") from None
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidArgumentError(f"invalid tag {tag!r} in image reference {ref!r}")
    parts = rest.split("/")
    if len(parts) > 1 and (("." in parts[0] or ":" in parts[0]) or parts[0] == "localhost"):
        registry = parts[0]
        path = parts[1:]
        if not _HOST.match(registry):
            raise InvalidArgumentError(f"invalid registry host {registry!r} in {ref!r}")
    else:
        registry = DEFAULT_REGISTRY
        path = parts
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and len(path) == 1:
        path = ["library", *path]
    for comp in path:
        if not _COMPONENT.match(comp):
            raise InvalidArgumentError(
                f"invalid repository name component {comp!r} in {ref!r} "
                "(lowercase letters, digits and . _ - separators only)"
            )
    if tag is None and digest is None:
        tag = default_tag
    return Reference(registry, "/".join(path), tag, digest)


def familiar(name: str) -> str:
    """Shorten ``docker.io/library/x`` to ``x`` for display."""
    if name.startswith("docker.io/library/"):
        return name[len("docker.io/library/") :]
    if name.startswith("docker.io/"):
        return name[len("docker.io/") :]
    return name
