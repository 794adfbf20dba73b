"""The image pipeline end to end against a real docker-registry on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import imagebuild as ib
import pytest

import pycri
from pycri.errors import DigestMismatchError, InvalidImageError, NotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


@pytest.fixture
def rt(tmp_root):
    root, state = tmp_root
    return pycri.Runtime(root=root, state=state)


def push(registry, repo, ref, built):
    ib.push(registry.host, repo, ref, built)
    return f"{registry.host}/{repo}:{ref}" if not ref.startswith("sha256:") \
        else f"{registry.host}/{repo}@{ref}"


@pytest.fixture(scope="module")
def busybox(registry):
    built = ib.build_image([ib.busybox_layer()], config={"Cmd": ["sh"], "Env": ["PATH=/bin"]})
    return push(registry, "library/busybox", "latest", built), built


def layer_files(rt, img):
    """Map of path -> lstat for every entry in every layer dir of the image."""
    out = {}
    for d in rt.images.layer_dirs(img):
        for dirpath, dirnames, filenames in os.walk(d):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                out.setdefault(os.path.relpath(p, d), []).append(os.lstat(p))
    return out


def assert_store_consistent(rt):
    """No temp dirs; every blob's name is its digest; every record's content exists."""
    root = rt.root
    for sub in ("layers", "blobs/sha256", "images"):
        assert not [n for n in os.listdir(os.path.join(root, sub)) if n.startswith(".tmp-")]
    for name in os.listdir(os.path.join(root, "blobs/sha256")):
        with open(os.path.join(root, "blobs/sha256", name), "rb") as f:
            assert pycri._native.sha256_fd(f.fileno())[0] == name
    for img in rt.images.list():
        for layer in img.layers:
            assert os.path.isdir(rt.images.layer_path(layer.chain_id))
            assert os.path.exists(rt.images.blob_path(layer.digest))


def test_pull_busybox(rt, busybox):
    ref, built = busybox
    img = rt.images.pull(ref)
    assert img.id == built.config_digest
    assert img.repo_tags == (ref,)
    assert img.repo_digests == (ref.rsplit(":", 1)[0] + "@" + built.manifest_digest,)
    assert img.config.cmd == ("sh",)
    assert img.size >= sum(len(b) for b in built.blobs.values()) - len(built.manifest)
    top = rt.images.layer_dirs(img)[0]
    st = os.lstat(os.path.join(top, "bin/busybox"))
    assert st.st_mode & 0o111 and st.st_size > 100_000
    assert rt.images.get(ref).id == img.id
    assert rt.images.get(img.id[7:19]).id == img.id
    assert rt.images.get(img.repo_digests[0]).id == img.id
    assert [i.id for i in rt.images.list()] == [img.id]
    assert_store_consistent(rt)


def test_new_runtime_sees_images(tmp_root, busybox):
    root, state = tmp_root
    img = pycri.Runtime(root=root, state=state).images.pull(busybox[0])
    again = pycri.Runtime(root=root, state=state).images.get(busybox[0])
    assert again.id == img.id and again.repo_tags == img.repo_tags


def test_multilayer_whiteouts_hardlinks_zstd(rt, registry):
    base = ib.layer_tar([
        ib.Dir("etc"), ib.File("etc/keep", b"keep"), ib.File("etc/gone", b"gone"),
        ib.Dir("opt"), ib.File("opt/old", b"old"),
    ])
    top = ib.layer_tar([
        ib.Whiteout("etc/gone"), ib.Opaque("opt"), ib.File("opt/new", b"new"),
        ib.File("data/a", b"x" * 5000), ib.Hardlink("data/b", "data/a"),
    ])
    built = ib.build_image([base, top], compression=["gzip", "zstd"])
    img = rt.images.pull(push(registry, "test/multi", "v1", built))
    lower, upper = rt.images.layer_dirs(img)[1], rt.images.layer_dirs(img)[0]
    wh = os.lstat(os.path.join(upper, "etc/gone"))
    assert os.major(wh.st_rdev) == 0 and os.minor(wh.st_rdev) == 0 and (wh.st_mode & 0o170000) == 0o020000
    assert os.getxattr(os.path.join(upper, "opt"), "trusted.overlay.opaque") == b"y"
    a, b = os.lstat(os.path.join(upper, "data/a")), os.lstat(os.path.join(upper, "data/b"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert open(os.path.join(lower, "etc/keep"), "rb").read() == b"keep"
    assert not os.path.exists(os.path.join(upper, ".wh.gone"))
    assert [x.media_type.rsplit("+", 1)[-1] for x in img.layers] == ["gzip", "zstd"]


def test_multi_platform_index(rt, registry):
    amd = ib.build_image([ib.layer_tar([ib.File("arch", b"amd64")])], architecture="amd64")
    arm = ib.build_image([ib.layer_tar([ib.File("arch", b"arm64")])], architecture="arm64",
                         variant="v8")
    index = ib.build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                            (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    ref = push(registry, "test/multiarch", "latest", index)
    img = rt.images.pull(ref, platform=pycri.Platform("linux", "amd64"))
    assert img.id == amd.config_digest
    assert img.repo_digests[0].endswith("@" + index.manifest_digest)
    arm_img = rt.images.pull(ref, platform=pycri.Platform("linux", "arm64", "v8"))
    assert arm_img.id == arm.config_digest
    with pytest.raises(NotFoundError, match="s390x"):
        rt.images.pull(ref, platform=pycri.Platform("linux", "s390x"))


def test_pull_by_digest_and_tag_at_digest(rt, busybox, registry):
    ref, built = busybox
    name = ref.rsplit(":", 1)[0]
    img = rt.images.pull(f"{name}@{built.manifest_digest}")
    assert img.id == built.config_digest and img.repo_tags == ()
    img2 = rt.images.pull(f"{ref}@{built.manifest_digest}")
    assert img2.id == img.id


def test_remove_semantics_and_gc(rt, registry, busybox):
    ref, built = busybox
    img = rt.images.pull(ref)
    rt.images.tag(ref, "example.test/other:1")
    rt.images.remove("example.test/other:1")
    assert rt.images.get(ref).repo_tags == (ref,)
    # a second image sharing the busybox layer keeps it alive
    extra = ib.build_image([ib.busybox_layer(), ib.layer_tar([ib.File("x", b"x")])])
    ref2 = push(registry, "test/shared", "v1", extra)
    img2 = rt.images.pull(ref2)
    shared = img.layers[0].chain_id
    assert img2.layers[0].chain_id == shared
    rt.images.remove(img.id)
    with pytest.raises(NotFoundError):
        rt.images.get(ref)
    assert os.path.isdir(rt.images.layer_path(shared))
    assert not os.path.exists(rt.images.blob_path(img.id))
    rt.images.remove(ref2)
    assert rt.images.list() == []
    assert os.listdir(os.path.join(rt.root, "layers")) == []
    assert os.listdir(os.path.join(rt.root, "blobs/sha256")) == []
    with pytest.raises(NotFoundError):
        rt.images.remove(ref2)


def test_concurrent_pulls_download_once(rt, registry):
    built = ib.build_image([ib.layer_tar([ib.File(f"f{i}", os.urandom(200_000))]) for i in range(3)])
    ref = push(registry, "test/concurrent", "v1", built)
    reg = rt.images.registry
    calls: dict[str, int] = {}
    real = reg.get_blob
    lock = threading.Lock()

    def counting(ref_, digest, *a, **kw):
        with lock:
            calls[digest] = calls.get(digest, 0) + 1
        time.sleep(0.05)
        return real(ref_, digest, *a, **kw)

    reg.get_blob = counting
    results, errors = [], []

    def run():
        try:
            results.append(rt.images.pull(ref).id)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    layer_digests = [x.digest for x in rt.images.get(ref).layers]
    assert all(calls.get(d) == 1 for d in layer_digests), calls


def corrupt_registry_blob(registry, digest):
    hexd = digest[7:]
    path = os.path.join(registry.workdir, "data", "docker/registry/v2/blobs/sha256", hexd[:2], hexd, "data")
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)


def test_blob_digest_mismatch_leaves_nothing(rt, registry):
    built = ib.build_image([ib.layer_tar([ib.File("f", os.urandom(100_000))])], compression="none")
    ref = push(registry, "test/corrupt", "v1", built)
    corrupt_registry_blob(registry, built.layer_digests[0])
    with pytest.raises(DigestMismatchError):
        rt.images.pull(ref)
    assert rt.images.list() == []
    assert os.listdir(os.path.join(rt.root, "layers")) == []
    assert not os.path.exists(rt.images.blob_path(built.layer_digests[0]))
    assert_store_consistent(rt)


def test_diff_id_mismatch(rt, registry):
    layer = ib.layer_tar([ib.File("f", b"hello")])
    built = ib.build_image([layer], image_config={"rootfs": {"type": "layers",
                           "diff_ids": ["sha256:" + "0" * 64]}})
    with pytest.raises(DigestMismatchError):
        rt.images.pull(push(registry, "test/diffid", "v1", built))
    assert rt.images.list() == [] and os.listdir(os.path.join(rt.root, "layers")) == []


def test_config_layer_count_mismatch(rt, registry):
    layer = ib.layer_tar([ib.File("f", b"hello")])
    built = ib.build_image([layer], image_config={"rootfs": {"type": "layers", "diff_ids": []}})
    with pytest.raises(InvalidImageError, match="diff_ids"):
        rt.images.pull(push(registry, "test/count", "v1", built))
    assert rt.images.list() == []


def test_kill_during_pull_then_resume(tmp_root, registry):
    root, state = tmp_root
    built = ib.build_image([ib.layer_tar([ib.File("big", os.urandom(24 << 20))])], compression="none")
    ref = push(registry, "test/killme", "v1", built)
    marker = os.path.join(os.path.dirname(root), "marker")
    script = f"""
import os, sys, time
sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={root!r}, state={state!r})
def progress(p):
    if p.status == "downloading" and p.completed > (4 << 20):
        open({marker!r}, "w").close()
        time.sleep(600)
rt.images.pull({ref!r}, progress=progress)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        assert proc.poll() is None, "pull finished or died before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = os.listdir(os.path.join(root, "ingest"))
    assert partial, "the killed pull left no partial download to resume"
    rt = pycri.Runtime(root=root, state=state)
    img = rt.images.pull(ref)
    assert img.id == built.config_digest
    with open(os.path.join(rt.images.layer_dirs(img)[0], "big"), "rb") as f:
        assert len(f.read()) == 24 << 20
    assert os.listdir(os.path.join(root, "ingest")) == []
    assert_store_consistent(rt)


def test_export_import_roundtrip(rt, busybox, tmp_path):
    ref, built = busybox
    img = rt.images.pull(ref)
    out = str(tmp_path / "export.tar")
    rt.images.export([ref], out)
    rt2 = pycri.Runtime(root=str(tmp_path / "r2"), state=str(tmp_path / "s2"))
    imported = rt2.images.import_archive(out)
    assert [i.id for i in imported] == [img.id]
    assert ref in imported[0].repo_tags
    assert_store_consistent(rt2)


def test_import_docker_archive_and_oci_dir(tmp_path, rt):
    built = ib.build_image([ib.busybox_layer()], compression="none", docker=True)
    path = str(tmp_path / "save.tar")
    ib.write_docker_archive(path, built, "example.test/saved:v2")
    imgs = rt.images.import_archive(path)
    assert imgs[0].id == built.config_digest
    assert imgs[0].repo_tags == ("example.test/saved:v2",)
    layout = str(tmp_path / "layout")
    built2 = ib.build_image([ib.layer_tar([ib.File("hello", b"world")])])
    ib.write_oci_layout(layout, built2, "example.test/layout:v3")
    imgs = rt.images.import_archive(layout)
    assert imgs[0].id == built2.config_digest
    with open(os.path.join(rt.images.layer_dirs(imgs[0])[0], "hello"), "rb") as f:
        assert f.read() == b"world"


def test_import_rejects_tampered_archive(tmp_path, rt):
    built = ib.build_image([ib.layer_tar([ib.File("hello", b"world")])])
    layout = str(tmp_path / "layout")
    ib.write_oci_layout(layout, built, "example.test/layout:v3")
    blob = os.path.join(layout, "blobs/sha256", built.layer_digests[0][7:])
    with open(blob, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    with pytest.raises((DigestMismatchError, pycri.InvalidLayerError)):
        rt.images.import_archive(layout)
    assert rt.images.list() == [] and os.listdir(os.path.join(rt.root, "layers")) == []


def test_fs_info(rt, busybox):
    before = rt.images.fs_info()
    rt.images.pull(busybox[0])
    after = rt.images.fs_info()
    assert after.used_bytes > before.used_bytes + 500_000 and after.inodes_used > before.inodes_used


def run_cli(root, state, *args):
    return subprocess.run([sys.executable, "-m", "pycri", "--root", root, "--state", state, *args],
                          capture_output=True, text=True, cwd=TREE, timeout=120)


def test_cli(tmp_root, busybox):
    root, state = tmp_root
    ref, built = busybox
    r = run_cli(root, state, "pull", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == built.config_digest
    r = run_cli(root, state, "images")
    assert r.returncode == 0 and built.config_digest[7:19] in r.stdout and "busybox" in r.stdout
    r = run_cli(root, state, "inspect", ref)
    assert r.returncode == 0 and json.loads(r.stdout)["Id"] == built.config_digest
    r = run_cli(root, state, "inspect", "nosuch/image:1")
    assert r.returncode == 3 and "not found" in r.stderr
    r = run_cli(root, state, "pull", "Bad Ref")
    assert r.returncode == 2 and "invalid" in r.stderr
    r = run_cli(root, state, "rmi", ref)
    assert r.returncode == 0
    r = run_cli(root, state, "images", "-q")
    assert r.returncode == 0 and r.stdout.strip() == ""


def test_waiting_pull_fetches_itself_when_the_owner_fails(rt, registry):
    """Two pulls share a layer download; the one downloading fails (say, its
    credentials): the one waiting fetches the layer itself instead of failing."""
    built = ib.build_image([ib.layer_tar([ib.File("f", os.urandom(300_000))])])
    ref = push(registry, "test/ownerfails", "v1", built)
    reg = rt.images.registry
    real = reg.get_blob
    calls = []

    def flaky(ref_, digest, *a, **kw):
        calls.append(digest)
        if digest in built.layer_digests and calls.count(digest) == 1:
            time.sleep(0.3)  # let the second pull start waiting on this download
            raise pycri.RegistryError("injected failure of the first download")
        return real(ref_, digest, *a, **kw)

    reg.get_blob = flaky
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = rt.images.pull(ref).id
        except Exception as e:  # noqa: BLE001
            results[name] = e

    a = threading.Thread(target=run, args=("a",))
    a.start()
    time.sleep(0.1)
    b = threading.Thread(target=run, args=("b",))
    b.start()
    a.join()
    b.join()
    assert isinstance(results["a"], pycri.RegistryError)
    assert results["b"] == built.config_digest
    assert calls.count(built.layer_digests[0]) == 2


def test_remove_with_background_gc(rt, registry):
    built = ib.build_image([ib.layer_tar([ib.File("g", b"collect me")])])
    ref = push(registry, "test/bggc", "v1", built)
    img = rt.images.pull(ref)
    rt.images.remove(ref, collect=False)
    assert rt.images.status(ref) is None  # gone at once for every reader
    layer = rt.images.layer_path(img.layers[0].chain_id)
    deadline = time.monotonic() + 10
    while os.path.exists(layer):  # and its content soon after
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not os.path.exists(rt.images.blob_path(img.id))


def test_queries_see_other_writers_at_once(tmp_root, busybox):
    """Parsed names and records are reused between queries; a store on the same root
    (another process, in effect) that tags, re-pulls or removes is seen by the next query."""
    root, state = tmp_root
    ref, _ = busybox
    reader = pycri.Runtime(root=root, state=state).images
    writer = pycri.Runtime(root=root, state=state).images
    assert reader.list() == []
    img = writer.pull(ref)
    assert [i.id for i in reader.list()] == [img.id]
    first = reader.get(ref)
    assert reader.get(ref) is first  # unchanged files: the same snapshot
    writer.tag(ref, "example.test/again:2")
    assert reader.get(img.id).repo_tags == tuple(sorted((ref, "example.test/again:2")))
    assert reader.status("example.test/again:2").id == img.id
    again = writer.pull(ref)  # the record is written anew (new pull time)
    assert reader.get(ref).pulled_at == again.pulled_at != first.pulled_at
    writer.remove(img.id)
    assert reader.status(ref) is None and reader.list() == []
