"""CNI pod networking with Debian's real plugins in namespaces the test creates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pycri import _native
from pycri.errors import RuntimeFailure
from pycri.network import CNI

PLUGINS = "/usr/lib/cni"


def conflist(tmp_path, bridge="pycritest0", subnet="10.213.7.0/24"):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pycri-test",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "dataDir": str(tmp_path / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
        ]}))
    return str(conf_dir)


@pytest.fixture
def netns(tmp_path):
    path = str(tmp_path / "netns")
    open(path, "w").close()
    _native.ns_pin(_native.PIN_NET, path, None, None)
    yield path
    _native.ns_unpin(path)


@pytest.fixture
def bridge():
    yield "pycritest0"
    subprocess.run(["ip", "link", "del", "pycritest0"], capture_output=True)


def in_ns(netns, *cmd):
    return subprocess.run(["nsenter", f"--net={netns}", *cmd], capture_output=True, text=True,
                          check=True).stdout


def test_bridge_add_del(tmp_path, netns, bridge):
    cni = CNI(conflist(tmp_path, bridge), (PLUGINS,))
    assert cni.status() == (True, "")
    cache = str(tmp_path / "cni.json")
    res = cni.setup("sb1", netns, cache, name="pod", namespace="default", uid="u1")
    assert res.ip.startswith("10.213.7.")
    assert f"inet {res.ip}/24" in in_ns(netns, "ip", "-o", "addr", "show", "eth0")
    # traffic only to the namespace this test made: the host reaches the pod over the bridge
    server = subprocess.Popen(
        ["nsenter", f"--net={netns}", sys.executable, "-c",
         "import socket; s=socket.create_server(('0.0.0.0', 8080)); print('up', flush=True); "
         "c,_=s.accept(); c.sendall(b'pod says hi'); c.close()"],
        stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    with socket.create_connection((res.ip, 8080), timeout=5) as c:
        assert c.recv(100) == b"pod says hi"
    server.wait(5)
    cni.teardown("sb1", netns, cache)
    assert "eth0" not in in_ns(netns, "ip", "-o", "link")
    assert not os.path.exists(cache)
    cni.teardown("sb1", netns, cache)  # idempotent


def test_missing_plugin_and_bad_config(tmp_path, netns):
    conf_dir = tmp_path / "d"
    conf_dir.mkdir()
    (conf_dir / "a.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "x",
                                                 "type": "no-such-plugin"}))
    cni = CNI(str(conf_dir), (PLUGINS,))
    ready, reason = cni.status()
    assert not ready and "no-such-plugin" in reason
    with pytest.raises(RuntimeFailure, match="not found"):
        cni.setup("sb", netns, str(tmp_path / "c.json"))
    (conf_dir / "a.conf").write_text("{not json")
    assert cni.status()[0] is False


def test_plugin_error_is_reported_and_undone(tmp_path, netns, bridge):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "t",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "ipam": {"type": "host-local",
             "ranges": [[{"subnet": "10.213.8.0/24"}]], "dataDir": str(tmp_path / "ipam")}},
            {"type": "host-local"},  # an IPAM plugin used as a chained plugin: it fails
        ]}))
    cni = CNI(str(conf_dir), (PLUGINS,))
    with pytest.raises(RuntimeFailure, match="host-local ADD failed"):
        cni.setup("sb2", netns, str(tmp_path / "c.json"))
    assert "eth0" not in in_ns(netns, "ip", "-o", "link")
    assert not os.path.exists(tmp_path / "c.json")
