"""Sandboxes with real namespaces, cgroups and CNI; crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import pycri
from pycri import _native
from pycri.errors import AlreadyExistsError, NotFoundError

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


@pytest.fixture
def cg_parent():
    parent = "pycri-test-" + uuid.uuid4().hex[:8]
    yield parent
    rt_cg = pycri.cgroup.CgroupManager(parent)
    rt_cg.remove_parent()


@pytest.fixture
def rt(tmp_root, cg_parent):
    root, state = tmp_root
    return pycri.Runtime(root=root, state=state, cgroup_parent=cg_parent)


def mounts_under(path):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if path in line]


def cgroup_dirs(parent, sid):
    return [d for d in (f"/sys/fs/cgroup/{c}/{parent}/{sid}" for c in ("memory", "pids", "cpu"))
            if os.path.isdir(d)]


def in_ns(sb, *cmd):
    return subprocess.run(["nsenter", f"--net={sb.ns_path('net')}", f"--uts={sb.ns_path('uts')}",
                           f"--ipc={sb.ns_path('ipc')}", *cmd],
                          capture_output=True, text=True, check=True).stdout


def test_sandbox_lifecycle(rt, cg_parent):
    sb = rt.run_sandbox(pycri.SandboxConfig(name="demo", hostname="demo-host",
                                            sysctls={"net.ipv4.ip_unprivileged_port_start": "80"},
                                            labels={"app": "x"}))
    assert sb.state == "ready" and sb.ip == ""
    for kind in ("net", "ipc", "uts"):
        assert _native.ns_inode(sb.ns_path(kind)) != _native.ns_inode(f"/proc/self/ns/{kind}")
    out = in_ns(sb, "sh", "-c", "hostname; cat /proc/sys/net/ipv4/ip_unprivileged_port_start")
    assert out.split() == ["demo-host", "80"]
    assert cgroup_dirs(cg_parent, sb.id)
    with open(sb.etc_file("hosts")) as f:
        assert "demo-host" in f.read()
    # a new Runtime on the same dirs sees it
    rt2 = pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=cg_parent)
    assert [s.id for s in rt2.sandboxes()] == [sb.id]
    assert rt2.sandbox(sb.id[:10]).config.hostname == "demo-host"
    assert [s.id for s in rt2.sandboxes(labels={"app": "x"})] == [sb.id]
    assert rt2.sandboxes(labels={"app": "y"}) == []
    sb.stop()
    assert sb.state == "notready"
    sb.stop()
    sb.remove()
    assert not mounts_under(rt.state)
    assert not cgroup_dirs(cg_parent, sb.id)
    assert not os.path.exists(sb.state_dir) and not os.path.exists(sb.record_dir)
    sb.remove()  # idempotent
    with pytest.raises(NotFoundError):
        rt.sandbox(sb.id)


def test_context_manager_and_duplicates(rt):
    with rt.run_sandbox(pycri.SandboxConfig(name="p1")) as sb:
        with pytest.raises(AlreadyExistsError):
            rt.run_sandbox(pycri.SandboxConfig(name="p1"))
        other = rt.run_sandbox(pycri.SandboxConfig(name="p1", attempt=1))
        other.remove()
    assert rt.sandboxes() == []
    assert not mounts_under(rt.state)
    assert sb not in rt.sandboxes()


def test_host_network(rt):
    with rt.run_sandbox(pycri.SandboxConfig(name="hostnet", network="node", ipc="node")) as sb:
        assert not os.path.exists(sb.ns_path("net"))
        assert sb.status().netns_path == ""


def write_conflist(tmp_path, bridge, subnet):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "10.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pycri-sb-test",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(tmp_path / "ipam")}}]}))
    return str(conf_dir)


def test_cni_sandbox(tmp_root, tmp_path, cg_parent):
    root, state = tmp_root
    conf = write_conflist(tmp_path, "pycrisb0", "10.213.9.0/24")
    rt = pycri.Runtime(root=root, state=state, cgroup_parent=cg_parent, cni_conf_dir=conf)
    try:
        sb = rt.run_sandbox(pycri.SandboxConfig(name="net"))
        assert sb.ip.startswith("10.213.9.")
        assert f"inet {sb.ip}/24" in in_ns(sb, "ip", "-o", "addr")
        sb.stop()
        # this network's DEL needs nothing inside the namespace: it went first
        # (tests/test_network.py follows the veth and the address)
        assert not os.path.exists(sb.ns_path("net")) and sb.status().netns_path == ""
        sb.remove()
    finally:
        subprocess.run(["ip", "link", "del", "pycrisb0"], capture_output=True)


def test_kill_during_create_is_recovered(tmp_root, tmp_path, cg_parent):
    """SIGKILL the creating process while a CNI plugin runs; a new Runtime cleans up."""
    root, state = tmp_root
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marker = tmp_path / "in-plugin"
    plugin = bindir / "slowplugin"
    plugin.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 600\n")
    plugin.chmod(0o755)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "1.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "slow",
                                                 "type": "slowplugin"}))
    script = f"""
import sys; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={root!r}, state={state!r}, cgroup_parent={cg_parent!r},
                   cni_conf_dir={str(conf_dir)!r}, cni_bin_dirs=({str(bindir)!r},))
rt.run_sandbox(pycri.SandboxConfig(name="doomed"))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30

    def made() -> bool:  # the plugin runs while the rest of the pod is being made
        sdir = os.path.join(root, "sandboxes")
        sids = os.listdir(sdir) if os.path.isdir(sdir) else []
        return marker.exists() and bool(sids) and bool(cgroup_dirs(cg_parent, sids[0]))

    while not made():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sid = os.listdir(os.path.join(root, "sandboxes"))[0]
    assert mounts_under(state) and cgroup_dirs(cg_parent, sid)
    rt = pycri.Runtime(root=root, state=state, cgroup_parent=cg_parent)
    assert rt.sandboxes() == []
    assert not mounts_under(state)
    assert not cgroup_dirs(cg_parent, sid)



def test_pid_holder_is_execd_by_fd(rt, tmp_path):
    """pycri-pause is exec'd through /proc/self/fd, so the mapped root of a
    user-namespaced pod needs no way through the directories pycri is installed in."""
    sb = rt.run_sandbox(pycri.SandboxConfig(name="pidholder", pid="pod"))
    try:
        pid = sb.record()["infra_pid"]
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe == os.path.join(os.path.dirname(os.path.abspath(pycri.__file__)),
                                   "pycri-pause")
        assert open(f"/proc/{pid}/cmdline", "rb").read() == b"pycri-pause\0"
    finally:
        sb.remove()


def test_pid_holder_counts_in_the_pods_cgroup(rt):
    """The pod's pid 1 lives in the pod's cgroup in every v1 hierarchy (its memory
    and pids are the pod's, not the caller's) and in a leaf of it in the v2 one
    (no process beside child cgroups there); both go with the pod."""
    sb = rt.run_sandbox(pycri.SandboxConfig(name="pidcg", pid="pod"))
    try:
        pid = sb.record()["infra_pid"]
        with open(f"/proc/{pid}/cgroup") as f:
            lines = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
        for ctl in ("memory", "pids", "cpu", "freezer"):
            assert lines[ctl].endswith(f"/{rt.cgroup_parent}/{sb.id}"), lines
        if os.path.isdir(f"/sys/fs/cgroup/unified/{rt.cgroup_parent}/{sb.id}"):
            assert lines[""].endswith(f"/{rt.cgroup_parent}/{sb.id}/{sb.id}"), lines
        procs = f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}/cgroup.procs"
        assert open(procs).read().split() == [str(pid)]
    finally:
        sb.remove()
    assert not os.path.exists(f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}")
    assert not os.path.exists(f"/sys/fs/cgroup/unified/{rt.cgroup_parent}/{sb.id}")
