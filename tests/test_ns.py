"""Pinned pod namespaces (csrc/ns.c): real namespaces, real mounts."""

from __future__ import annotations

import os
import subprocess

import pytest

from pycri import _native
from pycri.errors import InvalidArgumentError


def mounts_under(d):
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if d in line]


@pytest.fixture
def nsdir(tmp_path):
    paths = {k: str(tmp_path / k) for k in ("net", "ipc", "uts")}
    for p in paths.values():
        open(p, "w").close()
    yield paths
    for p in paths.values():
        _native.ns_unpin(p)
    assert not mounts_under(str(tmp_path))


def test_pin_and_enter(nsdir):
    _native.ns_pin(_native.PIN_NET | _native.PIN_IPC | _native.PIN_UTS, nsdir["net"], nsdir["ipc"],
                   nsdir["uts"], "podhost", {"net.ipv4.ip_unprivileged_port_start": "81",
                                             "kernel.shmmni": "1234"})
    for kind in ("net", "ipc", "uts"):
        assert _native.ns_inode(nsdir[kind]) != _native.ns_inode(f"/proc/self/ns/{kind}")
    out = subprocess.run(
        ["nsenter", f"--net={nsdir['net']}", f"--ipc={nsdir['ipc']}", f"--uts={nsdir['uts']}",
         "sh", "-c", "hostname; ip -o link | grep -c UP; cat /proc/sys/net/ipv4/ip_unprivileged_port_start "
         "/proc/sys/kernel/shmmni; ip -o link | cut -d: -f2"],
        capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "podhost"
    assert out[1] == "1"  # lo is up
    assert out[2:4] == ["81", "1234"]
    assert out[4:] == ["lo"]
    with open("/proc/sys/kernel/shmmni") as f:
        assert f.read().strip() != "1234"  # the host's value is untouched


def test_host_sysctl_refused_before_any_change(nsdir):
    before = open("/proc/sys/kernel/core_pattern").read()
    with pytest.raises(InvalidArgumentError):
        _native.ns_pin(_native.PIN_NET, nsdir["net"], None, None, "", {"kernel.core_pattern": "x"})
    assert open("/proc/sys/kernel/core_pattern").read() == before
    assert not mounts_under(os.path.dirname(nsdir["net"]))


def test_failure_leaves_no_pin(nsdir):
    with pytest.raises(OSError) as ei:
        _native.ns_pin(_native.PIN_NET, nsdir["net"], None, None, "",
                       {"net.ipv4.no_such_knob": "1"})
    assert "sysctl" in str(ei.value)
    assert not mounts_under(os.path.dirname(nsdir["net"]))


def test_unpin_is_idempotent(tmp_path):
    p = str(tmp_path / "never-pinned")
    _native.ns_unpin(p)
    _native.ns_unpin(p)


def test_connect_inside_a_pinned_netns(nsdir):
    import socket
    import sys

    _native.ns_pin(_native.PIN_NET, nsdir["net"], None, None)
    host_net = _native.ns_inode("/proc/thread-self/ns/net")
    server = subprocess.Popen(
        ["nsenter", f"--net={nsdir['net']}", sys.executable, "-c",
         "import socket; s=socket.create_server(('127.0.0.1', 7777)); print('up', flush=True); "
         "c,_=s.accept(); c.sendall(c.recv(100).upper()); c.close()"],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    fd = _native.ns_connect(nsdir["net"], 7777)
    with socket.socket(fileno=fd) as s:
        s.sendall(b"through the pod's loopback")
        assert s.recv(100) == b"THROUGH THE POD'S LOOPBACK"
    server.wait(5)
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the host's view of it
        _native.ns_connect(nsdir["net"], 7778)
    # the calling thread stayed in the host's network namespace
    assert _native.ns_inode("/proc/thread-self/ns/net") == host_net


def _owner_ino(path):
    """Inode of the user namespace that owns the namespace at path (NS_GET_USERNS)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        owner = fcntl.ioctl(fd, 0xB701)
        try:
            return os.fstat(owner).st_ino
        finally:
            os.close(owner)
    finally:
        os.close(fd)


@pytest.fixture
def usernsdir(nsdir, tmp_path):
    nsdir["user"] = str(tmp_path / "user")
    open(nsdir["user"], "w").close()
    return nsdir


MAP = ((0, 400000, 65536), (0, 400000, 65536))


def test_pin_in_a_user_namespace_owns_the_others(usernsdir):
    d = usernsdir
    _native.ns_pin(_native.PIN_NET | _native.PIN_IPC | _native.PIN_UTS, d["net"], d["ipc"],
                   d["uts"], "podhost", {"kernel.shmmni": "777", "kernel.domainname": "dom",
                                         "net.ipv4.ip_unprivileged_port_start": "82"},
                   user=d["user"], idmap=MAP)
    user = _native.ns_inode(d["user"])
    assert user != _native.ns_inode("/proc/self/ns/user")
    for kind in ("net", "ipc", "uts"):
        assert _owner_ino(d[kind]) == user, kind
    out = subprocess.run(
        ["nsenter", f"--user={d['user']}", f"--net={d['net']}", f"--ipc={d['ipc']}",
         f"--uts={d['uts']}", "sh", "-c",
         "cat /proc/self/uid_map /proc/self/gid_map; hostname; domainname; "
         "cat /proc/sys/kernel/shmmni /proc/sys/net/ipv4/ip_unprivileged_port_start"],
        capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "400000", "65536", "0", "400000", "65536", "podhost", "dom", "777", "82"]


def test_pin_in_a_user_namespace_failure_leaves_no_pin(usernsdir):
    d = usernsdir
    with pytest.raises(OSError, match="sysctl"):
        _native.ns_pin(_native.PIN_NET, d["net"], None, None, "",
                       {"net.ipv4.no_such_knob": "1"}, user=d["user"], idmap=MAP)
    assert not mounts_under(os.path.dirname(d["net"]))
    with pytest.raises(OSError, match="id maps"):  # a host id range the kernel refuses
        _native.ns_pin(_native.PIN_NET, d["net"], None, None, "", user=d["user"],
                       idmap=((0, 2**32 - 10, 65536), (0, 400000, 65536)))
    assert not mounts_under(os.path.dirname(d["net"]))
