"""Pod networking through CNI plugins (the CNI 0.4/1.0 exec protocol).

A network config comes from the first ``*.conflist``/``*.conf``/``*.json`` in
the conf dir (by name), or a built-in bridge network when that dir has none.
ADD runs every plugin of the list in order, feeding each the previous result;
DEL runs them in reverse with the result cached at ADD time. Plugins are found
in the bin dirs; they run with a timeout and their errors come back as
RuntimeFailure with the plugin's own message.

Two things keep a pod's network setup and teardown cheap without changing what
they do. A parsed config is reused while the conf dir and its file are unchanged
(same names, inode, size and mtime). And a chained plugin whose only input is a
runtime capability the pod does not use is not executed: the reference
``portmap`` plugin, given no ``runtimeConfig.portMappings``, answers ADD with
its prevResult unchanged and DEL with nothing (every release since v0.9; older
ones made no rules for such a pod either), so running it costs a process start
and changes nothing. ``NOOP_WITHOUT`` names such plugins and the key.

Teardown without the namespace. Most of a bridge DEL's time is the kernel
removing the pod's veth: a synchronous link delete waits for RCU grace periods
(15-35 ms on a 2-CPU VM). When the pod's network namespace is freed instead,
the kernel removes the interfaces in it, and the veth's host end with them, in
its own time, and the caller does not wait. The CNI spec lets a runtime run DEL
with an empty CNI_NETNS once the namespace is gone, and the reference plugins
then release what lives outside it. That is only equivalent to a DEL with the
namespace for plugins whose DEL needs nothing from inside it, so ``teardown``
frees the namespace first (through the caller's ``release_netns``) only when
every plugin of the network recorded at ADD is one of these (``netns_free``):

* ``bridge`` with ``ipMasq`` and ``macspoofchk`` off and host-local, static or
  no IPAM. Its DEL with a namespace reads the pod's addresses from the veth to
  find the masquerade rules to remove, and removes the MAC spoof-check rules
  after it; without a namespace it releases the IPAM lease and nothing else, so
  either option on would leave rules behind. Options not known here
  (``BRIDGE_KEYS``) take the ordinary path too, in case a newer release ties
  something else to the namespace.
* ``portmap``: its DEL removes the pod's rules by container id, on the host.
* ``loopback``: its DEL only sets ``lo`` down inside the namespace.
* the IPAM plugins above: host-local releases by container id and interface
  name, static holds nothing.

Anything else keeps the ordinary order: DEL with the namespace, then the caller
unpins it. If something still holds the freed namespace (a socket a
port-forward opened in it, a process that joined it), the veth would stay on
the bridge; so the host ends listed in the ADD result are checked
``LEFTOVER_CHECK_S`` seconds later and deleted if they are still there (by
ifindex, after checking the link is still a bridge port with the recorded MAC).
Until then such a pod's released address could in principle be handed out
again; host-local hands out addresses round the whole range first.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import heapq
import ipaddress
import itertools
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycri import store
from pycri.config import PortMapping
from pycri.errors import InvalidArgumentError, RuntimeFailure

DEFAULT_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
DEFAULT_CONF_DIR = "/etc/cni/net.d"
PLUGIN_TIMEOUT = 60.0

BUILTIN_NETWORK = {
    "cniVersion": "1.0.0",
    "name": "pycri",
    "plugins": [
        {
            "type": "bridge", "bridge": "pycri0", "isGateway": True, "ipMasq": True,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.89.0.0/16"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}

# Chained plugins that do nothing unless the runtime hands them this runtimeConfig
# key (see the module docstring): plugin type -> runtimeConfig key.
NOOP_WITHOUT = {"portmap": "portMappings"}
_PIPE_READ = 1 << 16

# What a netns-free teardown allows (module docstring). BRIDGE_KEYS: the bridge
# plugin's options (releases up to v1.9) plus the keys every plugin conf may have;
# of them ipMasq and macspoofchk only when false.
BRIDGE_KEYS = frozenset({
    "type", "name", "cniVersion", "capabilities", "runtimeConfig", "args", "ipam", "dns",
    "bridge", "isGateway", "isDefaultGateway", "forceAddress", "ipMasq", "ipMasqBackend",
    "mtu", "hairpinMode", "promiscMode", "vlan", "vlanTrunk", "preserveDefaultVlan",
    "macspoofchk", "enabledad", "disableContainerInterface", "portIsolation"})
NETNS_FREE_PLUGINS = frozenset({"portmap", "loopback"})   # besides bridge
NETNS_FREE_IPAM = frozenset({"host-local", "static", ""})  # "": a layer-2 bridge
# how long after a netns-free teardown the host ends of the pod's veths are looked
# for (the kernel removes them within tens of ms unless the namespace is held)
LEFTOVER_CHECK_S = 2.0
# at interpreter exit, how long pending checks give the kernel before deleting
EXIT_GRACE_S = 0.25
_IFNAME_RE = re.compile(r"^[^/\s\x00:]{1,15}$")


@dataclass(frozen=True)
class NetworkResult:
    ips: tuple[str, ...]          # addresses without prefix length, IPv4 first
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.ips[0] if self.ips else ""


def _load_conf(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    try:
        conf = json.loads(data)
    except ValueError as e:
        raise InvalidArgumentError(f"CNI config {path}: not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise InvalidArgumentError(f"CNI config {path}: must be an object")
    if "plugins" not in conf:  # a single-plugin .conf: wrap it in a list
        conf = {"cniVersion": conf.get("cniVersion", "0.4.0"), "name": conf.get("name", "net"),
                "plugins": [conf]}
    if not isinstance(conf["plugins"], list) or not conf["plugins"] \
            or not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in conf["plugins"]):
        raise InvalidArgumentError(f"CNI config {path}: 'plugins' must list objects with a 'type'")
    return conf


class CNI:
    """Invokes CNI plugins for pod network setup and teardown."""

    def __init__(self, conf_dir: str = DEFAULT_CONF_DIR,
                 bin_dirs: tuple[str, ...] = DEFAULT_BIN_DIRS) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = tuple(bin_dirs)
        self._cache_lock = threading.Lock()
        self._cached: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def network(self) -> dict[str, Any]:
        """The network config in use: the first file in conf_dir, else the built-in bridge.

        The parse is kept while the file keeps its name, inode, size and mtime; an
        edit in place or a new file that sorts first is seen by the next call."""
        try:
            names = sorted(n for n in os.listdir(self.conf_dir)
                           if n.endswith((".conflist", ".conf", ".json")))
        except (FileNotFoundError, NotADirectoryError):
            return BUILTIN_NETWORK
        for name in names:
            path = os.path.join(self.conf_dir, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed since the listing
            key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._cache_lock:
                if self._cached is not None and self._cached[0] == key:
                    return self._cached[1]
            conf = _load_conf(path)
            with self._cache_lock:
                self._cached = (key, conf)
            return conf
        return BUILTIN_NETWORK

    def status(self) -> tuple[bool, str]:
        """(ready, reason) for the CRI's NetworkReady condition."""
        try:
            net = self.network()
        except InvalidArgumentError as e:
            return False, str(e)
        for p in net["plugins"]:
            if self._plugin(p["type"]) is None:
                return False, f"CNI plugin {p['type']!r} not found in {':'.join(self.bin_dirs)}"
        return True, ""

    def _plugin(self, kind: str) -> str | None:
        if "/" in kind or kind in (".", ".."):
            return None
        for d in self.bin_dirs:
            p = os.path.join(d, kind)
            if os.access(p, os.X_OK):
                return p
        return None

    def _exec(self, command: str, plugin_conf: dict[str, Any], net: dict[str, Any],
              container_id: str, netns: str, ifname: str, args: str) -> dict[str, Any]:
        kind = plugin_conf["type"]
        path = self._plugin(kind)
        if path is None:
            raise RuntimeFailure(f"CNI plugin {kind!r} not found in {':'.join(self.bin_dirs)}",
                                 stage="network")
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
            "CNI_IFNAME": ifname, "CNI_PATH": ":".join(self.bin_dirs), "CNI_ARGS": args,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        try:
            rc, stdout, stderr = _run(path, json.dumps(plugin_conf).encode(), env, PLUGIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"CNI plugin {kind} {command} timed out", stage="network") from None
        out: Any = None
        with contextlib.suppress(ValueError):
            out = json.loads(stdout or b"null")
        if rc != 0:
            msg = stderr.decode(errors="replace").strip()
            if isinstance(out, dict) and out.get("msg"):
                msg = f"{out['msg']}" + (f": {out['details']}" if out.get("details") else "")
            raise RuntimeFailure(f"CNI plugin {kind} {command} failed: {msg}", stage="network")
        return out if isinstance(out, dict) else {}

    def _plugin_conf(self, net: dict[str, Any], p: dict[str, Any], prev: dict[str, Any] | None,
                     ports: tuple[PortMapping, ...]) -> dict[str, Any]:
        conf = dict(p)
        conf["name"] = net.get("name", "net")
        conf["cniVersion"] = net.get("cniVersion", "1.0.0")
        if prev is not None:
            conf["prevResult"] = prev
        caps = p.get("capabilities") or {}
        if caps.get("portMappings") and ports:
            conf["runtimeConfig"] = {"portMappings": [
                {"hostPort": m.host_port, "containerPort": m.container_port,
                 "protocol": m.protocol, **({"hostIP": m.host_ip} if m.host_ip else {})}
                for m in ports if m.host_port]}
        return conf

    @staticmethod
    def _args(name: str, namespace: str, uid: str, container_id: str) -> str:
        return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}")

    def setup(self, container_id: str, netns: str, cache_file: str, *, name: str = "",
              namespace: str = "", uid: str = "", ports: tuple[PortMapping, ...] = (),
              ifname: str = "eth0") -> NetworkResult:
        """ADD the pod to the network; the result is cached in ``cache_file`` for DEL."""
        net = self.network()
        args = self._args(name, namespace, uid, container_id)
        prev: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        try:
            for p in net["plugins"]:
                conf = self._plugin_conf(net, p, prev, ports)
                if prev is not None and _noop(conf):
                    continue  # it would hand prev back unchanged
                prev = self._exec("ADD", conf, net, container_id, netns, ifname, args)
                done.append(p)
        except BaseException:
            # undo the plugins that did run, newest first
            for p in reversed(done):
                with contextlib.suppress(RuntimeFailure):
                    self._exec("DEL", self._plugin_conf(net, p, prev, ports), net, container_id,
                               netns, ifname, args)
            raise
        result = prev or {}
        # Not fsynced, like the sandbox record: the rename is atomic, so a killed
        # process never leaves a torn cache, and the state dir does not outlive a boot.
        store.write_json(cache_file, {"network": net, "result": result, "ifname": ifname,
                                      "args": args, "ports": [m.__dict__ for m in ports]},
                         sync=False)
        return NetworkResult(_ips(result), result)

    def teardown(self, container_id: str, netns: str, cache_file: str,
                 release_netns: Callable[[], None] | None = None) -> bool:
        """DEL the pod from the network it was added to; a missing cache means nothing to do.

        ``release_netns`` frees the pod's network namespace (the caller unpins it, with
        nothing of its own left in it). When given, and every plugin of the network
        recorded at ADD does the same DEL without the namespace (``netns_free``), it is
        called first, DEL runs with CNI_NETNS empty, a check for host veth ends left
        behind is scheduled, and True is returned. Otherwise DEL runs with ``netns``
        and the namespace is the caller's to free afterwards (False). A killed caller
        leaves the cache: a later teardown runs DEL again (a freed namespace is fine)."""
        try:
            cached = store.read_json(cache_file)
        except FileNotFoundError:
            return False
        net, result = cached["network"], cached.get("result")
        ports = tuple(PortMapping(**m) for m in cached.get("ports", []))
        released = release_netns is not None and netns_free(net)
        if released:
            assert release_netns is not None
            release_netns()
            netns = ""
            links = _host_links(net, result if isinstance(result, dict) else {})
            if links:
                _later.at(time.monotonic() + LEFTOVER_CHECK_S, lambda at_exit: _remove_leftovers(
                    links, EXIT_GRACE_S if at_exit else 0.0))
        errors = []
        for i, p in reversed(list(enumerate(net["plugins"]))):
            conf = self._plugin_conf(net, p, result, ports)
            if i > 0 and _noop(conf):
                continue  # skipped at ADD for the same reason: it made nothing
            try:
                self._exec("DEL", conf, net, container_id,
                           netns, cached.get("ifname", "eth0"), cached.get("args", ""))
            except RuntimeFailure as e:
                errors.append(str(e))
        if errors:
            raise RuntimeFailure("; ".join(errors), stage="network")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cache_file)
        return released


def netns_free(net: dict[str, Any]) -> bool:
    """Whether every plugin of ``net`` does the same DEL with an empty CNI_NETNS as with
    the pod's namespace (the allowlist in the module docstring)."""
    plugins = net.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        return False
    for p in plugins:
        if not isinstance(p, dict):
            return False
        kind = p.get("type")
        if kind in NETNS_FREE_PLUGINS:
            continue
        if kind != "bridge" or not BRIDGE_KEYS.issuperset(p):
            return False
        # anything but absent or false (a string "false" included) keeps the namespace
        if p.get("ipMasq", False) is not False or p.get("macspoofchk", False) is not False:
            return False
        ipam = p.get("ipam", {})
        if not isinstance(ipam, dict) or ipam.get("type", "") not in NETNS_FREE_IPAM:
            return False
    return True


def _host_links(net: dict[str, Any], result: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, MAC) of the host-side interfaces in an ADD result, the bridges left out:
    what a freed namespace takes with it unless someone still holds it."""
    bridges = {p.get("bridge") or "cni0" for p in net["plugins"] if p.get("type") == "bridge"}
    links = []
    for i in result.get("interfaces") or []:
        if not isinstance(i, dict) or i.get("sandbox"):
            continue
        name, mac = i.get("name"), i.get("mac")
        if isinstance(name, str) and _IFNAME_RE.match(name) and name not in bridges:
            links.append((name, mac.lower() if isinstance(mac, str) else ""))
    return links


def _remove_leftovers(links: list[tuple[str, str]], grace: float) -> None:
    """Delete each link that is still a veth on a bridge with the recorded MAC: its
    namespace is held by someone, so the kernel did not take it. ``grace``: seconds
    to give the kernel first (at exit the check may come early)."""
    deadline = time.monotonic() + grace
    for name, mac in links:
        while True:
            link = _get_link(name)
            if link is None or link.kind != "veth" or not link.master \
                    or (mac and link.mac != mac):
                break
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            try:
                _rtnl(_RTM_DELLINK, _NLM_F_ACK, link.index)
            except OSError as e:
                if e.errno != errno.ENODEV:   # (ENODEV: the kernel took it meanwhile)
                    raise
            break


# -- rtnetlink, just enough to find one link by name and delete it by index ---------
# (a socket of this process's network namespace, which is where the veth's host end
# is; /sys/class/net may show another one's when sysfs was not remounted after unshare)

_NLMSG_ERROR, _RTM_DELLINK, _RTM_GETLINK = 2, 17, 18
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MASTER, _IFLA_LINKINFO, _IFLA_INFO_KIND = 1, 3, 10, 18, 1


@dataclass(frozen=True)
class _Link:
    index: int
    mac: str
    kind: str
    master: int


def _rtnl(msg_type: int, flags: int, index: int, attrs: bytes = b"") -> bytes:
    """Send one link request (ifinfomsg + attributes); the answer's payload (empty for
    an acknowledgement). An error answer raises OSError with its errno."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + attrs
    head = struct.pack("=IHHII", 16 + len(body), msg_type, _NLM_F_REQUEST | flags, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as s:
        s.settimeout(10)
        s.sendto(head + body, (0, 0))
        reply = s.recv(1 << 16)
    length, rtype = struct.unpack_from("=IH", reply)
    if rtype == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, os.strerror(-code))
        return b""
    return reply[16:length]


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, off)
        if size < 4:
            break
        found[kind & 0x3FFF] = data[off + 4:off + size]   # (nested/byte-order flags off)
        off += (size + 3) & ~3
    return found


def _get_link(name: str) -> _Link | None:
    """The link called ``name`` in this network namespace, or None."""
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), _IFLA_IFNAME) + raw + b"\0" * (-len(raw) % 4)
    try:
        payload = _rtnl(_RTM_GETLINK, 0, 0, attr)
    except OSError as e:
        if e.errno == errno.ENODEV:
            return None
        raise
    if len(payload) < 16:
        return None
    (index,) = struct.unpack_from("=i", payload, 4)
    a = _attrs(payload[16:])
    info = _attrs(a.get(_IFLA_LINKINFO, b""))
    master = a.get(_IFLA_MASTER, b"")
    return _Link(index, ":".join(f"{b:02x}" for b in a.get(_IFLA_ADDRESS, b"")),
                 info.get(_IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace"),
                 struct.unpack("=I", master)[0] if len(master) == 4 else 0)


class _Later:
    """Jobs run at a set monotonic time on one daemon thread. Whatever is still
    pending when the interpreter exits runs then, told so (``job(True)``)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[bool], object]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def at(self, when: float, job: Callable[[bool], object]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), job))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="pycri-cni-later",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                job = heapq.heappop(self._heap)[2]
            with contextlib.suppress(Exception):
                job(False)

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def flush(self) -> None:
        with self._cv:
            jobs = [j for _, _, j in sorted(self._heap, key=lambda e: e[:2])]
            self._heap.clear()
        for job in jobs:
            with contextlib.suppress(Exception):
                job(True)


_later = _Later()
atexit.register(_later.flush)


def _noop(conf: dict[str, Any]) -> bool:
    """Whether a chained plugin's conf leaves it nothing to do (see NOOP_WITHOUT)."""
    key = NOOP_WITHOUT.get(conf["type"])
    if key is None:
        return False
    rc = conf.get("runtimeConfig")
    return not (isinstance(rc, dict) and rc.get(key))


def _run(path: str, stdin: bytes, env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
    """Run one plugin: feed it stdin, collect stdout and stderr, reap it. (rc, out, err).

    subprocess.run would do, but once the pipes close it waits for the exit by
    polling with sleeps of 0.5 ms and up; a pidfd wakes us the moment the plugin
    is gone. A plugin still running (or holding its pipes) after ``timeout``
    seconds is killed and TimeoutExpired raised."""
    proc = subprocess.Popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, close_fds=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    pidfd = -1
    sel = selectors.DefaultSelector()
    done = False
    try:
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
        sel.register(out_fd, selectors.EVENT_READ)
        sel.register(err_fd, selectors.EVENT_READ)
        pending = memoryview(stdin)
        if pending:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        deadline = time.monotonic() + timeout
        open_pipes = 2
        exited = False
        while open_pipes or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired([path], timeout)
            for key, _ in sel.select(left):
                fd = key.fd
                if fd == pidfd:
                    exited = True
                    sel.unregister(pidfd)
                elif fd == in_fd:
                    try:
                        pending = pending[os.write(in_fd, pending):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]  # it stopped reading; its answer says why
                    if not pending:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                else:
                    data = os.read(fd, _PIPE_READ)
                    if data:
                        chunks[fd].append(data)
                    else:
                        sel.unregister(fd)
                        open_pipes -= 1
        done = True
    finally:
        sel.close()
        if pidfd >= 0:
            os.close(pidfd)
        if not done and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
        rc = proc.wait()  # exited (or killed just now): no wait to speak of
    return rc, b"".join(chunks[out_fd]), b"".join(chunks[err_fd])


def _ips(result: dict[str, Any]) -> tuple[str, ...]:
    found: list[str] = []
    for ip in result.get("ips") or []:
        if isinstance(ip, dict) and isinstance(ip.get("address"), str):
            found.append(ip["address"].split("/")[0])
    ip4 = result.get("ip4")
    if isinstance(ip4, dict) and isinstance(ip4.get("ip"), str):
        found.append(ip4["ip"].split("/")[0])
    valid = []
    for a in found:
        with contextlib.suppress(ValueError):
            valid.append(ipaddress.ip_address(a))
    valid.sort(key=lambda a: a.version)
    return tuple(str(a) for a in valid)
