"""Manifest, index and config parsing: hostile JSON gets typed errors (SECURITY.md 8-10)."""

from __future__ import annotations

import json

import pytest

from pycri import oci, reference
from pycri.config import Platform
from pycri.errors import (
    InvalidArgumentError,
    InvalidImageError,
    NotFoundError,
    ResourceExhaustedError,
    UnsupportedError,
)
from pycri.store import validate_digest

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def manifest(**over):
    m = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": D2, "size": 20}],
    }
    m.update(over)
    return m


def config(**c):
    return {"architecture": "amd64", "os": "linux", "config": c,
            "rootfs": {"type": "layers", "diff_ids": [D2]}}


def test_manifest_roundtrip():
    mt, doc = oci.document_type(json.dumps(manifest()).encode(), oci.OCI_MANIFEST)
    m = oci.parse_manifest(mt, doc)
    assert m.config.digest == D1 and m.layers[0].size == 20


@pytest.mark.parametrize(
    "data,ctype,exc",
    [
        (b"{not json", oci.OCI_MANIFEST, InvalidImageError),
        (b"[1,2]", oci.OCI_MANIFEST, InvalidImageError),
        (b"[" * 100000 + b"]" * 100000, oci.OCI_MANIFEST, InvalidImageError),
        (b" " * (5 << 20), oci.OCI_MANIFEST, ResourceExhaustedError),
        (json.dumps({"schemaVersion": 1, "name": "x"}).encode(), "", UnsupportedError),
        (json.dumps(manifest()).encode(), oci.DOCKER_SCHEMA1[1], UnsupportedError),
        (json.dumps(manifest(manifests=[])).encode(), oci.OCI_MANIFEST, InvalidImageError),
        (json.dumps(manifest()).encode(), oci.OCI_INDEX, InvalidImageError),
        (json.dumps(manifest(mediaType="application/x-bogus")).encode(), "", UnsupportedError),
    ],
    ids=["garbage", "not-object", "deep-nesting", "oversized", "schema1", "schema1-ctype",
         "layers-and-manifests", "type-disagrees", "unknown-type"],
)
def test_hostile_documents(data, ctype, exc):
    with pytest.raises(exc):
        mt, doc = oci.document_type(data, ctype)
        oci.parse_manifest(mt, doc)


@pytest.mark.parametrize(
    "digest,exc",
    [
        ("sha256:../../etc/passwd", InvalidArgumentError),
        ("sha256:" + "a" * 63 + "/", InvalidArgumentError),
        ("sha256:" + "A" * 64, InvalidArgumentError),
        ("sha512:" + "a" * 128, UnsupportedError),
        ("md5:abc", UnsupportedError),
        ("", InvalidArgumentError),
        (42, InvalidArgumentError),
    ],
)
def test_digest_validation(digest, exc):
    with pytest.raises(exc):
        validate_digest(digest)


@pytest.mark.parametrize(
    "layer",
    [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:../x", "size": 1},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": -1},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": "1"},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": True},
        "not-a-descriptor",
    ],
)
def test_bad_layer_descriptors(layer):
    with pytest.raises(InvalidImageError):
        oci.parse_manifest(oci.OCI_MANIFEST, manifest(layers=[layer]))


def test_unknown_layer_media_type():
    layer = {"mediaType": "application/x-evil", "digest": D2, "size": 1}
    with pytest.raises(UnsupportedError, match="application/x-evil"):
        oci.parse_manifest(oci.OCI_MANIFEST, manifest(layers=[layer]))


def test_too_many_layers():
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": 1}
    with pytest.raises(ResourceExhaustedError):
        oci.parse_manifest(oci.OCI_MANIFEST, manifest(layers=[layer] * 300))


def test_platform_selection():
    def entry(arch, variant=""):
        p = {"os": "linux", "architecture": arch}
        if variant:
            p["variant"] = variant
        return {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + (arch[0] * 64)[:64]
                if arch != "arm64" else "sha256:" + ("b" if variant == "v8" else "c") * 64,
                "size": 1, "platform": p}

    entries = oci.parse_index({"schemaVersion": 2, "manifests": [
        entry("amd64"), entry("arm64", "v9"), entry("arm64", "v8")]})
    assert oci.select_platform(entries, Platform("linux", "arm64", "v8")).digest == "sha256:" + "b" * 64
    assert oci.select_platform(entries, Platform("linux", "amd64")).digest == "sha256:" + "a" * 64
    with pytest.raises(NotFoundError, match="s390x"):
        oci.select_platform(entries, Platform("linux", "s390x"))


def test_config_parsing_and_env_dedupe():
    c = oci.parse_config(json.dumps(config(
        User="1000:1000", Env=["A=1", "B=2", "A=3"], Entrypoint=["/bin/sh"], Cmd=["-c", "x"],
        WorkingDir="/srv/./app", Volumes={"/data": {}}, ExposedPorts={"80/tcp": {}},
        Labels={"k": "v"}, StopSignal="SIGINT")).encode())
    assert c.env == ("A=3", "B=2")
    assert c.working_dir == "/srv/app"
    assert c.volumes == ("/data",) and c.exposed_ports == ("80/tcp",)
    assert c.stop_signal == "SIGINT" and c.user == "1000:1000"


@pytest.mark.parametrize(
    "cfg,exc",
    [
        (config(Volumes={"": {}}), InvalidImageError),
        (config(Volumes={"relative/path": {}}), InvalidImageError),
        (config(Volumes={"/data/../../etc": {}}), InvalidImageError),
        (config(Volumes={"/": {}}), InvalidImageError),
        (config(User="4294967296"), InvalidImageError),
        (config(User="0:99999999999"), InvalidImageError),
        (config(WorkingDir="relative"), InvalidImageError),
        (config(Env=["X=" + "y" * 100] * 20000), ResourceExhaustedError),
        (config(Env="A=1"), InvalidImageError),
        (config(Env=["A=\x00"]), InvalidImageError),
        (config(Labels={"a": 1}), InvalidImageError),
        ({"config": {}, "rootfs": {"type": "layers", "diff_ids": ["sha256:../x"]}}, InvalidImageError),
        ({"config": {}, "rootfs": {"type": "other"}}, InvalidImageError),
        ({"config": "string"}, InvalidImageError),
    ],
)
def test_hostile_configs(cfg, exc):
    with pytest.raises(exc):
        oci.parse_config(json.dumps(cfg).encode())


def test_chain_ids():
    a, b = D1, D2
    chain = oci.chain_ids([a, b])
    assert chain[0] == a
    assert chain[1] == oci.sha256_digest(f"{a} {b}".encode())


@pytest.mark.parametrize("ref,expect", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("127.0.0.1:5000/library/busybox", "127.0.0.1:5000/library/busybox:latest"),
    ("localhost/x@" + D1, "localhost/x@" + D1),
    ("quay.io/a/b:t@" + D1, "quay.io/a/b:t@" + D1),
    ("index.docker.io/foo/bar", "docker.io/foo/bar:latest"),
])
def test_reference_parse(ref, expect):
    assert str(reference.parse(ref)) == expect


@pytest.mark.parametrize("ref", ["", "Upper/x", "a/../b", "x:" + "t" * 200, "x@sha256:zz",
                                 "x@sha256:" + "a" * 64 + "/..", "a" * 5000])
def test_reference_rejects(ref):
    with pytest.raises(InvalidArgumentError):
        reference.parse(ref)
