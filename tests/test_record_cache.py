"""Parsed records are reused between reads (store.ParsedFiles, the pod of each container
in Runtime.containers). These tests warm a reader's caches, change things through a
second Runtime on the same root (another process, in effect) or another process, and
check that the reader's next answer is the new truth: state after stop, exit code after
exit, config changes, labels rewritten in place to the same size, removal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import imagebuild as ib
import pycri
from pycri import store
from pycri.config import to_json
from pycri.errors import NotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


def test_parsed_files_keyed_by_bytes():
    made: list[bytes] = []

    def make(data: bytes) -> list[bytes]:
        made.append(data)
        return [data]

    cache = store.ParsedFiles(limit=2)
    first = cache.get("/a", b"one", make)
    assert cache.get("/a", b"one", make) is first and made == [b"one"]
    assert cache.get("/a", b"two", make) == [b"two"]  # same size, other bytes: made anew
    assert cache.get("/a", b"one", make) == [b"one"] and len(made) == 3
    cache.get("/b", b"x", make)
    cache.get("/c", b"y", make)  # over the limit: the oldest (/a) goes
    cache.get("/a", b"one", make)
    assert made[-1] == b"one" and len(made) == 6
    cache.forget("/a")
    cache.get("/a", b"one", make)
    assert len(made) == 7


@pytest.fixture(scope="module")
def image_ref(registry):
    ib.push(registry.host, "cache/busybox", "v1", ib.busybox_image())
    return f"{registry.host}/cache/busybox:v1"


@pytest.fixture
def two(image_ref):
    """(reader, writer): two Runtimes on one root, the image pulled."""
    base = tempfile.mkdtemp(prefix="pycri-cache-", dir="/tmp")
    parent = "pycri-cache-" + uuid.uuid4().hex[:8]
    reader = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    writer = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    reader.images.pull(image_ref)
    yield reader, writer, image_ref
    for sb in writer.sandboxes():
        sb.remove()
    writer.cgroups().remove_parent()
    assert pycri.store.Trash.drain(10)     # (its work for this root, then its spares)
    pycri.slots.drop_spares(writer.root)
    shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(base)


def _container(rt, sb, ref, cmd, **kw):
    img = rt.images.get(ref)
    return sb.create_container(pycri.ContainerConfig(name="c" + uuid.uuid4().hex[:8],
                                                     image=img.id, command=tuple(cmd), **kw))


def test_container_state_and_exit_seen_by_a_warm_reader(two):
    reader, writer, ref = two
    sb = writer.run_sandbox(pycri.SandboxConfig(name="p", uid=uuid.uuid4().hex))
    c = _container(writer, sb, ref, ["sh", "-c", "while [ ! -e /go ]; do sleep 0.05; done; exit 7"])
    seen = reader.container(c.id)
    assert seen.status().state == "created" and seen.state == "created"
    c.start()
    st = seen.status()
    assert st.state == "running" and st.pid > 0 and st.started_at_ns > 0
    assert reader.containers(state="running") == [seen]
    # the exit: the monitor writes its exit file, the record is not rewritten
    writer.container(c.id).exec_sync(["touch", "/go"], timeout=10)
    assert c.wait(10) == 7
    st = seen.status()
    assert (st.state, st.exit_code, st.pid, st.reason) == ("exited", 7, 0, "Error")
    assert st.finished_at_ns > 0
    assert reader.containers(state="running") == []
    assert reader.containers(state="exited") == [seen]

    # stopped by another process (a separate interpreter on the same root)
    d = _container(writer, sb, ref, ["sleep", "100"])
    d.start()
    assert reader.container(d.id).status().state == "running"
    code = (f"import pycri; rt = pycri.Runtime(root={writer.root!r}, state={writer.state!r}, "
            f"cgroup_parent={writer.cgroup_parent!r}); rt.container({d.id!r}).stop(timeout=0)")
    subprocess.run([sys.executable, "-c", code], cwd=TREE, check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=TREE))
    st = reader.container(d.id).status()
    assert st.state == "exited" and st.exit_code == 137 and st.reason == "Error"


def test_config_and_labels_rewritten_in_place(two):
    """A record rewritten with values of the same length (same file size, possibly the
    same inode number and the same coarse timestamp) is still seen."""
    reader, writer, ref = two
    sb = writer.run_sandbox(pycri.SandboxConfig(name="p", uid=uuid.uuid4().hex,
                                                labels={"tier": "aaa"}))
    c = _container(writer, sb, ref, ["sleep", "100"], labels={"app": "one"},
                   annotations={"note": "xx"})
    seen, pod = reader.container(c.id), reader.sandbox(sb.id)
    assert seen.status().config.labels == {"app": "one"}
    assert pod.status().config.labels == {"tier": "aaa"}
    assert reader.containers(labels={"app": "one"}) == [seen]
    for value, note in (("two", "yy"), ("six", "zz")):
        with writer.container(c.id)._lock():
            rec = writer.container(c.id)._read()
            rec["config"] = dict(rec["config"], labels={"app": value}, annotations={"note": note})
            writer.container(c.id)._write(rec)
        st = seen.status()
        assert st.config.labels == {"app": value} and st.config.annotations == {"note": note}
        assert seen.config.labels == {"app": value}
        assert reader.containers(labels={"app": "one"}) == []
        assert reader.containers(labels={"app": value}) == [seen]
    for value in ("bbb", "ccc"):
        rec = writer.sandbox(sb.id).record()
        rec["config"] = dict(rec["config"], labels={"tier": value})
        writer.sandbox(sb.id)._write(rec)
        assert pod.status().config.labels == {"tier": value} == pod.config.labels
        assert reader.sandboxes(labels={"tier": value}) == [pod]
    # a change through the API: resources live in the config too
    c.start()
    seen.status()
    writer.container(c.id).update_resources(pycri.Resources(cpu_shares=512))
    assert seen.status().config.resources.cpu_shares == 512


def test_pod_state_and_membership_seen_by_a_warm_reader(two):
    reader, writer, ref = two
    sb = writer.run_sandbox(pycri.SandboxConfig(name="p", uid=uuid.uuid4().hex))
    other = writer.run_sandbox(pycri.SandboxConfig(name="q", uid=uuid.uuid4().hex))
    pod = reader.sandbox(sb.id)
    assert pod.status().state == "ready" and pod.containers() == []
    a = _container(writer, sb, ref, ["sleep", "100"])
    b = _container(writer, other, ref, ["sleep", "100"])
    assert pod.containers() == [reader.container(a.id)]
    assert reader.sandbox(other.id).containers() == [reader.container(b.id)]
    writer.container(a.id).remove()
    assert pod.containers() == []
    assert reader.containers(sandbox_id=other.id) == [reader.container(b.id)]
    c = _container(writer, sb, ref, ["sleep", "100"])
    assert pod.containers() == [reader.container(c.id)]
    writer.sandbox(sb.id).stop()
    assert pod.status().state == "notready" and pod.state == "notready"
    assert reader.container(c.id).status().state == "exited"
    writer.sandbox(sb.id).remove()
    with pytest.raises(NotFoundError):
        pod.status()
    with pytest.raises(NotFoundError):
        reader.container(c.id).status()
    assert reader.containers(sandbox_id=sb.id) == []


def test_cri_status_after_changes_by_another_runtime(two):
    """The same through the CRI server's handlers: its Runtime is the warm reader."""
    from pycri.cri import server as srv
    from pycri.cri._gen import api_pb2

    reader, writer, ref = two
    opts = srv.ServerOptions(listen="unix:///unused", root=reader.root, state=reader.state,
                             cni_conf_dir="")
    rs, ims = srv.RuntimeService(reader, opts), srv.ImageService(reader, opts)
    sb = writer.run_sandbox(pycri.SandboxConfig(name="p", uid=uuid.uuid4().hex))
    c = _container(writer, sb, ref, ["sleep", "100"])
    c.start()

    def status():
        return rs.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=c.id,
                                                                 verbose=True), None)

    def pod_status():
        return rs.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sb.id,
                                                                   verbose=True), None)

    assert status().status.state == api_pb2.CONTAINER_RUNNING
    assert '"pid": 0' not in status().info["info"]
    # the verbose documents are json.dumps of these dicts, to the byte
    st, pst = reader.container(c.id).status(), reader.sandbox(sb.id).status()
    for _ in range(2):  # (the second time from the remembered config text)
        assert status().info["info"] == json.dumps(
            {"sandboxID": sb.id, "pid": st.pid, "config": to_json(st.config),
             "logPath": st.log_path}, sort_keys=True)
        assert pod_status().info["info"] == json.dumps(
            {"config": to_json(pst.config), "netns": pst.netns_path, "containers": [c.id]},
            sort_keys=True)
    assert [s.state for s in pod_status().containers_statuses] == [api_pb2.CONTAINER_RUNNING]
    writer.container(c.id).stop(timeout=0)
    st = status()
    assert st.status.state == api_pb2.CONTAINER_EXITED and st.status.exit_code == 137
    assert '"pid": 0' in st.info["info"]
    assert [s.state for s in pod_status().containers_statuses] == [api_pb2.CONTAINER_EXITED]
    writer.sandbox(sb.id).stop()
    assert pod_status().status.state == api_pb2.SANDBOX_NOTREADY
    spec = api_pb2.ImageSpec(image=ref)
    first = ims.ImageStatus(api_pb2.ImageStatusRequest(image=spec), None).image
    assert first.id and list(first.repo_tags) == [ref]
    assert [list(i.repo_tags) for i in ims.ListImages(api_pb2.ListImagesRequest(), None).images] \
        == [[ref]]
    writer.images.tag(ref, "example.test/again:2")  # names change: new messages
    tags = sorted([ref, "example.test/again:2"])
    assert list(ims.ImageStatus(api_pb2.ImageStatusRequest(image=spec), None).image.repo_tags) \
        == tags
    assert [list(i.repo_tags) for i in ims.ListImages(api_pb2.ListImagesRequest(), None).images] \
        == [tags]
    writer.images.remove("example.test/again:2", collect=False)  # (that name only)
    assert [list(i.repo_tags) for i in ims.ListImages(api_pb2.ListImagesRequest(), None).images] \
        == [[ref]]
    writer.sandbox(sb.id).remove()
    writer.images.remove(ref)
    assert not ims.ImageStatus(api_pb2.ImageStatusRequest(image=spec), None).HasField("image")
    assert list(ims.ListImages(api_pb2.ListImagesRequest(), None).images) == []
    deadline = time.monotonic() + 5
    while reader.containers():  # removed: gone for the reader at once
        assert time.monotonic() < deadline
        time.sleep(0.05)
