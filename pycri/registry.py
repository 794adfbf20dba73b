"""An OCI distribution (Docker registry v2) client: manifests and blobs, for pulling.

    reg = Registry(config_dir="/etc/containerd/certs.d")
    m = reg.get_manifest(parse("quay.io/org/app:1.0"))
    for chunk in reg.get_blob(ref, digest, size):
        ...

Endpoints come from ``hosts.toml`` (see :mod:`pycri.hosts`): mirrors first, then
the registry's server. A mirror answering 404, 5xx, refusing us, or unreachable
falls through to the next endpoint; the last endpoint's error is raised.

Safety rules (SECURITY.md item 11), each an :class:`InsecureRegistryError`:

- plain http only to loopback hosts, hosts given in ``insecure``, and endpoints
  a hosts.toml names with ``http://``; everything else is https, verified
  against the system CA store (plus a configured ``ca``) unless ``skip_verify``;
- a token realm must be https, or http on loopback / an insecure host; any other
  scheme (``file://``, ``ftp://``) is refused before anything is contacted;
- no redirect from https to http, nor to a scheme other than http(s);
- credentials only go where they were configured: the caller's ``auth`` to
  endpoints on the requested registry's own host (never a mirror, nor a
  hosts.toml ``server`` on another host), config.json entries to the host they
  are keyed by, and ``Authorization`` is dropped when a
  redirect leaves the host (blob storage).  Redirects are followed by hand, at
  most :data:`MAX_REDIRECTS`.

Bearer tokens are cached per (endpoint host, scope, credentials) until shortly
before they expire. Idempotent GETs are retried with backoff on connection
errors, 429 and 5xx; a blob download broken mid-way resumes with ``Range``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import SSLError as Urllib3SSLError

from pycri import hosts as hostsmod
from pycri.config import Auth
from pycri.errors import (
    AuthenticationError,
    DigestMismatchError,
    InsecureRegistryError,
    InvalidArgumentError,
    InvalidImageError,
    NotFoundError,
    RegistryError,
    ResourceExhaustedError,
    UnsupportedError,
)
from pycri.hosts import Endpoint, is_loopback
from pycri.reference import Reference
from pycri.store import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_MEDIA_TYPES: tuple[str, ...] = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
SCHEMA1_MEDIA_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 << 10     # how much of an error response we read
MAX_TOKEN_RESPONSE = 1 << 20
USER_AGENT = "pycri/0.1"

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Fetched:
    """A manifest (or index) as the registry sent it."""

    media_type: str
    data: bytes
    digest: str      # "sha256:<hex>" of data
    endpoint: str    # the API root it came from, e.g. "https://mirror.example/v2"


class _Retryable(Exception):
    """A connection-level failure (refused, reset, timed out) worth another try."""


@dataclass
class _Token:
    value: str
    expires: float   # time.monotonic() deadline


# --- WWW-Authenticate -----------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenges(values: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` header values -> [(scheme lowercased, {param: value})]."""
    out: list[tuple[str, dict[str, str]]] = []
    for value in values:
        s = value.strip()
        while s:
            m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)\s*", s)
            if not m:
                break
            scheme = m.group(1).lower()
            s = s[m.end():]
            params: dict[str, str] = {}
            while True:
                pm = _CHALLENGE_PARAM.match(s)
                # a bare word followed by space (not "=") starts the next challenge
                if not pm or not pm.group(0).strip():
                    break
                v = pm.group(2)
                if v.startswith('"'):
                    v = re.sub(r"\\(.)", r"\1", v[1:-1])
                params[pm.group(1).lower()] = v
                s = s[pm.end():]
            out.append((scheme, params))
            s = s.lstrip(" ,")
    return out


# --- docker config.json ---------------------------------------------------------------


def _config_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/x`` -> ``h:5000``."""
    k = key.strip()
    if "://" in k:
        k = urlsplit(k).netloc
    else:
        k = k.split("/", 1)[0]
    return hostsmod.canonical_registry(k)


def load_docker_config(path: str) -> dict[str, Auth | str]:
    """Host -> Auth from a Docker ``config.json`` (a str value is why that entry is unusable)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 22))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"cannot read Docker credentials {path}: {e}") from None
    auths = doc.get("auths", {}) if isinstance(doc, dict) else {}
    if not isinstance(auths, dict):
        raise InvalidArgumentError(f"{path}: 'auths' must be an object")
    out: dict[str, Auth | str] = {}
    for key, entry in auths.items():
        host = _config_key(str(key))
        if not isinstance(entry, dict):
            out[host] = f"{path}: entry {key!r} is not an object"
            continue
        user, password = entry.get("username", ""), entry.get("password", "")
        if entry.get("auth"):
            try:
                raw = base64.b64decode(entry["auth"], validate=False).decode()
                user, _, password = raw.partition(":")
            except (ValueError, UnicodeDecodeError):
                out[host] = f"{path}: entry {key!r} has an 'auth' that is not base64 user:password"
                continue
        try:
            a = Auth(username=str(user or ""), password=str(password or ""),
                     identity_token=str(entry.get("identitytoken", "") or ""),
                     registry_token=str(entry.get("registrytoken", "") or ""))
        except InvalidArgumentError as e:
            out[host] = f"{path}: entry {key!r}: {e}"
            continue
        if not a.empty:
            out[host] = a
    return out


# --- the client ----------------------------------------------------------------------------


class Registry:
    """Pulls manifests and blobs from OCI registries. Thread-safe; share one per process."""

    def __init__(self, config_dir: str | None = None, docker_config: str | None = None,
                 timeout: float = 30.0, retries: int = 3, insecure: Iterable[str] = ()) -> None:
        self.config_dir = config_dir
        self.docker_config = docker_config
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.insecure = frozenset(h.lower() for h in insecure)
        self._lock = threading.Lock()
        self._pools: dict[tuple[Any, ...], urllib3.PoolManager] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._basic_hosts: set[str] = set()
        self._docker_auths: dict[str, Auth | str] | None = None
        self.backoff = 0.25   # seconds before the first retry; doubles each time

    # -- public ------------------------------------------------------------------------

    def endpoints(self, registry: str) -> list[Endpoint]:
        """Where requests for ``registry`` go, in order (mirrors first)."""
        return hostsmod.resolve(registry, self.config_dir, self.insecure)

    def get_manifest(self, ref: Reference, auth: Auth | None = None,
                     accept: Sequence[str] = MANIFEST_MEDIA_TYPES,
                     max_size: int = 4 << 20) -> Fetched:
        """Fetch the manifest or index ``ref`` names (its digest if any, else its tag).

        The digest is the sha256 of the body; when fetching by digest it must match
        (DigestMismatchError). A body over ``max_size`` bytes raises
        ResourceExhaustedError; a Docker schema 1 manifest raises UnsupportedError.
        """
        _, reference = _check_ref(ref)
        by_digest = ref.digest is not None
        cap = "pull" if by_digest else "resolve"
        headers = {"Accept": ", ".join(accept)}

        what = f"manifest {ref}"
        resp, url, ep = self._open(ref, auth, cap, f"manifests/{reference}", headers, what)
        try:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_size:
                raise ResourceExhaustedError(
                    f"{what} at {url} is {length} bytes, over the {max_size}-byte limit")
            data = _read_capped(resp, max_size, f"{what} at {url}")
        finally:
            _release(resp)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if by_digest and digest != reference:
            raise DigestMismatchError(
                f"{what} from {url} has digest {digest}, not the one asked for",
                expected=reference, actual=digest)
        media_type = _media_type(resp.headers.get("Content-Type", ""), data, str(ref), url)
        return Fetched(media_type, data, digest, ep.api)

    def get_blob(self, ref: Reference, digest: str, size: int | None = None,
                 auth: Auth | None = None, offset: int = 0,
                 chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream blob ``digest`` of ``ref``'s repository, from byte ``offset``.

        A connection broken mid-blob is resumed with ``Range`` up to ``retries``
        times. The digest is not checked here (hash while consuming), but never
        more than ``size`` bytes are yielded when it is given.
        """
        validate_digest(digest)
        _check_ref(ref)
        if offset < 0 or (size is not None and (size < 0 or offset > size)):
            raise InvalidArgumentError(f"blob offset {offset} outside 0..{size}")
        return self._blob_stream(ref, digest, size, auth, offset, max(1, chunk_size))

    def close(self) -> None:
        with self._lock:
            for p in self._pools.values():
                p.clear()
            self._pools.clear()

    def __enter__(self) -> Registry:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints and fallthrough -----------------------------------------------------

    def _open(self, ref: Reference, auth: Auth | None, cap: str, tail: str,
              headers: dict[str, str], what: str, decode: bool = True
              ) -> tuple[urllib3.BaseHTTPResponse, str, Endpoint]:
        """GET ``<api>/<repo>/<tail>`` on the first endpoint that answers 200/206.

        Returns the unread response (the caller releases it), its final URL and
        the endpoint. Endpoints without ``cap`` are skipped; a mirror's 404, 429,
        5xx, refusal or unreachability moves on to the next endpoint.
        """
        eps = [ep for ep in self.endpoints(ref.registry) if cap in ep.capabilities]
        if not eps:
            raise RegistryError(f"no endpoint for {ref.registry} has the {cap!r} capability "
                                f"(check hosts.toml under {self.config_dir})")
        failures: list[str] = []
        for i, ep in enumerate(eps):
            url = f"{ep.api}/{ref.repository}/{tail}"
            try:
                resp, final = self._get(ep, ref, auth, url, headers, decode=decode)
                if resp.status in (200, 206):
                    return resp, final, ep
                try:
                    if resp.status == 404:
                        raise NotFoundError(f"{what} not found at {url}")
                    raise _status_error(resp, final, what)
                finally:
                    _release(resp)
            except (NotFoundError, AuthenticationError, RegistryError) as e:
                if i == len(eps) - 1 or not _falls_through(e):
                    if failures:
                        raise type(e)(f"{e} (also tried: {'; '.join(failures)})",
                                      *_extra_args(e)) from e
                    raise
                failures.append(f"{ep.api}: {e}")
        raise AssertionError("unreachable")

    # -- one GET with auth, redirects and retries ------------------------------------

    def _get(self, ep: Endpoint, ref: Reference, auth: Auth | None, url: str,
             headers: dict[str, str], extra: dict[str, str] | None = None,
             decode: bool = True) -> tuple[urllib3.BaseHTTPResponse, str]:
        """GET ``url`` on ``ep`` with authentication; returns an unread response."""
        creds = self._credentials(ep, ref, auth)
        scope = f"repository:{ref.repository}:pull"
        base = {"User-Agent": USER_AGENT, **_join_headers(ep.headers), **headers, **(extra or {})}
        cred_id = _cred_id(creds)
        tok_key = (ep.host, scope, cred_id)
        authz = self._cached_authorization(tok_key, ep, creds)
        resp, final = self._get_retrying(ep, url, base, authz, decode)
        if resp.status != 401:
            if resp.status == 403 and authz is not None:
                _drain(resp)
                raise AuthenticationError(f"{url}: access denied (HTTP 403) with the credentials "
                                          f"given for {ep.host}", 403)
            return resp, final
        challenges = parse_challenges(resp.headers.get_all("WWW-Authenticate") or [])
        _drain(resp)
        with self._lock:
            self._tokens.pop(tok_key, None)
        bearer = next((p for s, p in challenges if s == "bearer"), None)
        if bearer is not None:
            token = self._fetch_token(ep, bearer, scope, creds, url)
            authz = f"Bearer {token}"
        elif any(s == "basic" for s, _ in challenges):
            if creds is None or not creds.username:
                raise AuthenticationError(f"{url} requires a username and password "
                                          f"(HTTP Basic) and none are configured for {ep.host}", 401)
            with self._lock:
                self._basic_hosts.add(ep.host)
            authz = _basic(creds)
        else:
            raise AuthenticationError(
                f"{url} answered 401 without a usable WWW-Authenticate challenge", 401)
        resp, final = self._get_retrying(ep, url, base, authz, decode)
        if resp.status in (401, 403):
            _drain(resp)
            who = f"as {creds.username!r}" if creds and creds.username else "anonymously"
            raise AuthenticationError(f"{url}: access denied {who} (HTTP {resp.status}); "
                                      "check the credentials and the repository name", resp.status)
        return resp, final

    def _get_retrying(self, ep: Endpoint, url: str, headers: dict[str, str],
                      authz: str | None, decode: bool) -> tuple[urllib3.BaseHTTPResponse, str]:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                resp, final = self._follow(ep, "GET", url, headers, authz, decode=decode)
                if resp.status == 429 or resp.status >= 500:
                    ra = _retry_after(resp.headers.get("Retry-After"))
                    if attempt == self.retries:
                        return resp, final
                    _drain(resp)
                    time.sleep(min(max(delay, ra), 10.0))
                    delay *= 2
                    continue
                return resp, final
            except _Retryable as e:
                if attempt == self.retries:
                    raise RegistryError(f"{e} (after {attempt + 1} attempts)") from None
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _follow(self, ep: Endpoint, method: str, url: str, headers: dict[str, str],
                authz: str | None, body: bytes | None = None,
                decode: bool = True) -> tuple[urllib3.BaseHTTPResponse, str]:
        """Send, following redirects by hand under the safety rules."""
        origin = urlsplit(url)
        self._check_url(url, ep)
        hdrs = dict(headers)
        if authz:
            hdrs["Authorization"] = authz
        for _ in range(MAX_REDIRECTS + 1):
            pool = self._pool_for(url, ep)
            try:
                resp = pool.urlopen(method, url, body=body, headers=hdrs, redirect=False,
                                    retries=False, preload_content=False,
                                    decode_content=decode, timeout=self._timeout())
            except Urllib3SSLError as e:
                raise RegistryError(f"TLS failure talking to {url}: {e.__class__.__name__}: "
                                    f"{_reason(e)} (set 'ca' or 'skip_verify' in hosts.toml "
                                    "if this registry uses a private CA)") from None
            except ReadTimeoutError:
                raise _Retryable(f"no answer from {url} within {self.timeout:g}s") from None
            except (NewConnectionError, ConnectTimeoutError) as e:
                raise _Retryable(f"cannot reach {url}: {_reason(e)}") from None
            except Urllib3Error as e:
                raise _Retryable(f"request to {url} failed: {_reason(e)}") from None
            if resp.status not in _REDIRECTS or not resp.headers.get("Location"):
                return resp, url
            loc = urljoin(url, resp.headers["Location"])
            _drain(resp)
            new = urlsplit(loc)
            if new.scheme not in ("http", "https"):
                raise InsecureRegistryError(f"{url} redirected to {loc!r}: only http(s) "
                                            "redirects are followed")
            if urlsplit(url).scheme == "https" and new.scheme == "http":
                raise InsecureRegistryError(f"{url} redirected from https to plain http "
                                            f"({loc}); refusing the downgrade")
            self._check_url(loc, ep if new.netloc.lower() == origin.netloc.lower() else None)
            if new.netloc.lower() != origin.netloc.lower():
                # Another host (blob storage, a CDN): it gets no credentials and
                # none of the headers configured for the registry.
                hdrs = {k: v for k, v in headers.items()
                        if k.lower() not in {h.lower() for h, _ in ep.headers}}
                hdrs.pop("Authorization", None)
            if resp.status == 303:
                method, body = "GET", None
            url = loc
        raise RegistryError(f"too many redirects (more than {MAX_REDIRECTS}) starting at "
                            f"{origin.geturl()}")

    def _check_url(self, url: str, ep: Endpoint | None) -> None:
        u = urlsplit(url)
        if u.scheme == "https":
            return
        if u.scheme != "http":
            raise InsecureRegistryError(f"refusing {url!r}: only http and https are supported")
        host = u.netloc.lower()
        if ep is not None and ep.scheme == "http" and host == ep.host:
            return  # configured as http (hosts.toml, loopback or insecure default)
        if is_loopback(host) or host in self.insecure or (u.hostname or "") in self.insecure:
            return
        raise InsecureRegistryError(f"refusing plain http to {host} ({url}): only loopback "
                                    "hosts and hosts listed as insecure may use http")

    # -- TLS pools ------------------------------------------------------------------------

    def _timeout(self) -> urllib3.Timeout:
        return urllib3.Timeout(connect=self.timeout, read=self.timeout)

    def _pool_for(self, url: str, ep: Endpoint | None) -> urllib3.PoolManager:
        """The endpoint's TLS settings for its own host; the system defaults elsewhere."""
        u = urlsplit(url)
        key: tuple[Any, ...]
        if u.scheme != "https":
            key = ("plain",)
        elif ep is not None and u.netloc.lower() == ep.host:
            key = (ep.skip_verify, ep.ca, ep.client)
        else:
            key = (False, (), ())
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = (urllib3.PoolManager(num_pools=16, maxsize=4, retries=False)
                        if key == ("plain",) else self._make_pool(*key))
                self._pools[key] = pool
            return pool

    @staticmethod
    def _make_pool(skip_verify: bool, ca: tuple[str, ...],
                   client: tuple[tuple[str, str], ...]) -> urllib3.PoolManager:
        ctx = ssl.create_default_context()
        try:
            for path in ca:
                ctx.load_verify_locations(cafile=path)
            for cert, key in client:
                ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgumentError(f"cannot load TLS files from hosts.toml: {e}") from None
        kw: dict[str, Any] = {}
        if skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            kw = {"cert_reqs": "CERT_NONE", "assert_hostname": False}
        return urllib3.PoolManager(num_pools=16, maxsize=4, ssl_context=ctx, retries=False, **kw)

    # -- credentials and tokens ------------------------------------------------------------

    def _credentials(self, ep: Endpoint, ref: Reference, auth: Auth | None) -> Auth | None:
        """What this endpoint may receive.

        The caller's ``auth`` is for the requested registry: it goes only to an
        endpoint on that very host (for docker.io, registry-1.docker.io), never
        to a mirror or a hosts.toml ``server`` elsewhere. Any endpoint gets the
        config.json entry keyed by its own host.
        """
        own_host = hostsmod.canonical_registry(ep.host) == hostsmod.canonical_registry(
            ref.registry)
        if auth is not None and not auth.empty and own_host:
            return auth
        return self._docker_auth(ep.host)

    def _docker_auth(self, host: str) -> Auth | None:
        if self._docker_auths is None:
            path = self.docker_config
            if path is None:
                d = os.environ.get("DOCKER_CONFIG") or os.path.join(
                    os.path.expanduser("~"), ".docker")
                path = os.path.join(d, "config.json")
            self._docker_auths = load_docker_config(path)
        entry = self._docker_auths.get(hostsmod.canonical_registry(host))
        if isinstance(entry, str):
            raise InvalidArgumentError(entry)
        return entry

    def _cached_authorization(self, key: tuple[str, str, str], ep: Endpoint,
                              creds: Auth | None) -> str | None:
        now = time.monotonic()
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None:
                if tok.expires > now:
                    return f"Bearer {tok.value}"
                del self._tokens[key]
            basic = ep.host in self._basic_hosts
        if basic and creds is not None and creds.username:
            return _basic(creds)
        return None

    def _fetch_token(self, ep: Endpoint, params: dict[str, str], scope: str,
                     creds: Auth | None, for_url: str) -> str:
        realm = params.get("realm", "")
        r = urlsplit(realm)
        if r.scheme not in ("http", "https") or not r.netloc or "@" in r.netloc:
            raise InsecureRegistryError(f"{for_url} names token realm {realm!r}: a realm must "
                                        "be an http(s) URL without user info")
        if r.scheme == "http":
            host = r.netloc.lower()
            if not (is_loopback(host) or host in self.insecure
                    or (r.hostname or "") in self.insecure):
                raise InsecureRegistryError(
                    f"{for_url} names token realm {realm!r} over plain http off loopback; "
                    "credentials and tokens would travel in clear text")
        key = (ep.host, scope, _cred_id(creds))
        if creds is not None and creds.registry_token:
            return creds.registry_token
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.append(("scope", scope))
        realm_ep = ep if r.netloc.lower() == ep.host else None
        base = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if creds is not None and creds.identity_token:
            form = urlencode([("grant_type", "refresh_token"),
                              ("refresh_token", creds.identity_token), ("client_id", "pycri"),
                              *query])
            resp, _ = self._token_request(realm_ep, "POST", realm, {
                **base, "Content-Type": "application/x-www-form-urlencoded"}, None, form.encode())
        else:
            url = realm + ("&" if r.query else "?") + urlencode(query)
            authz = _basic(creds) if creds is not None and creds.username else None
            resp, _ = self._token_request(realm_ep, "GET", url, base, authz, None)
        try:
            if resp.status in (401, 403):
                who = f"for {creds.username!r}" if creds and creds.username else "anonymously"
                raise AuthenticationError(f"token server {realm} refused a token {who} "
                                          f"(HTTP {resp.status}) for {scope}", resp.status)
            if resp.status != 200:
                raise _status_error(resp, realm, "token")
            body = _read_capped(resp, MAX_TOKEN_RESPONSE, f"token response from {realm}")
        finally:
            _release(resp)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = int(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"token server {realm} answered something that is not a "
                                "token response") from None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0 "):
            raise RegistryError(f"token server {realm} returned no usable token")
        # The distribution spec's minimum lifetime is 60 s; renew a little early.
        lifetime = max(expires_in, 60)
        with self._lock:
            self._tokens[key] = _Token(token, time.monotonic() + lifetime - min(10, lifetime / 10))
        return token

    def _token_request(self, ep: Endpoint | None, method: str, url: str,
                       headers: dict[str, str], authz: str | None,
                       body: bytes | None) -> tuple[urllib3.BaseHTTPResponse, str]:
        fake = ep or Endpoint("https", urlsplit(url).netloc.lower(), "")
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                resp, final = self._follow(fake, method, url, headers, authz, body)
            except _Retryable as e:
                if attempt == self.retries:
                    raise RegistryError(str(e)) from None
                time.sleep(delay)
                delay *= 2
                continue
            if (resp.status == 429 or resp.status >= 500) and attempt < self.retries:
                _drain(resp)
                time.sleep(delay)
                delay *= 2
                continue
            return resp, final
        raise AssertionError("unreachable")

    # -- blobs ------------------------------------------------------------------------------

    def _blob_stream(self, ref: Reference, digest: str, size: int | None, auth: Auth | None,
                     offset: int, chunk_size: int) -> Iterator[bytes]:
        what = f"blob {digest} of {ref.name}"
        if size is not None and offset == size:
            return
        pos = offset
        resumes = 0
        chosen: Endpoint | None = None
        while True:
            extra = {"Range": f"bytes={pos}-"} if pos > 0 else {}
            if chosen is None:
                # The first request picks the endpoint (mirrors may fall through);
                # resumes go back to the same one.
                resp, url, chosen = self._open(ref, auth, "pull", f"blobs/{digest}", extra,
                                               what, decode=False)
            else:
                url = f"{chosen.api}/{ref.repository}/blobs/{digest}"
                resp, url = self._get(chosen, ref, auth, url, {}, extra, decode=False)
                if resp.status not in (200, 206):
                    try:
                        raise _status_error(resp, url, what)
                    finally:
                        _release(resp)
            skip = 0
            if resp.status == 206:
                start = _content_range_start(resp.headers.get("Content-Range", ""))
                if start is not None and start != pos:
                    _release(resp)
                    raise RegistryError(f"{url} answered range from byte {start} when asked "
                                        f"for {pos}")
            elif pos > 0:
                skip = pos  # the server ignored Range: discard what we already have
            broken: str | None = None
            try:
                it = resp.stream(chunk_size, decode_content=False)
                while True:
                    try:
                        chunk = next(it)
                    except StopIteration:
                        break
                    except (Urllib3Error, OSError) as e:
                        broken = _reason(e)
                        break
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    if size is not None and pos + len(chunk) > size:
                        raise ResourceExhaustedError(
                            f"{what} from {url} is larger than its declared size {size}")
                    pos += len(chunk)
                    yield chunk
            finally:
                _release(resp)
            if broken is None and size is not None and pos < size:
                broken = f"the connection ended at byte {pos} of {size}"
            if broken is None:
                return
            if resumes >= self.retries:
                raise RegistryError(f"{what} from {url} broke off ({broken}) and "
                                    f"{resumes} resumes did not finish it")
            resumes += 1
            time.sleep(self.backoff * (2 ** (resumes - 1)))


# --- helpers -------------------------------------------------------------------------------


def _check_ref(ref: Reference) -> tuple[str, str]:
    """The repository and the manifest reference, validated for use in a URL path."""
    if not isinstance(ref, Reference):
        raise InvalidArgumentError(f"expected a Reference, got {type(ref).__name__}")
    if not _REPO_RE.match(ref.repository) or len(ref.repository) > 255:
        raise InvalidArgumentError(f"invalid repository name {ref.repository!r}")
    reference = ref.reference
    if ref.digest:
        validate_digest(ref.digest)
    elif not _TAG_RE.match(reference):
        raise InvalidArgumentError(f"invalid tag {reference!r}")
    return ref.repository, reference


def _media_type(content_type: str, data: bytes, what: str, url: str) -> str:
    header = content_type.split(";", 1)[0].strip().lower()
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if header in SCHEMA1_MEDIA_TYPES or (isinstance(doc, dict) and doc.get("schemaVersion") == 1):
        raise UnsupportedError(
            f"{what} at {url} is a Docker schema 1 manifest, a format pycri does not pull "
            "(deprecated since 2017); push the image again with a current tool to get "
            "schema 2 / OCI")
    if not isinstance(doc, dict):
        raise InvalidImageError(f"{what} at {url} is not a JSON object")
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise InvalidImageError(f"{what} at {url} has a non-string mediaType")
    known = {*MANIFEST_MEDIA_TYPES}
    if header in known:
        if body_type and body_type != header:
            raise InvalidImageError(f"{what} at {url} is served as {header} but says it is "
                                    f"{body_type}")
        return header
    if body_type:
        return body_type
    # No usable header and no mediaType field: OCI allows that; go by the shape.
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc or "layers" in doc:
        return OCI_MANIFEST
    raise InvalidImageError(f"{what} at {url} has no media type (Content-Type {header!r})")


def _read_capped(resp: urllib3.BaseHTTPResponse, limit: int, what: str) -> bytes:
    buf = bytearray()
    try:
        while True:
            chunk = resp.read(min(1 << 16, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                raise ResourceExhaustedError(f"{what} is larger than the {limit}-byte limit")
    except (Urllib3Error, OSError) as e:
        raise RegistryError(f"reading {what} failed: {_reason(e)}") from None
    return bytes(buf)


def _drain(resp: urllib3.BaseHTTPResponse) -> None:
    """Read a little of an unwanted response so the connection can be reused, or drop it."""
    with contextlib.suppress(Exception):
        resp.read(MAX_ERROR_BODY)
    _release(resp)


def _release(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to its pool, closing it first if the body was not all read
    (a half-read body must never be mistaken for the next response)."""
    with contextlib.suppress(Exception):
        if not resp.closed:
            resp.close()
    with contextlib.suppress(Exception):
        resp.release_conn()


def _status_error(resp: urllib3.BaseHTTPResponse, url: str, what: str) -> RegistryError:
    try:
        body = resp.read(MAX_ERROR_BODY)
    except Exception:  # noqa: BLE001
        body = b""
    detail = ""
    try:
        errs = json.loads(body).get("errors") or []
        detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errs[:3])
    except (ValueError, AttributeError, TypeError):
        pass
    if resp.status in (401, 403):
        return AuthenticationError(f"{url}: access to {what} denied (HTTP {resp.status})"
                                   + (f": {detail}" if detail else ""), resp.status)
    return RegistryError(f"{url}: HTTP {resp.status} for {what}" +
                         (f": {detail}" if detail else ""), resp.status)


def _falls_through(e: Exception) -> bool:
    """May the next endpoint be tried after ``e``? Not after a safety refusal."""
    if isinstance(e, InsecureRegistryError):
        return False
    if isinstance(e, (NotFoundError, AuthenticationError)):
        return True
    return type(e) is RegistryError and (e.status is None or e.status == 429 or e.status >= 500)


def _extra_args(e: Exception) -> tuple[Any, ...]:
    if isinstance(e, DigestMismatchError):
        return (e.expected, e.actual)
    if isinstance(e, RegistryError):
        return (e.status,)
    return ()


def _join_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """hosts.toml headers may repeat a name; HTTP joins repeated values with commas."""
    out: dict[str, str] = {}
    for k, v in pairs:
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _basic(creds: Auth) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _cred_id(creds: Auth | None) -> str:
    if creds is None:
        return ""
    secret = (f"{creds.username}\0{creds.password}\0{creds.identity_token}\0"
              f"{creds.registry_token}")
    h = hashlib.sha256(secret.encode())
    return h.hexdigest()[:16]


def _retry_after(v: str | None) -> float:
    if v and v.strip().isdigit():
        return min(float(v.strip()), 10.0)
    return 0.0


def _content_range_start(v: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", v)
    return int(m.group(1)) if m else None


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None)
    return str(r or e) or e.__class__.__name__


__all__ = [
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "INDEX_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "SCHEMA1_MEDIA_TYPES",
    "Fetched",
    "Registry",
    "load_docker_config",
    "parse_challenges",
]
