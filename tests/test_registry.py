"""pycri.registry and pycri.hosts against a real docker-registry on loopback.

Where the real registry cannot produce a case (schema 1, lying servers, broken
connections, hostile redirects and realms) a small local HTTP server or proxy
does. An audit hook makes any attempt to resolve or connect to a non-loopback
address fail the test: nothing here may leave the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import imagebuild as ib
import pytest
import urllib3
from conftest import LocalRegistry
from tokenserver import TokenServer, self_signed, write_pem

from pycri import hosts
from pycri.config import Auth
from pycri.errors import (
    AuthenticationError,
    DigestMismatchError,
    InsecureRegistryError,
    InvalidArgumentError,
    NotFoundError,
    RegistryError,
    ResourceExhaustedError,
    UnsupportedError,
)
from pycri.reference import parse
from pycri.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    load_docker_config,
    parse_challenges,
)

# --- no traffic off loopback ----------------------------------------------------------

_guard = threading.local()
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "localhost.localdomain"}


def _is_loopback_addr(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return True  # unix sockets and the like
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not getattr(_guard, "on", False):
        return
    if event == "socket.getaddrinfo" and not _is_loopback_addr(args[0]):
        raise RuntimeError(f"test tried to resolve a non-loopback name: {args[0]!r}")
    if event == "socket.connect":
        addr = args[1]
        if isinstance(addr, tuple) and not _is_loopback_addr(addr[0]):
            raise RuntimeError(f"test tried to connect off loopback: {addr!r}")


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    _guard.on = True
    yield
    _guard.on = False


# --- small local servers -----------------------------------------------------------------


class Server:
    """A threaded HTTP(S) server on 127.0.0.1 whose answers a test function writes.

    ``handle(h)`` gets the BaseHTTPRequestHandler; ``requests`` records
    (method, path, headers) of everything seen.
    """

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _any(self) -> None:
                outer.requests.append((self.command, self.path, dict(self.headers.items())))
                handle(self)

            do_GET = do_HEAD = do_POST = do_PUT = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


_http = urllib3.PoolManager(retries=False)


def proxy_to(upstream: str, strip_range: bool = False, cut_blob_once: bool = False,
             prefix_map: tuple[str, str] | None = None) -> Callable[[BaseHTTPRequestHandler], None]:
    """A handler forwarding to ``upstream``; optionally cutting one blob download halfway."""
    state = {"cut": cut_blob_once}

    def handle(h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if prefix_map and path.startswith(prefix_map[0]):
            path = prefix_map[1] + path[len(prefix_map[0]):]
        fwd = {k: v for k, v in h.headers.items()
               if k.lower() not in ("host", "connection", "content-length")
               and not (strip_range and k.lower() == "range")}
        r = _http.request(h.command, upstream + path, headers=fwd, redirect=False,
                          decode_content=False)
        body = r.data
        headers = {k: v for k, v in r.headers.items()
                   if k.lower() not in ("content-length", "connection", "transfer-encoding")}
        if state["cut"] and "/blobs/sha256:" in path and r.status == 200 and len(body) > 100:
            state["cut"] = False
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        reply(h, r.status, body, headers)

    return handle


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(handle: Callable[[BaseHTTPRequestHandler], None],
             tls: ssl.SSLContext | None = None) -> Server:
        s = Server(handle, tls)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def fast(**kw: Any) -> Registry:
    """A Registry with quick retries, so failure paths do not slow the suite."""
    kw.setdefault("timeout", 10)
    r = Registry(**kw)
    r.backoff = 0.01
    return r


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hosts_toml(config_dir: str, registry: str, text: str) -> None:
    d = os.path.join(config_dir, registry)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write(text)


# --- images pushed once per module ------------------------------------------------------

BIG = os.urandom(300_000)  # incompressible, so the gzip blob is large enough to cut


@pytest.fixture(scope="module")
def images(registry) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    layer = ib.layer_tar([ib.Dir("data"), ib.File("data/big", BIG), ib.File("hello", b"hi\n")])
    oci = ib.build_image([layer], config={"Cmd": ["sh"]})
    docker = ib.build_image([layer], docker=True)
    arm = ib.build_image([ib.layer_tar([ib.File("arm", b"arm")])], "zstd",
                         architecture="arm64", variant="v8")
    index = ib.build_index([(oci, {"os": "linux", "architecture": "amd64"}),
                            (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    dlist = ib.build_index([(docker, {"os": "linux", "architecture": "amd64"})], docker=True)
    ib.push(registry.host, "pycri/oci", "v1", oci)
    ib.push(registry.host, "pycri/docker", "v1", docker)
    ib.push(registry.host, "pycri/multi", "v1", index)
    ib.push(registry.host, "pycri/dlist", "v1", dlist)
    ib.push(registry.host, "library/busybox", "latest", oci)
    return {"oci": oci, "docker": docker, "index": index, "dlist": dlist, "arm": arm}


# --- plain loopback registry --------------------------------------------------------------


def test_manifest_by_tag_oci(registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    m = fast().get_manifest(parse(f"{registry.host}/pycri/oci:v1"))
    assert m.media_type == OCI_MANIFEST
    assert m.data == img.manifest
    assert m.digest == img.manifest_digest == sha(m.data)
    assert m.endpoint == f"http://{registry.host}/v2"


def test_manifest_by_digest_and_tag_at_digest(registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    r = fast()
    m = r.get_manifest(parse(f"{registry.host}/pycri/oci@{img.manifest_digest}"))
    assert m.data == img.manifest
    # tag@digest: the digest wins, so a moved tag cannot change what is fetched
    ref = parse(f"{registry.host}/pycri/oci:no-such-tag@{img.manifest_digest}")
    assert r.get_manifest(ref).digest == img.manifest_digest


def test_docker_media_types_and_lists(registry, images) -> None:  # type: ignore[no-untyped-def]
    r = fast()
    m = r.get_manifest(parse(f"{registry.host}/pycri/docker:v1"))
    assert m.media_type == DOCKER_MANIFEST and m.data == images["docker"].manifest
    m = r.get_manifest(parse(f"{registry.host}/pycri/dlist:v1"))
    assert m.media_type == DOCKER_LIST
    m = r.get_manifest(parse(f"{registry.host}/pycri/multi:v1"))
    assert m.media_type == OCI_INDEX and m.data == images["index"].manifest
    child = json.loads(m.data)["manifests"][1]
    cm = r.get_manifest(parse(f"{registry.host}/pycri/multi@{child['digest']}"))
    assert cm.data == images["arm"].manifest


def test_get_blob_whole_and_from_offset(registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    d = img.layer_digests[0]
    blob = img.blobs[d]
    ref = parse(f"{registry.host}/pycri/oci:v1")
    r = fast()
    got = b"".join(r.get_blob(ref, d, len(blob), chunk_size=65536))
    assert got == blob
    assert b"".join(r.get_blob(ref, d, len(blob), offset=1000)) == blob[1000:]
    assert b"".join(r.get_blob(ref, d, len(blob), offset=len(blob))) == b""
    assert b"".join(r.get_blob(ref, img.config_digest)) == img.config


def test_abandoned_blob_does_not_poison_the_connection(registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    d = img.layer_digests[0]
    ref = parse(f"{registry.host}/pycri/oci:v1")
    r = fast()
    for _ in range(3):
        it = r.get_blob(ref, d, chunk_size=1024)
        assert next(it) == img.blobs[d][:1024]
        it.close()   # stop half-way: the rest of the body is still on the socket
        assert r.get_manifest(ref).data == img.manifest


def test_get_blob_never_yields_more_than_size(registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    d = img.layer_digests[0]
    ref = parse(f"{registry.host}/pycri/oci:v1")
    seen = 0
    with pytest.raises(ResourceExhaustedError):
        for chunk in fast().get_blob(ref, d, size=5000, chunk_size=4096):
            seen += len(chunk)
    assert seen <= 5000


def test_not_found(registry, images) -> None:  # type: ignore[no-untyped-def]
    r = fast()
    with pytest.raises(NotFoundError) as e:
        r.get_manifest(parse(f"{registry.host}/pycri/oci:missing"))
    assert "pycri/oci:missing" in str(e.value)
    with pytest.raises(NotFoundError):
        r.get_manifest(parse(f"{registry.host}/pycri/nothing-here:v1"))
    with pytest.raises(NotFoundError):
        list(r.get_blob(parse(f"{registry.host}/pycri/oci:v1"), sha(b"absent")))


def test_max_size(registry, images) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ResourceExhaustedError):
        fast().get_manifest(parse(f"{registry.host}/pycri/oci:v1"), max_size=100)


def test_max_size_without_content_length(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A chunked body of unknown length is still cut at the cap."""
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", OCI_MANIFEST)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        piece = b" " * 65536
        try:
            for _ in range(200):  # 13 MB if nobody stops reading
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        h.close_connection = True

    s = server_factory(handle)
    with pytest.raises(ResourceExhaustedError):
        fast().get_manifest(parse(f"{s.host}/x/y:z"), max_size=1 << 20)


def test_digest_mismatch(server_factory) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {},
                       "layers": []}).encode()
    s = server_factory(lambda h: reply(h, 200, body, {"Content-Type": OCI_MANIFEST}))
    wanted = sha(b"something else")
    with pytest.raises(DigestMismatchError) as e:
        fast().get_manifest(parse(f"{s.host}/x/y@{wanted}"))
    assert e.value.expected == wanted and e.value.actual == sha(body)


@pytest.mark.parametrize("content_type", [
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/json",
])
def test_schema1_refused(server_factory, content_type) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"schemaVersion": 1, "name": "x/y", "tag": "z", "fsLayers": []}).encode()
    s = server_factory(lambda h: reply(h, 200, body, {"Content-Type": content_type}))
    with pytest.raises(UnsupportedError, match="schema 1"):
        fast().get_manifest(parse(f"{s.host}/x/y:z"))


def test_media_type_fallback_to_body(server_factory) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}).encode()
    s = server_factory(lambda h: reply(h, 200, body, {"Content-Type": "text/plain"}))
    assert fast().get_manifest(parse(f"{s.host}/x/y:z")).media_type == DOCKER_MANIFEST


def test_retries_5xx_then_succeeds(server_factory, registry, images) -> None:  # type: ignore[no-untyped-def]
    fails = {"n": 2}
    forward = proxy_to(registry.url)

    def handle(h: BaseHTTPRequestHandler) -> None:
        if fails["n"] > 0:
            fails["n"] -= 1
            return reply(h, 503, b"busy")
        forward(h)

    s = server_factory(handle)
    m = fast(retries=3).get_manifest(parse(f"{s.host}/pycri/oci:v1"))
    assert m.digest == images["oci"].manifest_digest
    assert len(s.requests) == 3


def test_persistent_5xx_names_the_url(server_factory) -> None:  # type: ignore[no-untyped-def]
    s = server_factory(lambda h: reply(h, 500, b'{"errors":[{"code":"UNKNOWN","message":"x"}]}'))
    with pytest.raises(RegistryError) as e:
        fast(retries=1).get_manifest(parse(f"{s.host}/x/y:z"))
    assert e.value.status == 500 and f"{s.url}/v2/x/y/manifests/z" in str(e.value)
    assert len(s.requests) == 2


def test_connection_refused_is_a_registry_error() -> None:
    from conftest import free_port

    with pytest.raises(RegistryError, match="cannot reach"):
        fast(retries=1).get_manifest(parse(f"127.0.0.1:{free_port()}/x/y:z"))


def test_invalid_inputs() -> None:
    r = fast()
    with pytest.raises(InvalidArgumentError):
        list(r.get_blob(parse("127.0.0.1:1/x/y:z"), "sha256:../../etc/passwd"))
    from pycri.reference import Reference

    with pytest.raises(InvalidArgumentError):
        r.get_manifest(Reference("127.0.0.1:1", "../x", "t"))


# --- broken connections ----------------------------------------------------------------------


@pytest.mark.parametrize("strip_range", [False, True], ids=["206", "server-ignores-range"])
def test_blob_download_resumes(server_factory, registry, images, strip_range) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    d = img.layer_digests[0]
    blob = img.blobs[d]
    s = server_factory(proxy_to(registry.url, strip_range=strip_range, cut_blob_once=True))
    got = b"".join(fast().get_blob(parse(f"{s.host}/pycri/oci:v1"), d, len(blob),
                                   chunk_size=8192))
    assert got == blob
    blob_reqs = [hd for _, p, hd in s.requests if "/blobs/" in p]
    assert len(blob_reqs) == 2
    assert "Range" not in blob_reqs[0]
    assert blob_reqs[1]["Range"].startswith("bytes=") and blob_reqs[1]["Range"] != "bytes=0-"


def test_blob_gives_up_after_retries(server_factory, registry, images) -> None:  # type: ignore[no-untyped-def]
    img = images["oci"]
    d = img.layer_digests[0]
    blob = img.blobs[d]

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(blob)))
        h.end_headers()
        h.wfile.write(blob[:1000])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    s = server_factory(handle)
    with pytest.raises(RegistryError, match="broke off"):
        b"".join(fast(retries=2).get_blob(parse(f"{s.host}/pycri/oci:v1"), d, len(blob)))
    assert len(s.requests) == 3


# --- token auth against docker-registry ----------------------------------------------------------


@pytest.fixture(scope="module")
def token_registry() -> Iterator[tuple[LocalRegistry, TokenServer, Any]]:
    d = tempfile.mkdtemp(prefix="pycri-tokenreg-")
    ts = TokenServer(users={"alice": "wonderland"}, refresh_tokens={"refresh-1": "alice"},
                     workdir=d)
    reg = LocalRegistry(os.path.join(d, "reg"), ts.registry_config())
    img = ib.build_image([ib.layer_tar([ib.File("secret", b"s" * 5000)])])
    admin = ts.sign("admin", [{"type": "repository", "name": "private/app",
                               "actions": ["pull", "push"]}])
    ib.push(reg.host, "private/app", "v1", img, headers={"Authorization": f"Bearer {admin}"})
    yield reg, ts, img
    reg.stop()
    ts.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_token_anonymous_denied(token_registry) -> None:  # type: ignore[no-untyped-def]
    reg, _ts, _ = token_registry
    with pytest.raises(AuthenticationError):
        fast().get_manifest(parse(f"{reg.host}/private/app:v1"))


def test_token_good_credentials_and_cache(token_registry) -> None:  # type: ignore[no-untyped-def]
    reg, ts, img = token_registry
    r = fast()
    auth = Auth("alice", "wonderland")
    ref = parse(f"{reg.host}/private/app:v1")
    before = ts.count()
    m = r.get_manifest(ref, auth)
    assert m.data == img.manifest
    d = img.layer_digests[0]
    assert b"".join(r.get_blob(ref, d, len(img.blobs[d]), auth)) == img.blobs[d]
    r.get_manifest(ref.with_digest(m.digest), auth)
    assert ts.count() - before == 1   # one token, reused for the scope
    method, _, q, user = ts.requests[-1]
    assert (method, user) == ("GET", "alice")
    assert q["scope"] == ["repository:private/app:pull"]
    assert q["service"] == ["pycri-test-registry"]


def test_token_expiry_fetches_a_new_one(token_registry, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import time as real_time
    import types

    import pycri.registry

    reg, ts, _img = token_registry
    now = [1000.0]
    clock = types.SimpleNamespace(monotonic=lambda: now[0], sleep=real_time.sleep,
                                  time=real_time.time)
    monkeypatch.setattr(pycri.registry, "time", clock)
    r = fast()
    ref = parse(f"{reg.host}/private/app:v1")
    auth = Auth("alice", "wonderland")
    before = ts.count()
    r.get_manifest(ref, auth)
    now[0] += 100          # within the 300 s lifetime
    r.get_manifest(ref, auth)
    assert ts.count() - before == 1
    now[0] += 300          # past it
    r.get_manifest(ref, auth)
    assert ts.count() - before == 2
    # Different credentials never reuse another's token.
    with pytest.raises(AuthenticationError):
        r.get_manifest(ref, Auth("alice", "not-her-password"))


def test_token_bad_credentials(token_registry) -> None:  # type: ignore[no-untyped-def]
    reg, _ts, _ = token_registry
    with pytest.raises(AuthenticationError, match="token server"):
        fast().get_manifest(parse(f"{reg.host}/private/app:v1"), Auth("alice", "wrong"))


def test_token_identity_token_uses_oauth_post(token_registry) -> None:  # type: ignore[no-untyped-def]
    reg, ts, img = token_registry
    m = fast().get_manifest(parse(f"{reg.host}/private/app:v1"),
                            Auth(identity_token="refresh-1"))
    assert m.data == img.manifest
    method, _, form, user = ts.requests[-1]
    assert (method, user) == ("POST", "alice")
    assert form["grant_type"] == ["refresh_token"]


def test_registry_token_is_sent_as_is(token_registry) -> None:  # type: ignore[no-untyped-def]
    reg, ts, img = token_registry
    tok = ts.sign("bob", [{"type": "repository", "name": "private/app", "actions": ["pull"]}])
    before = ts.count()
    m = fast().get_manifest(parse(f"{reg.host}/private/app:v1"), Auth(registry_token=tok))
    assert m.data == img.manifest and ts.count() == before


def test_docker_config_json(token_registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reg, ts, img = token_registry
    cfg = tmp_path / "config.json"
    cred = base64.b64encode(b"alice:wonderland").decode()
    cfg.write_text(json.dumps({"auths": {f"http://{reg.host}": {"auth": cred}}}))
    m = fast(docker_config=str(cfg)).get_manifest(parse(f"{reg.host}/private/app:v1"))
    assert m.data == img.manifest
    assert ts.requests[-1][3] == "alice"


def test_load_docker_config_forms(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"u:p:with:colons").decode()},
        "quay.io": {"username": "q", "password": "w"},
        "ghcr.io": {"identitytoken": "it"},
        "example.com:5000/path": {"registrytoken": "rt"},
        "broken.io": {"auth": "!!!notbase64"},
    }}))
    a = load_docker_config(str(cfg))
    assert a["docker.io"] == Auth("u", "p:with:colons")
    assert a["quay.io"] == Auth("q", "w")
    assert a["ghcr.io"] == Auth(identity_token="it")
    assert a["example.com:5000"] == Auth(registry_token="rt")
    assert isinstance(a["broken.io"], str)
    assert load_docker_config(str(tmp_path / "absent.json")) == {}


# --- basic auth -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry() -> Iterator[tuple[LocalRegistry, Any]]:
    bcrypt = pytest.importorskip("bcrypt")
    d = tempfile.mkdtemp(prefix="pycri-basicreg-")
    with open(os.path.join(d, "htpasswd"), "w") as f:
        f.write("bob:" + bcrypt.hashpw(b"builder", bcrypt.gensalt(rounds=4)).decode() + "\n")
    reg = LocalRegistry(os.path.join(d, "reg"),
                        f"auth:\n  htpasswd:\n    realm: pycri\n    path: {d}/htpasswd\n")
    img = ib.build_image([ib.layer_tar([ib.File("b", b"basic")])])
    ib.push(reg.host, "team/app", "v1", img,
            headers={"Authorization": "Basic " + base64.b64encode(b"bob:builder").decode()})
    yield reg, img
    reg.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_basic_auth(basic_registry) -> None:  # type: ignore[no-untyped-def]
    reg, img = basic_registry
    ref = parse(f"{reg.host}/team/app:v1")
    with pytest.raises(AuthenticationError, match="username and password"):
        fast().get_manifest(ref)
    with pytest.raises(AuthenticationError):
        fast().get_manifest(ref, Auth("bob", "wrong"))
    r = fast()
    assert r.get_manifest(ref, Auth("bob", "builder")).data == img.manifest
    d = img.layer_digests[0]
    assert b"".join(r.get_blob(ref, d, auth=Auth("bob", "builder"))) == img.blobs[d]


# --- hosts.toml ------------------------------------------------------------------------------


def test_mirror_serves_a_fake_upstream_without_its_credentials(  # type: ignore[no-untyped-def]
        server_factory, registry, images, tmp_path) -> None:
    mirror = server_factory(proxy_to(registry.url))
    hosts_toml(str(tmp_path), "registry.example.test", f'''
server = "https://registry.example.test"

[host."http://{mirror.host}"]
  capabilities = ["pull", "resolve"]
''')
    cfg = tmp_path / "docker.json"
    cfg.write_text(json.dumps({"auths": {"registry.example.test": {
        "auth": base64.b64encode(b"cfg-user:cfg-pass").decode()}}}))
    r = fast(config_dir=str(tmp_path), docker_config=str(cfg))
    ref = parse("registry.example.test/pycri/oci:v1")
    m = r.get_manifest(ref, Auth("upstream-user", "upstream-pass"))
    assert m.digest == images["oci"].manifest_digest
    assert m.endpoint == f"http://{mirror.host}/v2"
    d = images["oci"].layer_digests[0]
    assert b"".join(r.get_blob(ref, d, auth=Auth("upstream-user", "pw"))) == images["oci"].blobs[d]
    assert mirror.requests
    assert all("Authorization" not in hd for _, _, hd in mirror.requests)


def test_mirror_404_falls_through_to_server(server_factory, registry, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = server_factory(lambda h: reply(h, 404, b'{"errors":[]}'))
    from conftest import free_port

    hosts_toml(str(tmp_path), "registry.example.test", f'''
server = "http://{registry.host}"

[host."http://127.0.0.1:{free_port()}"]
  capabilities = ["pull", "resolve"]
[host."http://{empty.host}"]
  capabilities = ["pull", "resolve"]
''')
    r = fast(config_dir=str(tmp_path), retries=0)
    ref = parse("registry.example.test/pycri/oci:v1")
    m = r.get_manifest(ref)
    assert m.endpoint == f"http://{registry.host}/v2"
    assert empty.paths() == ["/v2/pycri/oci/manifests/v1"]
    d = images["oci"].layer_digests[0]
    assert b"".join(r.get_blob(ref, d)) == images["oci"].blobs[d]


def test_not_found_everywhere_says_what_was_tried(server_factory, registry, tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = server_factory(lambda h: reply(h, 404))
    hosts_toml(str(tmp_path), "registry.example.test", f'''
server = "http://{registry.host}"
[host."http://{empty.host}"]
''')
    with pytest.raises(NotFoundError) as e:
        fast(config_dir=str(tmp_path)).get_manifest(parse("registry.example.test/no/such:v1"))
    assert empty.host in str(e.value) and registry.host in str(e.value)


def test_override_path_and_headers(server_factory, registry, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mirror = server_factory(proxy_to(registry.url, prefix_map=("/custom/api/", "/v2/")))
    hosts_toml(str(tmp_path), "registry.example.test", f'''
server = "https://registry.example.test"
[host."http://{mirror.host}/custom/api"]
  override_path = true
  [host."http://{mirror.host}/custom/api".header]
    x-mirror-token = ["abc", "def"]
''')
    m = fast(config_dir=str(tmp_path)).get_manifest(parse("registry.example.test/pycri/oci:v1"))
    assert m.digest == images["oci"].manifest_digest
    assert mirror.paths()[0] == "/custom/api/pycri/oci/manifests/v1"
    assert "abc" in mirror.requests[0][2]["x-mirror-token"]


def test_host_dir_with_port_and_default(registry, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host, port = "registry.example.test", 5000
    os.makedirs(tmp_path / f"{host}_{port}_")
    (tmp_path / f"{host}_{port}_" / "hosts.toml").write_text(f'server = "http://{registry.host}"\n')
    r = fast(config_dir=str(tmp_path))
    assert r.get_manifest(parse(f"{host}:{port}/pycri/oci:v1")).endpoint == registry.url + "/v2"
    hosts_toml(str(tmp_path), "_default", f'server = "http://{registry.host}"\n')
    m = r.get_manifest(parse("other.example.test/pycri/oci:v1"))
    assert m.digest == images["oci"].manifest_digest


HARNESS = "/work/shared/peers/containerd/certs.d"


@pytest.mark.skipif(not os.path.isdir(HARNESS), reason="conformance hosts.toml files not present")
def test_conformance_harness_hosts_files(registry, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in os.listdir(HARNESS):
        eps = hosts.resolve(name, HARNESS)
        assert [ep.api for ep in eps] == ["http://127.0.0.1:5000/v2"]
        assert not eps[0].mirror and eps[0].capabilities == {"pull", "resolve"}
    # The same files, pointed at this test's registry, pull docker.io/library/busybox.
    shutil.copytree(HARNESS, tmp_path / "certs.d")
    for name in os.listdir(tmp_path / "certs.d"):
        p = tmp_path / "certs.d" / name / "hosts.toml"
        p.write_text(p.read_text().replace("127.0.0.1:5000", registry.host))
    r = fast(config_dir=str(tmp_path / "certs.d"))
    m = r.get_manifest(parse("busybox"))
    assert m.digest == images["oci"].manifest_digest


def test_hosts_toml_parsing() -> None:
    eps = hosts.parse_hosts_toml('''
server = "https://upstream.example"
ca = "up-ca.pem"
[host."https://m1.example/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  client = [["c.pem", "c.key"], "both.pem"]
[host."m2.example:5000"]
''', "upstream.example", "/etc/certs.d/upstream.example")
    assert [ep.api for ep in eps] == ["https://m1.example/prefix/v2",
                                      "https://m2.example:5000/v2",
                                      "https://upstream.example/v2"]
    assert eps[0].capabilities == {"pull"} and eps[0].skip_verify and eps[0].mirror
    assert eps[0].client == (("/etc/certs.d/upstream.example/c.pem",
                              "/etc/certs.d/upstream.example/c.key"),
                             ("/etc/certs.d/upstream.example/both.pem", ""))
    assert eps[2].ca == ("/etc/certs.d/upstream.example/up-ca.pem",) and not eps[2].mirror
    assert hosts.resolve("docker.io")[0].api == "https://registry-1.docker.io/v2"
    assert hosts.resolve("localhost:5000")[0].scheme == "http"
    assert hosts.resolve("example.com:5000")[0].scheme == "https"
    assert hosts.resolve("example.com:5000", insecure=["example.com:5000"])[0].scheme == "http"
    for bad in ('capabilities = ["fly"]', '[host."ftp://x"]', "server = 1", "= broken"):
        with pytest.raises(InvalidArgumentError):
            hosts.parse_hosts_toml(bad, "x.example")


def test_parse_challenges() -> None:
    c = parse_challenges([('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a/b:pull,push"'),
                          'Basic realm="x"'])
    assert c[0] == ("bearer", {"realm": "https://auth.example/token", "service": "reg",
                               "scope": "repository:a/b:pull,push"})
    assert c[1] == ("basic", {"realm": "x"})
    assert parse_challenges(['Basic realm="a", Bearer realm="b"']) == [
        ("basic", {"realm": "a"}), ("bearer", {"realm": "b"})]


# --- security (SECURITY.md item 11) -----------------------------------------------------------


def _challenge(realm: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def handle(h: BaseHTTPRequestHandler) -> None:
        reply(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="s"'})
    return handle


@pytest.mark.parametrize("realm", ["http://192.0.2.1/token", "http://auth.example.test/token"])
def test_plain_http_realm_off_loopback_refused(server_factory, realm) -> None:  # type: ignore[no-untyped-def]
    # The audit hook would turn any attempt to reach the realm into a RuntimeError,
    # so this passing shows the refusal comes before a connection or a DNS lookup.
    s = server_factory(_challenge(realm))
    with pytest.raises(InsecureRegistryError, match="plain http"):
        fast().get_manifest(parse(f"{s.host}/x/y:z"), Auth("u", "p"))
    assert len(s.requests) == 1


@pytest.mark.parametrize("realm", ["file:///etc/passwd", "ftp://127.0.0.1/token",
                                   "gopher://127.0.0.1/", "/relative/token", "",
                                   "https://user:pw@127.0.0.1/token"])
def test_realm_with_other_scheme_refused(server_factory, realm) -> None:  # type: ignore[no-untyped-def]
    s = server_factory(_challenge(realm))
    with pytest.raises(InsecureRegistryError, match="realm"):
        fast().get_manifest(parse(f"{s.host}/x/y:z"))


def test_realm_on_another_loopback_host_is_allowed(server_factory, token_registry) -> None:  # type: ignore[no-untyped-def]
    """Like Docker Hub (registry-1.docker.io -> auth.docker.io): the realm may be elsewhere."""
    reg, _ts, img = token_registry
    # Front the registry under "localhost:<port>" so the realm (127.0.0.1) is another host.
    front = server_factory(proxy_to(reg.url))
    m = fast().get_manifest(parse(f"localhost:{front.port}/private/app:v1"),
                            Auth("alice", "wonderland"))
    assert m.data == img.manifest


@pytest.fixture(scope="module")
def tls_files() -> Iterator[tuple[str, str, str]]:
    d = tempfile.mkdtemp(prefix="pycri-tls-")
    key, cert = self_signed("127.0.0.1", san=["127.0.0.1", "localhost"])
    cp, kp = write_pem(d, key, cert, "server")
    yield d, cp, kp
    shutil.rmtree(d, ignore_errors=True)


def _tls(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_with_configured_ca(server_factory, registry, images, tls_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, cert, key = tls_files
    s = server_factory(proxy_to(registry.url), tls=_tls(cert, key))
    ref = parse(f"{s.host}/pycri/oci:v1")
    # 127.0.0.1 would default to http; hosts.toml says https, first without the CA.
    hosts_toml(str(tmp_path / "noca"), s.host, f'server = "https://{s.host}"\n')
    with pytest.raises(RegistryError, match="TLS"):
        fast(config_dir=str(tmp_path / "noca")).get_manifest(ref)
    hosts_toml(str(tmp_path / "ca"), s.host, f'server = "https://{s.host}"\nca = "{cert}"\n')
    m = fast(config_dir=str(tmp_path / "ca")).get_manifest(ref)
    assert m.digest == images["oci"].manifest_digest and m.endpoint.startswith("https://")
    hosts_toml(str(tmp_path / "skip"), s.host, f'server = "https://{s.host}"\nskip_verify = true\n')
    assert fast(config_dir=str(tmp_path / "skip")).get_manifest(ref).digest == m.digest


def test_https_to_http_redirect_refused(server_factory, registry, images, tls_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, cert, key = tls_files
    target = server_factory(proxy_to(registry.url))

    def handle(h: BaseHTTPRequestHandler) -> None:
        reply(h, 307, b"", {"Location": f"http://{target.host}{h.path}"})

    s = server_factory(handle, tls=_tls(cert, key))
    hosts_toml(str(tmp_path), s.host, f'server = "https://{s.host}"\nca = "{cert}"\n')
    with pytest.raises(InsecureRegistryError, match="https to plain http"):
        fast(config_dir=str(tmp_path)).get_manifest(parse(f"{s.host}/pycri/oci:v1"))
    assert target.requests == []


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http://192.0.2.1/v2/x",
                                      "http://storage.example.test/blob"])
def test_hostile_redirects_refused(server_factory, location) -> None:  # type: ignore[no-untyped-def]
    s = server_factory(lambda h: reply(h, 302, b"", {"Location": location}))
    with pytest.raises(InsecureRegistryError):
        fast().get_manifest(parse(f"{s.host}/x/y:z"))


def test_redirect_loop_is_bounded(server_factory) -> None:  # type: ignore[no-untyped-def]
    s = server_factory(lambda h: reply(h, 302, b"", {"Location": h.path + "x"}))
    with pytest.raises(RegistryError, match="too many redirects"):
        fast(retries=0).get_manifest(parse(f"{s.host}/x/y:z"))
    assert len(s.requests) == 6


def test_blob_redirect_to_other_host_drops_credentials(server_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A registry handing blobs to storage elsewhere: storage gets no Authorization."""
    blob = os.urandom(10_000)
    d = sha(blob)
    storage = server_factory(lambda h: reply(h, 200, blob))
    good = "Basic " + base64.b64encode(b"bob:builder").decode()

    def front(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != good:
            return reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="front"'})
        reply(h, 307, b"", {"Location": f"http://localhost:{storage.port}/b/{d}?sig=1"})

    f = server_factory(front)
    hosts_toml(str(tmp_path), f.host, f'''server = "http://{f.host}"
[header]
  x-registry-only = "1"
''')
    r = fast(config_dir=str(tmp_path))
    got = b"".join(r.get_blob(parse(f"{f.host}/team/app:v1"), d, auth=Auth("bob", "builder")))
    assert got == blob
    assert f.requests[-1][2].get("Authorization") == good
    assert f.requests[-1][2].get("x-registry-only") == "1"
    assert len(storage.requests) == 1
    sent = {k.lower() for k in storage.requests[0][2]}
    assert "authorization" not in sent and "x-registry-only" not in sent


def test_plain_http_only_on_loopback_or_insecure(server_factory) -> None:  # type: ignore[no-untyped-def]
    r = fast()
    # A non-loopback host defaults to https: the http URL check refuses any plain
    # http to it, before resolving the name.
    with pytest.raises(InsecureRegistryError):
        r._check_url("http://registry.example.test/v2/", None)
    r._check_url("http://127.0.0.1:1/v2/", None)
    r._check_url("http://[::1]:1/v2/", None)
    r._check_url("http://localhost:1/v2/", None)
    fast(insecure=["registry.example.test"])._check_url("http://registry.example.test/v2/", None)
    assert hosts.resolve("registry.example.test")[0].scheme == "https"


def test_client_certificate_from_hosts_toml(server_factory, registry, images, tls_files,  # type: ignore[no-untyped-def]
                                            tmp_path) -> None:
    _, cert, key = tls_files
    ckey, ccert = self_signed("pycri client")
    client_pem, client_key = write_pem(str(tmp_path), ckey, ccert, "client")
    ctx = _tls(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_pem)
    s = server_factory(proxy_to(registry.url), tls=ctx)
    ref = parse(f"{s.host}/pycri/oci:v1")
    hosts_toml(str(tmp_path / "without"), s.host, f'server = "https://{s.host}"\nca = "{cert}"\n')
    with pytest.raises(RegistryError):
        fast(config_dir=str(tmp_path / "without"), retries=0).get_manifest(ref)
    hosts_toml(str(tmp_path / "with"), s.host, f'''server = "https://{s.host}"
ca = ["{cert}"]
client = [["{client_pem}", "{client_key}"]]
''')
    m = fast(config_dir=str(tmp_path / "with")).get_manifest(ref)
    assert m.digest == images["oci"].manifest_digest


def test_docker_config_from_environment(token_registry, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    reg, ts, img = token_registry
    (tmp_path / "config.json").write_text(json.dumps({"auths": {reg.host: {
        "username": "alice", "password": "wonderland"}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert fast().get_manifest(parse(f"{reg.host}/private/app:v1")).data == img.manifest
    assert ts.requests[-1][3] == "alice"


def test_read_timeout(server_factory) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def handle(h: BaseHTTPRequestHandler) -> None:
        release.wait(10)   # accept, then say nothing

    s = server_factory(handle)
    try:
        with pytest.raises(RegistryError, match="no answer"):
            fast(timeout=0.3, retries=1).get_manifest(parse(f"{s.host}/x/y:z"))
        assert len(s.requests) == 2
    finally:
        release.set()


def test_mirror_gets_its_own_credentials_only(server_factory, registry, images, tmp_path) -> None:  # type: ignore[no-untyped-def]
    forward = proxy_to(registry.url)
    mirror_auth = "Basic " + base64.b64encode(b"mirror-user:mirror-pass").decode()

    def mirror(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != mirror_auth:
            return reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="mirror"'})
        forward(h)

    m = server_factory(mirror)
    hosts_toml(str(tmp_path), "registry.example.test", f'''
server = "https://registry.example.test"
[host."http://{m.host}"]
  capabilities = ["pull", "resolve"]
''')
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        m.host: {"auth": base64.b64encode(b"mirror-user:mirror-pass").decode()},
        "registry.example.test": {"auth": base64.b64encode(b"up-user:up-pass").decode()}}}))
    r = fast(config_dir=str(tmp_path), docker_config=str(cfg))
    got = r.get_manifest(parse("registry.example.test/pycri/oci:v1"), Auth("caller", "secret"))
    assert got.digest == images["oci"].manifest_digest
    sent = {hd.get("Authorization") for _, _, hd in m.requests}
    assert sent == {None, mirror_auth}


def test_caller_auth_not_sent_to_a_server_on_another_host(server_factory, registry, images,  # type: ignore[no-untyped-def]
                                                          tmp_path) -> None:
    # The front wants Basic auth and takes any: what it receives is what we sent.
    forward = proxy_to(registry.url)

    def ask(h: BaseHTTPRequestHandler) -> None:
        if "Authorization" not in h.headers:
            return reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="front"'})
        forward(h)

    front = server_factory(ask)
    hosts_toml(str(tmp_path), "registry.example.test", f'server = "http://{front.host}"\n')
    r = fast(config_dir=str(tmp_path))
    with pytest.raises(AuthenticationError, match="none are configured"):
        r.get_manifest(parse("registry.example.test/pycri/oci:v1"), Auth("caller", "secret"))
    assert front.requests and all("Authorization" not in hd for _, _, hd in front.requests)
    # The same server asked for by its own name does get the caller's credentials.
    m = r.get_manifest(parse(f"{front.host}/pycri/oci:v1"), Auth("caller", "secret"))
    assert m.digest == images["oci"].manifest_digest
    assert "Authorization" in front.requests[-1][2]
