"""A token authentication server for tests, the kind docker-registry's ``auth: token`` trusts.

It signs JWTs (RS256) with a self-signed certificate made here with
``cryptography``; the certificate goes in the JWT header as ``x5c`` and in the
registry's ``rootcertbundle``, which is how docker-registry 2.8 finds the key.

    ts = TokenServer(users={"alice": "secret"}, refresh_tokens={"rt-1": "alice"})
    reg = LocalRegistry(workdir, ts.registry_config())
    ...
    ts.requests   # every token request seen: (method, path, query, user or "")
    ts.stop()

Anonymous requests get a token with no access, as Docker Hub's auth server does
for private repositories, so the registry then refuses them.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "pycri-test-registry"
ISSUER = "pycri-test-tokenserver"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def self_signed(common_name: str = "pycri test", san: list[str] | None = None
                ) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and a self-signed certificate (valid a day, optional IP/DNS SANs)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if san:
        import ipaddress

        names: list[x509.GeneralName] = []
        for s in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, b.sign(key, hashes.SHA256())


def write_pem(dir: str, key: rsa.RSAPrivateKey, cert: x509.Certificate,
              stem: str = "cert") -> tuple[str, str]:
    """Write ``stem.pem`` and ``stem.key``; returns their paths."""
    cp, kp = os.path.join(dir, stem + ".pem"), os.path.join(dir, stem + ".key")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return cp, kp


class TokenServer:
    """A threaded HTTP token endpoint on 127.0.0.1 at ``/token``."""

    def __init__(self, users: dict[str, str] | None = None,
                 refresh_tokens: dict[str, str] | None = None, expires_in: int = 300,
                 anonymous_pull: bool = False, workdir: str | None = None) -> None:
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.expires_in = expires_in
        self.anonymous_pull = anonymous_pull
        self.requests: list[tuple[str, str, dict[str, list[str]], str]] = []
        self.workdir = workdir or tempfile.mkdtemp(prefix="pycri-tokens-")
        self.key, self.cert = self_signed("pycri test token signer")
        self.cert_path, _ = write_pem(self.workdir, self.key, self.cert, "token-signer")
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                u = urlsplit(self.path)
                q = parse_qs(u.query)
                user = self._basic_user()
                server._record("GET", u.path, q, user if isinstance(user, str) else "")
                if user is False:
                    return self._reply(401, {"details": "bad credentials"})
                self._grant(q, user if isinstance(user, str) else "")

            def do_POST(self) -> None:
                u = urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(min(n, 1 << 16)).decode())
                grant = form.get("grant_type", [""])[0]
                if grant == "refresh_token":
                    user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                elif grant == "password":
                    name = form.get("username", [""])[0]
                    ok = server.users.get(name) == form.get("password", [None])[0]
                    user = name if ok else None
                else:
                    user = None
                server._record("POST", u.path, form, user or "")
                if user is None:
                    return self._reply(401, {"details": "invalid grant"})
                self._grant(form, user, oauth=True)

            def _basic_user(self) -> str | bool | None:
                h = self.headers.get("Authorization", "")
                if not h:
                    return None
                if not h.startswith("Basic "):
                    return False
                try:
                    user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
                except ValueError:
                    return False
                return user if server.users.get(user) == pw else False

            def _grant(self, q: dict[str, list[str]], user: str, oauth: bool = False) -> None:
                access = []
                for scope in q.get("scope", []):
                    for one in scope.split(" "):
                        parts = one.split(":")
                        if len(parts) == 3 and parts[0] == "repository" and (
                                user or server.anonymous_pull):
                            access.append({"type": "repository", "name": parts[1],
                                           "actions": ["pull"]})
                token = server.sign(user, access, q.get("service", [SERVICE])[0])
                body: dict[str, Any] = {"expires_in": server.expires_in,
                                        "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime())}
                if oauth:
                    body["access_token"] = token
                else:
                    body["token"] = token
                    body["access_token"] = token
                self._reply(200, body)

            def _reply(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, method: str, path: str, q: dict[str, list[str]], user: str) -> None:
        with self._lock:
            self.requests.append((method, path, q, user))

    def sign(self, subject: str, access: list[dict[str, Any]], audience: str = SERVICE) -> str:
        """A JWT docker-registry accepts: RS256, the signing certificate in ``x5c``."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": audience, "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (b64url(json.dumps(header).encode()) + "."
                         + b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def registry_config(self, realm: str | None = None) -> str:
        """The ``auth:`` YAML block for LocalRegistry's extra_config."""
        return ("auth:\n  token:\n"
                f"    realm: {realm or self.url}\n"
                f"    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n"
                f"    rootcertbundle: {self.cert_path}\n")

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
