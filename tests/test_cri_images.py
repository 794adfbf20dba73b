"""CRI ImageService: the pure converters, then every image RPC through a real gRPC
client against a server on a unix socket, pulling from a real docker-registry."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import grpc
import pytest
from crihelpers import (
    CRICTL,
    connect,
    spawn,
    start_in_process,
    stop_proc,
    wait_for_socket,
)

from pycri.config import Auth
from pycri.cri import convert
from pycri.cri._gen import api_pb2
from pycri.errors import InvalidArgumentError
from pycri.image import FsInfo, Image
from pycri.oci import ImageConfig

Code = grpc.StatusCode
ID = "sha256:" + "a" * 64
MDIGEST = "sha256:" + "b" * 64


def make_image(user: str = "", tags=("docker.io/library/busybox:latest",),
               digests=("docker.io/library/busybox@" + MDIGEST,), size: int = 1234,
               annotations=None) -> Image:
    return Image(id=ID, repo_tags=tuple(tags), repo_digests=tuple(digests), size=size,
                 config=ImageConfig(user=user, cmd=("sh",)), manifest_digest=MDIGEST,
                 manifest_media_type="application/vnd.oci.image.manifest.v1+json", layers=(),
                 pulled_at=1.0, annotations=dict(annotations or {}))


# -- convert: pure functions ----------------------------------------------------------------

@pytest.mark.parametrize("user, want", [
    ("", (None, "")), ("0", (0, "")), ("1000", (1000, "")), ("1000:50", (1000, "")),
    ("nginx", (None, "nginx")), ("nginx:web", (None, "nginx")), (":50", (None, "")),
    ("2147483647", (2147483647, "")),
])
def test_user_of(user, want):
    assert convert.user_of(user) == want


def test_image_to_proto_numeric_user():
    msg = convert.image_to_proto(make_image(user="1000:50", annotations={"a": "b"}))
    assert msg.id == ID
    assert list(msg.repo_tags) == ["docker.io/library/busybox:latest"]
    assert list(msg.repo_digests) == ["docker.io/library/busybox@" + MDIGEST]
    assert msg.size == 1234
    assert msg.HasField("uid") and msg.uid.value == 1000
    assert msg.username == ""
    assert msg.spec.image == "docker.io/library/busybox:latest"
    assert dict(msg.spec.annotations) == {"a": "b"}
    assert msg.pinned is False


def test_image_to_proto_named_and_root_users():
    named = convert.image_to_proto(make_image(user="nobody"))
    assert not named.HasField("uid") and named.username == "nobody"
    root = convert.image_to_proto(make_image(user="0"))
    assert root.HasField("uid") and root.uid.value == 0  # uid 0 is set, not absent
    unset = convert.image_to_proto(make_image(user=""))
    assert not unset.HasField("uid") and unset.username == ""


def test_image_to_proto_edges():
    # an image known only by digest names itself by digest; size is never 0
    msg = convert.image_to_proto(make_image(tags=(), size=0), pinned=True)
    assert msg.spec.image == "docker.io/library/busybox@" + MDIGEST
    assert msg.size == 1 and msg.pinned is True
    bare = convert.image_to_proto(make_image(tags=(), digests=()))
    assert bare.spec.image == ID


def test_image_info_is_json():
    info = convert.image_info(make_image(user="nobody"))
    doc = json.loads(info["info"])
    assert doc["Id"] == ID and doc["Config"]["User"] == "nobody"


@pytest.mark.parametrize("refs, want", [
    (["busybox"], True),
    (["docker.io/library/busybox:latest"], True),
    (["busybox@" + MDIGEST], True),
    (["busybox:1.36"], False),
    (["registry.k8s.io/pause:3.10"], False),
    (["NOT A REF", "busybox"], True),
    ([], False),
])
def test_is_pinned(refs, want):
    assert convert.is_pinned(make_image(), refs) is want


def test_fs_usage():
    msg = convert.fs_usage(FsInfo("/var/lib/pycri", 4096, 7, 123))
    assert msg.fs_id.mountpoint == "/var/lib/pycri"
    assert (msg.used_bytes.value, msg.inodes_used.value, msg.timestamp) == (4096, 7, 123)
    assert convert.fs_usage(FsInfo("/x", 0, 0, 0)).timestamp == 1  # must be > 0


def test_image_name():
    assert convert.image_name(api_pb2.ImageSpec(image=" busybox ")) == "busybox"
    for spec in (None, api_pb2.ImageSpec(), api_pb2.ImageSpec(image="  ")):
        with pytest.raises(InvalidArgumentError):
            convert.image_name(spec)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.mark.parametrize("cfg, registry, want", [
    (None, "docker.io", None),
    (api_pb2.AuthConfig(), "docker.io", None),
    (api_pb2.AuthConfig(username="u", password="p"), "r.example", Auth("u", "p")),
    (api_pb2.AuthConfig(auth=_b64("u:p:with:colons")), "r.example", Auth("u", "p:with:colons")),
    # username/password win over auth
    (api_pb2.AuthConfig(username="u", password="p", auth=_b64("x:y")), "r.example", Auth("u", "p")),
    (api_pb2.AuthConfig(identity_token="it"), "r.example", Auth(identity_token="it")),
    (api_pb2.AuthConfig(registry_token="rt"), "r.example", Auth(registry_token="rt")),
    # server_address must name the registry being pulled from
    (api_pb2.AuthConfig(username="u", password="p", server_address="r.example"),
     "r.example", Auth("u", "p")),
    (api_pb2.AuthConfig(username="u", password="p", server_address="https://r.example:5000/v2/"),
     "r.example:5000", Auth("u", "p")),
    (api_pb2.AuthConfig(username="u", password="p", server_address="R.Example"),
     "r.example", Auth("u", "p")),
    (api_pb2.AuthConfig(username="u", password="p", server_address="evil.example"),
     "r.example", None),
    (api_pb2.AuthConfig(username="u", password="p", server_address="r.example:5000"),
     "r.example", None),
    (api_pb2.AuthConfig(username="u", password="p",
                        server_address="https://index.docker.io/v1/"), "docker.io", Auth("u", "p")),
])
def test_auth_from_proto(cfg, registry, want):
    assert convert.auth_from_proto(cfg, registry) == want


@pytest.mark.parametrize("cfg", [
    api_pb2.AuthConfig(auth="not base64!"),
    api_pb2.AuthConfig(auth=_b64("no-colon")),
    api_pb2.AuthConfig(auth=_b64(":password-only")),
    api_pb2.AuthConfig(username="u", password="p\nInjected: header"),
])
def test_auth_from_proto_refuses(cfg):
    with pytest.raises(InvalidArgumentError):
        convert.auth_from_proto(cfg, "r.example")


def test_auth_secrets_not_in_repr():
    a = convert.auth_from_proto(api_pb2.AuthConfig(username="u", password="hunter2"), "r")
    assert "hunter2" not in repr(a)


# -- the RPCs, no registry needed ---------------------------------------------------------------

def spec(name: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=name)


def test_empty_store(cri):
    c, _, _ = cri
    assert list(c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []
    assert list(c.images.StreamImages(api_pb2.StreamImagesRequest(), timeout=10)) == []
    resp = c.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec("busybox"), verbose=True),
                                timeout=10)
    assert not resp.HasField("image") and dict(resp.info) == {}  # CRI: absent -> OK, unset
    for _ in range(2):  # idempotent
        c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec("busybox")), timeout=10)
        c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(ID)), timeout=10)


@pytest.mark.parametrize("call, request_", [
    ("PullImage", api_pb2.PullImageRequest()),
    ("PullImage", api_pb2.PullImageRequest(image=spec("Not A Reference!"))),
    ("PullImage", api_pb2.PullImageRequest(image=spec("busybox:bad tag"))),
    ("PullImage", api_pb2.PullImageRequest(image=spec("busybox@sha256:123"))),
    ("PullImage", api_pb2.PullImageRequest(
        image=api_pb2.ImageSpec(image="busybox", runtime_handler="kata"))),
    ("PullImage", api_pb2.PullImageRequest(image=spec("busybox"),
                                           auth=api_pb2.AuthConfig(auth="%%%"))),
    ("ImageStatus", api_pb2.ImageStatusRequest()),
    ("RemoveImage", api_pb2.RemoveImageRequest()),
])
def test_invalid_requests(cri, call, request_):
    c, _, _ = cri
    with pytest.raises(grpc.RpcError) as exc:
        getattr(c.images, call)(request_, timeout=10)
    assert exc.value.code() == Code.INVALID_ARGUMENT, exc.value.details()


def test_credentials_never_logged_or_echoed(cri, caplog):
    c, _, _ = cri
    secret = "s3cret-pw-7f1c"
    for auth in (api_pb2.AuthConfig(username="u", password=secret),
                 api_pb2.AuthConfig(auth=_b64("u:" + secret)),
                 api_pb2.AuthConfig(registry_token=secret, server_address="x\n" + secret)):
        with caplog.at_level("DEBUG", logger="pycri"), pytest.raises(grpc.RpcError) as exc:
            c.images.PullImage(api_pb2.PullImageRequest(image=spec("Bad Ref"), auth=auth),
                               timeout=10)
        assert exc.value.code() == Code.INVALID_ARGUMENT
        assert secret not in exc.value.details()
    assert caplog.records and all(secret not in r.getMessage() for r in caplog.records)


def test_huge_reference_is_refused(cri):
    c, _, _ = cri
    with pytest.raises(grpc.RpcError) as exc:
        pull(c, "a" * (1 << 20))
    assert exc.value.code() == Code.INVALID_ARGUMENT
    assert len(exc.value.details()) < 1000


# -- against a real registry ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pushed(registry):
    """Small images in the test registry: name -> (reference, BuiltImage)."""
    import imagebuild as ib

    out = {}
    for name, user in [("plain", ""), ("numeric", "1000:50"), ("named", "nobody"),
                       ("pause", "65535")]:
        built = ib.build_image([ib.layer_tar([ib.File("hello", name.encode())])],
                               config={"User": user, "Cmd": ["/hello"]} if user else
                               {"Cmd": ["/hello"]})
        repo = f"crit/{name}"
        ib.push(registry.host, repo, "v1", built)
        out[name] = (f"{registry.host}/{repo}:v1", built)
    return out


def pull(c, ref: str, **kw) -> str:
    return c.images.PullImage(api_pb2.PullImageRequest(image=spec(ref), **kw), timeout=120).image_ref


def status(c, ref: str, verbose: bool = False):
    return c.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec(ref), verbose=verbose),
                                timeout=10)


def test_pull_status_list_remove(cri, pushed, registry):
    c, _, _ = cri
    ref, built = pushed["plain"]
    image_ref = pull(c, ref)
    assert image_ref == built.config_digest  # the image id

    img = status(c, ref).image
    assert img.id == image_ref
    assert list(img.repo_tags) == [ref]
    assert list(img.repo_digests) == [f"{registry.host}/crit/plain@{built.manifest_digest}"]
    assert img.size >= len(built.config)
    assert not img.HasField("uid") and img.username == ""
    assert img.spec.image == ref and img.pinned is False
    # the same image by id, id prefix and digest reference
    for other in (image_ref, image_ref[7:19], img.repo_digests[0]):
        assert status(c, other).image == img
    # verbose: info holds the image JSON
    v = status(c, ref, verbose=True)
    doc = json.loads(v.info["info"])
    assert doc["Id"] == image_ref and doc["Config"]["Cmd"] == ["/hello"]
    assert dict(status(c, ref).info) == {}

    # pulling again gives the same id
    assert pull(c, ref) == image_ref

    c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(ref)), timeout=10)
    assert not status(c, ref).HasField("image")
    assert not status(c, image_ref).HasField("image")
    c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(ref)), timeout=10)  # again: OK


def test_users(cri, pushed):
    c, _, _ = cri
    pull(c, pushed["numeric"][0])
    pull(c, pushed["named"][0])
    num = status(c, pushed["numeric"][0]).image
    assert num.HasField("uid") and num.uid.value == 1000 and num.username == ""
    named = status(c, pushed["named"][0]).image
    assert not named.HasField("uid") and named.username == "nobody"


def test_list_with_filter_and_stream(cri, pushed):
    c, _, _ = cri
    ids = {name: pull(c, pushed[name][0]) for name in ("plain", "numeric", "named")}
    listed = c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
    assert sorted(i.id for i in listed) == sorted(ids.values())
    streamed = [i for r in c.images.StreamImages(api_pb2.StreamImagesRequest(), timeout=10)
                for i in r.images]
    assert sorted(i.id for i in streamed) == sorted(ids.values())

    def filtered(name: str) -> list[str]:
        f = api_pb2.ImageFilter(image=spec(name))
        return [i.id for i in c.images.ListImages(api_pb2.ListImagesRequest(filter=f),
                                                  timeout=10).images]

    assert filtered(pushed["numeric"][0]) == [ids["numeric"]]
    assert filtered(ids["named"]) == [ids["named"]]
    assert filtered(pushed["plain"][0].replace(":v1", ":v2")) == []
    stream_f = c.images.StreamImages(api_pb2.StreamImagesRequest(
        filter=api_pb2.ImageFilter(image=spec(pushed["plain"][0]))), timeout=10)
    assert [i.id for r in stream_f for i in r.images] == [ids["plain"]]


def test_remove_by_one_name_removes_all_names(cri, pushed, registry):
    c, server, _ = cri
    ref, _ = pushed["plain"]
    image_ref = pull(c, ref)
    alias = f"{registry.host}/crit/alias:latest"
    server.runtime.images.tag(ref, alias)
    assert status(c, alias).image.id == image_ref
    c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(alias)), timeout=10)
    assert not status(c, ref).HasField("image")  # CRI: every tag goes with the image
    assert list(c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []


def test_pull_missing_is_not_found(cri, pushed, registry):
    c, _, _ = cri
    for ref in (f"{registry.host}/crit/plain:nope", f"{registry.host}/crit/nothing-here:v1"):
        with pytest.raises(grpc.RpcError) as exc:
            pull(c, ref)
        assert exc.value.code() == Code.NOT_FOUND, exc.value.details()
    assert list(c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []


def test_pull_with_credentials_for_another_host_still_pulls(cri, pushed):
    # the registry needs no auth; credentials addressed elsewhere are dropped, not sent
    c, _, _ = cri
    ref, built = pushed["plain"]
    auth = api_pb2.AuthConfig(username="u", password="p", server_address="elsewhere.example")
    assert pull(c, ref, auth=auth) == built.config_digest


def test_sandbox_image_is_pinned(dirs, pushed):
    pause_ref = pushed["pause"][0]
    server = start_in_process(dirs, sandbox_image=pause_ref)
    try:
        c = connect(server.address)
        pull(c, pause_ref)
        pull(c, pushed["plain"][0])
        assert status(c, pause_ref).image.pinned is True
        assert status(c, pushed["plain"][0]).image.pinned is False
        pinned = {i.id: i.pinned for i in
                  c.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images}
        assert sorted(pinned.values()) == [False, True]
        # pinned is only a recommendation: removal still works
        c.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(pause_ref)), timeout=10)
        assert not status(c, pause_ref).HasField("image")
        c.channel.close()
    finally:
        server.stop(grace=1)


def test_image_fs_info_grows_after_pull(cri, pushed):
    c, _, _ = cri
    before = c.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    pull(c, pushed["plain"][0])
    after = c.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    assert after.used_bytes.value > before.used_bytes.value
    assert after.inodes_used.value > before.inodes_used.value


@pytest.mark.skipif(not os.access(CRICTL, os.X_OK),
                    reason=f"{CRICTL} is a locally built tool, absent in CI; the gRPC tests "
                           "above cover the same calls")
def test_crictl_pull_images_inspect_rmi(dirs, pushed):
    ref, built = pushed["plain"]
    proc = spawn(dirs)
    try:
        wait_for_socket(proc, dirs["sock"])
        ep = "unix://" + dirs["sock"]
        base = [CRICTL, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "60s"]

        def crictl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(base + list(args), capture_output=True, text=True,
                                  timeout=120, check=False)

        out = crictl("pull", ref)
        assert out.returncode == 0, out.stderr
        assert built.config_digest in out.stdout  # "Image is up to date for <image_ref>"
        out = crictl("images", "-q")
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [built.config_digest]
        out = crictl("images")
        assert ref.rsplit(":", 1)[0] in out.stdout and "v1" in out.stdout
        out = crictl("inspecti", ref)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["status"]["id"] == built.config_digest
        assert doc["info"]["Config"]["Cmd"] == ["/hello"]  # crictl unpacks info values
        out = crictl("pull", ref.replace(":v1", ":missing"))
        assert out.returncode != 0 and "NotFound" in out.stderr
        out = crictl("rmi", ref)
        assert out.returncode == 0, out.stderr
        out = crictl("images", "-q")
        assert out.stdout.split() == []
    finally:
        rc, err = stop_proc(proc)
    assert rc == 0, err




def test_client_deadline_does_not_break_other_pulls(cri, registry):
    # critest's sequence: a pull with a 1 ms deadline, then at once another image with
    # the same layers. The server finishes the first pull for nobody. (An early version
    # stopped abandoned pulls; the layer being fetched then failed every pull waiting on
    # it. That race needs a slower download than this test makes, so this test checks
    # the sequence and the status code, not the race.)
    import imagebuild as ib

    c, _, _ = cri
    shared = ib.layer_tar([ib.File("big", os.urandom(4 << 20))])
    first = ib.build_image([shared], config={"Cmd": ["one"]})
    second = ib.build_image([shared], config={"Cmd": ["two"]})
    ib.push(registry.host, "crit/deadline", "one", first)
    ib.push(registry.host, "crit/deadline", "two", second)
    with pytest.raises(grpc.RpcError) as exc:
        c.images.PullImage(api_pb2.PullImageRequest(
            image=spec(f"{registry.host}/crit/deadline:one")), timeout=0.001)
    assert exc.value.code() == Code.DEADLINE_EXCEEDED
    assert pull(c, f"{registry.host}/crit/deadline:two") == second.config_digest
    assert pull(c, f"{registry.host}/crit/deadline:one") == first.config_digest

# -- a registry that wants credentials (htpasswd, Basic auth on loopback) ------------------------

@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    """(registry, image reference, BuiltImage): docker-registry with user alice / pw."""
    import warnings

    import imagebuild as ib
    from conftest import LocalRegistry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt through libxcrypt: what docker-registry's htpasswd accepts

        hashed = crypt.crypt("alice-pw", crypt.mksalt(crypt.METHOD_BLOWFISH))
    d = tmp_path_factory.mktemp("authreg")
    (d / "htpasswd").write_text(f"alice:{hashed}\n")
    reg = LocalRegistry(str(d), "auth:\n  htpasswd:\n    realm: pycri-test\n"
                                f"    path: {d / 'htpasswd'}\n")
    try:
        built = ib.build_image([ib.layer_tar([ib.File("secret", b"behind auth")])])
        basic = "Basic " + _b64("alice:alice-pw")
        ib.push(reg.host, "private/app", "v1", built, headers={"Authorization": basic})
        yield reg, f"{reg.host}/private/app:v1", built
    finally:
        reg.stop()


@pytest.mark.parametrize("auth", [
    api_pb2.AuthConfig(username="alice", password="alice-pw"),
    api_pb2.AuthConfig(auth=_b64("alice:alice-pw")),
    "server_address",  # username/password addressed to this very registry
])
def test_pull_with_auth_config(cri, auth_registry, auth):
    c, _, _ = cri
    reg, ref, built = auth_registry
    if auth == "server_address":
        auth = api_pb2.AuthConfig(username="alice", password="alice-pw",
                                  server_address=f"http://{reg.host}")
    assert pull(c, ref, auth=auth) == built.config_digest
    assert status(c, ref).image.id == built.config_digest


@pytest.mark.parametrize("auth", [
    None,
    api_pb2.AuthConfig(username="alice", password="wrong"),
    # right credentials, addressed to another registry: not sent here
    api_pb2.AuthConfig(username="alice", password="alice-pw", server_address="other.example"),
])
def test_pull_refused_credentials_is_unauthenticated(cri, auth_registry, auth):
    c, _, _ = cri
    _, ref, _ = auth_registry
    kw = {"auth": auth} if auth is not None else {}
    with pytest.raises(grpc.RpcError) as exc:
        pull(c, ref, **kw)
    assert exc.value.code() == Code.UNAUTHENTICATED, exc.value.details()
    assert not status(c, ref).HasField("image")
