"""CNI pod networking with Debian's real plugins in namespaces the test creates."""

from __future__ import annotations

import contextlib
import json
import os
import signal
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


# -- teardown without the namespace (pycri/network.py docstring) ----------------------------


@pytest.fixture
def cg_parent():
    import uuid

    import pycri

    parent = "pycri-test-" + uuid.uuid4().hex[:8]
    yield parent
    pycri.cgroup.CgroupManager(parent).remove_parent()


@pytest.fixture
def pod_net(tmp_path, tmp_root, cg_parent):
    """make(bridge, subnet, **bridge options) -> (Runtime, conf dir, bin dir, bridge log),
    for a network made by pod_network; whatever the test leaves is removed after it."""
    import pycri

    made: list = []

    def make(bridge, subnet, **opts):
        conf, bins, log = pod_network(tmp_path, bridge, subnet, **opts)
        rt = pycri.Runtime(root=tmp_root[0], state=tmp_root[1], cgroup_parent=cg_parent,
                           cni_conf_dir=conf, cni_bin_dirs=(bins, PLUGINS))
        made.append((rt, bridge))
        return rt, conf, bins, log

    yield make
    for rt, bridge in made:
        for sb in rt.sandboxes():
            with contextlib.suppress(Exception):
                sb.remove()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def pod_network(tmp_path, bridge, subnet, **bridge_opts):
    """A conf dir for a bridge + portmap network, and a bin dir whose ``bridge`` logs
    each call's command and CNI_NETNS, then execs the real plugin; (conf, bins, log)."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pycri-td",
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, **bridge_opts,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                      "dataDir": str(tmp_path / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    bins = tmp_path / "bin"
    bins.mkdir()
    log = tmp_path / "bridge.log"
    hang = tmp_path / "hang-next-del"  # if present: the next DEL removes it, logs, hangs
    line = f'echo "$CNI_COMMAND netns=$CNI_NETNS" >> {log}'
    (bins / "bridge").write_text(
        "#!/bin/sh\n"
        f'if [ "$CNI_COMMAND" = DEL ] && [ -e {hang} ]; then rm {hang}; {line}; exec sleep 600; fi\n'
        f"{line}\nexec {PLUGINS}/bridge\n")
    (bins / "bridge").chmod(0o755)
    return str(conf_dir), str(bins), log


def host_veth(sb):
    with open(os.path.join(sb.state_dir, "cni.json")) as f:
        cached = json.load(f)
    bridge = cached["network"]["plugins"][0]["bridge"]
    names = [i["name"] for i in cached["result"]["interfaces"]
             if not i.get("sandbox") and i["name"] != bridge]
    assert len(names) == 1
    return names[0]


def link_exists(name):
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def wait_until(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def lease(tmp_path, ip):
    return tmp_path / "ipam" / "pycri-td" / ip


def test_netns_free_allowlist():
    from pycri.network import BUILTIN_NETWORK, netns_free

    def net(*plugins):
        return {"plugins": list(plugins)}

    bridge = {"type": "bridge", "bridge": "b0", "isGateway": True, "hairpinMode": True,
              "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}]]}}
    assert netns_free(net(bridge, {"type": "portmap", "capabilities": {"portMappings": True}}))
    assert netns_free(net({"type": "loopback"}, bridge, {"type": "portmap"}))
    assert netns_free(net({**bridge, "ipMasq": False, "macspoofchk": False}))
    assert netns_free(net({**bridge, "ipam": {"type": "static"}}))
    assert netns_free(net({"type": "bridge", "bridge": "b0"}))  # layer 2: no IPAM at all
    # DEL needs the namespace to find what to remove: masquerade, spoof-check rules
    assert not netns_free(net({**bridge, "ipMasq": True}))
    assert not netns_free(net({**bridge, "ipMasq": "false"}))  # not false: not ours to guess
    assert not netns_free(net({**bridge, "macspoofchk": True}))
    assert not netns_free(BUILTIN_NETWORK)  # the built-in network masquerades
    # IPAM or plugins not known to be namespace-free, options not known at all
    assert not netns_free(net({**bridge, "ipam": {"type": "dhcp"}}))
    assert not netns_free(net(bridge, {"type": "tuning"}))
    assert not netns_free(net({"type": "ptp", "ipam": {"type": "host-local"}}))
    assert not netns_free(net({**bridge, "someNewOption": True}))
    assert not netns_free(net()) and not netns_free({})


def test_stop_frees_netns_before_del(tmp_path, pod_net, monkeypatch):
    """The default bridge network: the namespace goes first, DEL gets an empty CNI_NETNS,
    the kernel takes the veth and host-local's lease is released."""
    import pycri
    from pycri import network

    # far off, so what removes the veth below is the kernel, not the leftover check
    monkeypatch.setattr(network, "LEFTOVER_CHECK_S", 600.0)
    rt, _, _, log = pod_net("pycritd1", "10.213.21.0/24")
    sb = rt.run_sandbox(pycri.SandboxConfig(name="fast"))
    veth, netns = host_veth(sb), sb.ns_path("net")
    assert link_exists(veth) and lease(tmp_path, sb.ip).exists()
    assert sb.status().netns_path == netns
    sb.stop()
    assert log.read_text().splitlines() == [f"ADD netns={netns}", "DEL netns="]
    assert wait_until(lambda: not link_exists(veth), 10), "the kernel kept the veth"
    assert not lease(tmp_path, sb.ip).exists()
    assert not os.path.exists(netns) and not os.path.exists(sb.state_dir + "/cni.json")
    st = sb.status()
    assert st.state == "notready" and st.netns_path == ""
    sb.stop()  # idempotent: nothing left to DEL
    assert log.read_text().count("DEL") == 1
    sb.remove()
    assert not os.path.exists(sb.state_dir)


def test_masquerading_network_keeps_del_with_netns(tmp_path, pod_net):
    """ipMasq: bridge's DEL reads the pod's addresses in the namespace to find its NAT
    rules, so it runs with the namespace, and the rules are gone after stop."""
    import pycri

    rt, _, _, log = pod_net("pycritd2", "10.213.22.0/24", ipMasq=True)

    def nat_rules(sid):
        out = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True,
                             check=True).stdout
        return [line for line in out.splitlines() if sid in line]

    sb = None
    try:
        sb = rt.run_sandbox(pycri.SandboxConfig(name="masq"))
        veth, netns = host_veth(sb), sb.ns_path("net")
        assert nat_rules(sb.id), "ADD made no masquerade rule to check"
        sb.stop()
        assert log.read_text().splitlines()[-1] == f"DEL netns={netns}"
        assert nat_rules(sb.id) == []
        assert not link_exists(veth)  # deleted by the plugin, before stop returned
        assert not lease(tmp_path, sb.ip).exists()
        # the namespace stays until remove, as before
        assert os.path.exists(netns) and sb.status().netns_path == netns
        sb.remove()
        assert not os.path.exists(netns)
    finally:
        if sb is not None:
            for rule in nat_rules(sb.id):  # a failed run must not leave NAT rules behind
                subprocess.run(["iptables", "-t", "nat", *rule.replace("-A ", "-D ", 1).split()],
                               capture_output=True)


def test_held_netns_veth_removed_later(tmp_path, pod_net, monkeypatch):
    """A process still in the freed namespace keeps it, and with it the veth on the
    bridge: the check scheduled by the teardown deletes the veth."""
    import pycri
    from pycri import network

    monkeypatch.setattr(network, "LEFTOVER_CHECK_S", 1.0)
    rt, _, _, _ = pod_net("pycritd3", "10.213.23.0/24")
    holder = None
    try:
        sb = rt.run_sandbox(pycri.SandboxConfig(name="held"))
        veth = host_veth(sb)
        holder = subprocess.Popen(["nsenter", f"--net={sb.ns_path('net')}", "sleep", "600"])
        assert wait_until(lambda: os.path.exists(f"/proc/{holder.pid}/ns/net") and os.stat(
            f"/proc/{holder.pid}/ns/net").st_ino == _native.ns_inode(sb.ns_path("net")), 10)
        t0 = time.monotonic()
        sb.stop()
        time.sleep(0.4)
        assert time.monotonic() - t0 < network.LEFTOVER_CHECK_S
        assert link_exists(veth), "the namespace was not held: this test shows nothing"
        # the check leaves alone what does not match the ADD result
        network._remove_leftovers([(veth, "02:00:00:00:00:01")], 0)
        assert link_exists(veth)
        assert wait_until(lambda: not link_exists(veth), 10), "the leftover veth stayed"
        # the namespace itself lives on (its holder is there), now without the pod's eth0
        links = subprocess.run(["nsenter", "-t", str(holder.pid), "-n", "ip", "-o", "link"],
                               capture_output=True, text=True, check=True).stdout
        assert "lo" in links and "eth0" not in links
        assert not lease(tmp_path, sb.ip).exists()
        sb.remove()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_killed_between_unpin_and_del_is_finished_later(tmp_path, tmp_root, cg_parent,
                                                         pod_net):
    """SIGKILL a stop while bridge DEL runs (namespace already unpinned): a new Runtime's
    stop runs DEL again without the namespace, and remove completes."""
    import pycri

    rt, conf, bins, log = pod_net("pycritd4", "10.213.24.0/24")
    root, state = tmp_root
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sb = rt.run_sandbox(pycri.SandboxConfig(name="killed"))
    veth, ip = host_veth(sb), sb.ip
    (tmp_path / "hang-next-del").touch()
    script = f"""
import sys; sys.path.insert(0, {tree!r})
import pycri
rt = pycri.Runtime(root={root!r}, state={state!r}, cgroup_parent={cg_parent!r},
                   cni_conf_dir={conf!r}, cni_bin_dirs=({bins!r}, {PLUGINS!r}))
rt.sandbox({sb.id!r}).stop()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        assert wait_until(lambda: "DEL" in log.read_text() or proc.poll() is not None, 30)
        assert proc.poll() is None and not (tmp_path / "hang-next-del").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(sb.ns_path("net"))  # unpinned, DEL not finished
    assert os.path.exists(os.path.join(sb.state_dir, "cni.json"))
    assert lease(tmp_path, ip).exists() and sb.state == "ready"
    rt2 = pycri.Runtime(root=root, state=state, cgroup_parent=cg_parent, cni_conf_dir=conf,
                        cni_bin_dirs=(bins, PLUGINS))
    sb2 = rt2.sandbox(sb.id)
    assert sb2.status().state == "ready"  # status does not trip on the missing netns
    sb2.stop()
    assert log.read_text().splitlines()[-2:] == ["DEL netns=", "DEL netns="]
    assert not lease(tmp_path, ip).exists()
    assert wait_until(lambda: not link_exists(veth), 10)
    assert sb2.status().state == "notready"
    sb2.remove()
    assert rt2.sandboxes() == []
