"""Inputs to pycri: frozen dataclasses, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from pycri.errors import InvalidArgumentError


@dataclass(frozen=True)
class Auth:
    """Registry credentials: a username and password, or a token.

    ``identity_token`` is an OAuth2 refresh token (Docker's ``identitytoken``);
    ``registry_token`` is a bearer token sent as is.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("username", "password", "identity_token", "registry_token"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise InvalidArgumentError(f"Auth.{name} must be a string")
            if "\n" in v or "\r" in v or "\0" in v:
                raise InvalidArgumentError(f"Auth.{name} contains a control character")
        if self.password and not self.username:
            raise InvalidArgumentError("Auth.password given without a username")

    @property
    def empty(self) -> bool:
        return not (self.username or self.identity_token or self.registry_token)


@dataclass(frozen=True)
class Platform:
    """An OCI platform: what an image index entry runs on."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        import platform as _p

        m = _p.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
                "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)
        variant = "v8" if arch == "arm64" else ("v7" if arch == "arm" else "")
        return cls("linux", arch, variant)

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s
