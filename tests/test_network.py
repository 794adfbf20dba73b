"""CNI pod networking with Debian's real plugins in namespaces the test creates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

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


def fake_plugins(tmp_path, log):
    """A main plugin answering with a fixed result and a 'portmap' that only logs:
    real processes, so the test sees exactly which plugin ran with what."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.9.8.7/24"}]}
    (bindir / "first").write_text(
        "#!/bin/sh\n"
        f"echo \"first $CNI_COMMAND\" >> {log}\n"
        f"cat > /dev/null; echo '{json.dumps(result)}'\n")
    (bindir / "portmap").write_text(
        "#!/bin/sh\n"
        f"cat > {tmp_path}/portmap-in.json\n"
        f"echo \"portmap $CNI_COMMAND\" >> {log}\n"
        f"python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))[\"prevResult\"]))' "
        f"{tmp_path}/portmap-in.json\n")
    for p in bindir.iterdir():
        p.chmod(0o755)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "fake",
        "plugins": [{"type": "first"},
                    {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    return CNI(str(conf_dir), (str(bindir),))


def test_portmap_runs_only_for_pods_with_ports(tmp_path, netns):
    from pycri.config import PortMapping

    log = tmp_path / "calls"
    cni = fake_plugins(tmp_path, log)
    cache = str(tmp_path / "c.json")
    res = cni.setup("sb", netns, cache)
    assert res.ips == ("10.9.8.7",)
    cni.teardown("sb", netns, cache)
    assert log.read_text().split("\n")[:-1] == ["first ADD", "first DEL"]
    log.write_text("")
    ports = (PortMapping(container_port=80, host_port=18080),)
    res = cni.setup("sb", netns, cache, ports=ports)
    assert res.ips == ("10.9.8.7",)
    sent = json.loads((tmp_path / "portmap-in.json").read_text())
    assert sent["runtimeConfig"]["portMappings"][0]["hostPort"] == 18080
    cni.teardown("sb", netns, cache)
    assert log.read_text().split("\n")[:-1] == ["first ADD", "portmap ADD", "portmap DEL",
                                                "first DEL"]


def test_config_reread_when_changed(tmp_path):
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    cni = CNI(str(conf_dir), (PLUGINS,))
    assert cni.network()["name"] == "pycri"  # built-in while the dir is empty
    f = conf_dir / "20-b.conf"
    f.write_text(json.dumps({"cniVersion": "1.0.0", "name": "b", "type": "bridge"}))
    assert cni.network()["name"] == "b"
    assert cni.network() is cni.network()  # parsed once while unchanged
    f.write_text(json.dumps({"cniVersion": "1.0.0", "name": "b2", "type": "bridge"}))
    assert cni.network()["name"] == "b2"  # edited in place
    (conf_dir / "10-a.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "bridge"}]}))
    assert cni.network()["name"] == "a"  # a new file that sorts first
    (conf_dir / "10-a.conflist").unlink()
    assert cni.network()["name"] == "b2"


def test_plugin_io_timeout_and_errors(tmp_path, monkeypatch):
    from pycri import network

    big = tmp_path / "big"  # reads a large config, answers with a large result
    big.write_text("#!/bin/sh\nwc -c >&2\nhead -c 300000 /dev/zero | tr '\\0' x\n")
    big.chmod(0o755)
    stdin = b"y" * 500000  # both well past a pipe's 64 KiB
    rc, out, err = network._run(str(big), stdin, {"PATH": "/usr/bin:/bin"}, 10)
    assert rc == 0 and out == b"x" * 300000 and err.strip() == b"500000"
    deaf = tmp_path / "deaf"  # exits without reading what it is sent
    deaf.write_text("#!/bin/sh\necho nope >&2\nexit 3\n")
    deaf.chmod(0o755)
    assert network._run(str(deaf), stdin, {}, 10) == (3, b"", b"nope\n")
    hang = tmp_path / "hang"
    hang.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 600\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        network._run(str(hang), b"{}", {}, 0.5)
    assert time.monotonic() - t0 < 5
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
