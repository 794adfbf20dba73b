"""Registry endpoints from a ``hosts.toml`` directory, in containerd's format.

For a registry host ``H`` the first of these that exists is read:
``<config_dir>/H_port_/hosts.toml`` (for ``H:port``), ``<config_dir>/H/hosts.toml``,
``<config_dir>/_default/hosts.toml``. The file looks like::

    server = "https://registry.example.com"     # the upstream; default https://H

    [host."https://mirror.example.com"]         # tried first, in file order
      capabilities = ["pull", "resolve"]        # default: pull, resolve, push
      ca = "/etc/certs/mirror-ca.pem"           # path or list; relative = to the dir
      client = [["/etc/certs/c.pem", "/etc/certs/c.key"]]   # or "both.pem" or a list
      skip_verify = false
      override_path = false   # true: the URL path is the API root (no /v2 added)
      [host."https://mirror.example.com".header]
        x-custom = "value"    # or a list of values

Top-level ``capabilities``, ``ca``, ``client``, ``skip_verify``, ``header`` and
``override_path`` apply to the server. Without a file the only endpoint is the
default server: ``https://H``, or ``https://registry-1.docker.io`` for docker.io,
or plain ``http://H`` for a loopback host or one the caller lists as insecure.

Mirrors ([host] entries) keep the requested repository path under their API
root; an endpoint URL path without ``/v2`` at its end gets ``/v2`` appended
unless ``override_path`` is set.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from pycri.errors import InvalidArgumentError

CAPABILITIES = frozenset({"pull", "resolve", "push"})
DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "registry-1.docker.io"
# Names Docker tools use for Hub in config.json and elsewhere.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Endpoint:
    """One place to talk the distribution API to, for one requested registry host."""

    scheme: str                      # "http" | "https"
    host: str                        # host[:port] as in a URL
    path: str                        # API root, e.g. "/v2" ("" with override_path and no path)
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()   # (cert, key); key "" = in the cert file
    headers: tuple[tuple[str, str], ...] = ()
    mirror: bool = False             # a [host] entry rather than the registry's server
    registry: str = ""               # the requested registry host this endpoint serves
    source: str = ""                 # the hosts.toml this came from, for messages

    @property
    def base(self) -> str:
        """``scheme://host`` with no path."""
        return f"{self.scheme}://{self.host}"

    @property
    def api(self) -> str:
        """The API root URL: requests go to ``api + "/<repo>/manifests/<ref>"``."""
        return self.base + self.path

    @property
    def hostname(self) -> str:
        return split_host(self.host)[0]

    def __str__(self) -> str:
        return self.api


@dataclass
class _Entry:
    url: str
    cfg: dict[str, Any] = field(default_factory=dict)
    mirror: bool = True


def split_host(host: str) -> tuple[str, int | None]:
    """``"h:5000"`` -> ("h", 5000); ``"[::1]:5000"`` -> ("::1", 5000)."""
    u = urlsplit("//" + host)
    try:
        port = u.port
    except ValueError:
        raise InvalidArgumentError(f"invalid port in host {host!r}") from None
    return (u.hostname or ""), port


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (``host`` may carry a port)."""
    name = split_host(host)[0] if not host.startswith("::") else host
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def canonical_registry(host: str) -> str:
    """Docker Hub's several names fold to ``docker.io``; others are lowercased."""
    h = host.lower()
    return DOCKER_HUB if h in DOCKER_HUB_ALIASES else h


def host_dirs(config_dir: str, host: str) -> list[str]:
    """Candidate directories for ``host`` in the order containerd checks them."""
    dirs = []
    idx = host.rfind(":")
    if idx > 0 and not host.endswith("]"):
        dirs.append(os.path.join(config_dir, host[:idx] + "_" + host[idx + 1 :] + "_"))
    dirs += [os.path.join(config_dir, host), os.path.join(config_dir, "_default")]
    return dirs


def default_server(host: str, insecure: Iterable[str] = ()) -> Endpoint:
    """The endpoint used when no hosts.toml names a server."""
    if canonical_registry(host) == DOCKER_HUB:
        return Endpoint("https", DOCKER_HUB_SERVER, "/v2", registry=DOCKER_HUB)
    _, port = split_host(host)
    plain = (is_loopback(host) and port != 443) or host in set(insecure)
    return Endpoint("http" if plain else "https", host, "/v2", registry=host)


def _strings(v: Any, what: str, src: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise InvalidArgumentError(f"{src}: {what} must be a string or a list of strings")


def _abspath(p: str, base: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _endpoint(url: str, cfg: dict[str, Any], mirror: bool, registry: str, base_dir: str,
              src: str) -> Endpoint:
    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise InvalidArgumentError(f"{src}: host URL {url!r} must be http:// or https://")
        url = "https://" + url
    u = urlsplit(url)
    if not u.netloc or u.query or u.fragment or "@" in u.netloc:
        raise InvalidArgumentError(f"{src}: invalid host URL {url!r}")
    override = bool(cfg.get("override_path", False))
    path = u.path
    if path:
        path = posixpath.normpath(path)
        if path == "/":
            path = "" if override else "/v2"
        elif not path.endswith("/v2") and not override:
            path += "/v2"
    elif not override:
        path = "/v2"
    caps_raw = cfg.get("capabilities")
    if caps_raw is None:
        caps = CAPABILITIES
    else:
        caps = frozenset(c.lower() for c in _strings(caps_raw, "capabilities", src))
        unknown = caps - CAPABILITIES
        if unknown:
            raise InvalidArgumentError(f"{src}: unknown capability {min(unknown)!r}")
    skip = cfg.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise InvalidArgumentError(f"{src}: skip_verify must be true or false")
    ca: tuple[str, ...] = ()
    if "ca" in cfg:
        ca = tuple(_abspath(p, base_dir) for p in _strings(cfg["ca"], "ca", src))
    client: list[tuple[str, str]] = []
    c = cfg.get("client")
    if isinstance(c, str):
        client.append((_abspath(c, base_dir), ""))
    elif isinstance(c, list):
        for item in c:
            if isinstance(item, str):
                client.append((_abspath(item, base_dir), ""))
            elif (isinstance(item, list) and len(item) == 2
                  and all(isinstance(x, str) for x in item)):
                client.append((_abspath(item[0], base_dir), _abspath(item[1], base_dir)))
            else:
                raise InvalidArgumentError(f"{src}: client entries are paths or [cert, key]")
    elif c is not None:
        raise InvalidArgumentError(f"{src}: client must be a path or a list")
    headers: list[tuple[str, str]] = []
    h = cfg.get("header", {})
    if not isinstance(h, dict):
        raise InvalidArgumentError(f"{src}: header must be a table")
    for k, v in h.items():
        for value in _strings(v, f"header {k!r}", src):
            if any(ch in k + value for ch in "\r\n\0"):
                raise InvalidArgumentError(f"{src}: header {k!r} has a control character")
            headers.append((k, value))
    return Endpoint(u.scheme, u.netloc.lower(), path, caps, skip, ca, tuple(client),
                    tuple(headers), mirror, registry, src)


def parse_hosts_toml(text: str | bytes, registry: str, base_dir: str = ".",
                     src: str = "hosts.toml", insecure: Iterable[str] = ()) -> list[Endpoint]:
    """Endpoints of one hosts.toml for ``registry``: mirrors in file order, server last."""
    try:
        doc = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{src}: not valid TOML: {e}") from None
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise InvalidArgumentError(f"{src}: [host] must be a table of tables")
    out: list[Endpoint] = []
    for url, cfg in hosts.items():
        if not isinstance(cfg, dict):
            raise InvalidArgumentError(f"{src}: host.{url!r} must be a table")
        out.append(_endpoint(url, cfg, True, registry, base_dir, src))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise InvalidArgumentError(f"{src}: server must be a string")
    top = {k: v for k, v in doc.items() if k not in ("server", "host")}
    if server:
        out.append(_endpoint(server, top, False, registry, base_dir, src))
    else:
        d = default_server(registry, insecure)
        out.append(_endpoint(d.base + d.path, top, False, registry, base_dir, src))
    # An entry that repeats the server's URL (the usual "server = X" plus
    # "[host.X]" pair), or that is the registry itself, is not a mirror; a URL
    # listed twice is tried once, with its first settings.
    server_api = out[-1].api
    unique: list[Endpoint] = []
    seen: set[str] = set()
    for ep in out:
        if ep.api in seen:
            continue
        seen.add(ep.api)
        if ep.mirror and (ep.api == server_api or ep.host == registry):
            ep = replace(ep, mirror=False)
        unique.append(ep)
    return unique


def resolve(registry: str, config_dir: str | None = None,
            insecure: Iterable[str] = ()) -> list[Endpoint]:
    """The endpoints to try for ``registry``, in order."""
    insecure = tuple(insecure)
    if config_dir:
        for d in host_dirs(config_dir, registry):
            f = os.path.join(d, "hosts.toml")
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    return parse_hosts_toml(fh.read(), canonical_registry(registry), d, f,
                                            insecure)
    return [default_server(registry, insecure)]
