"""The image-building test helper: images it pushes read back intact from a real registry."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile

import imagebuild as ib
import urllib3


def _get(url: str, accept: str = "") -> urllib3.BaseHTTPResponse:
    return urllib3.request("GET", url, headers={"Accept": accept} if accept else {})


def test_layer_tar_is_deterministic_and_has_the_entries() -> None:
    entries = [ib.Dir("d", 0o700), ib.File("d/f", b"x", 0o600, 1000, 1000),
               ib.Symlink("d/l", "/etc/passwd"), ib.Hardlink("d/h", "d/f"),
               ib.Whiteout("old/gone"), ib.Opaque("d"), ib.Fifo("p"), ib.CharDev("null", 1, 3)]
    a, b = ib.layer_tar(entries), ib.layer_tar(entries)
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:
        names = {m.name: m for m in tf.getmembers()}
    assert set(names) == {"d", "d/f", "d/l", "d/h", "old/.wh.gone", "d/.wh..wh..opq", "p", "null"}
    assert names["d/f"].uid == 1000 and names["d/f"].mode == 0o600
    assert names["d/l"].issym() and names["d/l"].linkname == "/etc/passwd"
    assert names["d/h"].islnk() and names["null"].ischr()


def test_hostile_names_are_written_verbatim() -> None:
    data = ib.layer_tar([ib.File("../escape", b"x"), ib.File("/abs", b"y")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert [m.name for m in tf.getmembers()] == ["../escape", "/abs"]


def test_push_and_read_back(registry) -> None:  # type: ignore[no-untyped-def]
    img = ib.busybox_image()
    ib.push(registry.host, "test/imagebuild", "v1", img)
    r = _get(f"{registry.url}/v2/test/imagebuild/manifests/v1", ib.OCI_MANIFEST)
    assert r.status == 200
    assert r.data == img.manifest
    assert r.headers["Docker-Content-Digest"] == img.manifest_digest
    layer = _get(f"{registry.url}/v2/test/imagebuild/blobs/{img.layer_digests[0]}").data
    tar = gzip.decompress(layer)
    assert ib.sha256_digest(tar) == img.diff_ids[0]
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        names = set(tf.getnames())
    assert {"bin/busybox", "bin/sh", "etc/passwd", "tmp"} <= names
    cfg = json.loads(img.config)
    assert cfg["config"]["Cmd"] == ["sh"]
    assert cfg["rootfs"]["diff_ids"] == img.diff_ids


def test_index_push_and_skopeo_inspect(registry) -> None:  # type: ignore[no-untyped-def]
    small = ib.layer_tar([ib.File("hello", b"hi\n")])
    amd = ib.build_image([small], "zstd", architecture="amd64")
    arm = ib.build_image([small], "none", architecture="arm64", variant="v8")
    idx = ib.build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                          (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    ib.push(registry.host, "test/multi", "latest", idx)
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/test/multi:latest"],
                         check=True, capture_output=True).stdout
    assert out == idx.manifest
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--override-arch", "arm64",
                          "--override-variant", "v8",
                          f"docker://{registry.host}/test/multi:latest"],
                         check=True, capture_output=True).stdout
    assert json.loads(out)["Architecture"] == "arm64"


def test_docker_media_types(registry) -> None:  # type: ignore[no-untyped-def]
    img = ib.build_image([ib.layer_tar([ib.File("a", b"a")])], docker=True)
    ib.push(registry.host, "test/docker", "v2", img)
    r = _get(f"{registry.url}/v2/test/docker/manifests/v2", ib.DOCKER_MANIFEST)
    assert r.headers["Content-Type"] == ib.DOCKER_MANIFEST
    m = json.loads(r.data)
    assert m["layers"][0]["mediaType"] == ib.DOCKER_LAYER_GZIP
    assert m["config"]["mediaType"] == ib.DOCKER_CONFIG


def test_oci_layout_and_docker_archive(tmp_path) -> None:  # type: ignore[no-untyped-def]
    img = ib.build_image([ib.layer_tar([ib.File("a", b"a")])], config={"Cmd": ["a"]})
    ib.write_oci_layout(str(tmp_path / "oci"), img, "v1")
    out = subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / 'oci'}:v1"],
                         check=True, capture_output=True).stdout
    assert json.loads(out)["Digest"] == img.manifest_digest
    ib.write_docker_archive(str(tmp_path / "img.tar"), img, "example/a:v1")
    out = subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{tmp_path / 'img.tar'}"],
                         check=True, capture_output=True).stdout
    assert json.loads(out)["rootfs"]["diff_ids"] == img.diff_ids
