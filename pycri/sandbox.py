"""Sandboxes (pods): shared namespaces, a pod cgroup, network, hostname and DNS.

A sandbox's network, IPC and UTS namespaces are pinned to files in its state
dir (csrc/ns.c) and containers join them; only a pod whose containers share a
pid namespace has a process, its pid 1 (pycri-pause). Its record lives in
``<root>/sandboxes/<id>/record.json``; the pins, CNI result and the
hostname/hosts/resolv.conf files its containers mount live in
``<state>/sandboxes/<id>/``.

User namespace (SandboxConfig.user_namespace): the pod gets one, pinned like the
others (``userns``) and made first, so it owns the pod's net, IPC and UTS
namespaces and the pid namespace of pycri-pause, which starts inside it. Every
container joins it, so they all share one mapping, and its root may mount /proc,
sysfs and mqueue for the pod's namespaces. The pod's sysctls are written by that
root; /dev/shm and the /etc files belong to the mapped root.

Every verb takes the sandbox's lock, re-reads the record, acts, and writes the
new state atomically. Stop and remove are idempotent. A sandbox left in
"creating" by a crash is torn down by the next Runtime.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycri import _native, slots, store
from pycri.config import NODE, POD, ContainerConfig, Resources, SandboxConfig, to_json
from pycri.container import Container, RunResult, run_to_completion
from pycri.errors import (AlreadyExistsError, InvalidArgumentError, InvalidStateError,
                          NotFoundError, PycriError, RuntimeFailure)
from pycri.network import NetworkResult
from pycri.procinfo import _start_time

if TYPE_CHECKING:
    from pycri.image import Image
    from pycri.runtime import Runtime

SHM_SIZE = 64 << 20
# how long a stop waits for a SIGKILLed pod pid 1 to exit
INFRA_EXIT_WAIT_S = 5.0
# CNI ADDs of pods being created, each beside the rest of its pod's setup
_NETWORK_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pycri-cni")
CREATING = "creating"
READY = "ready"
NOTREADY = "notready"


@dataclass(frozen=True)
class SandboxStatus:
    id: str
    state: str
    created_at_ns: int
    ip: str
    ips: tuple[str, ...]
    config: SandboxConfig
    netns_path: str


def _parse(data: bytes) -> store.ParsedRecord:
    return store.ParsedRecord(data, SandboxConfig)


class Sandbox:
    """A handle on one pod: an id and its Runtime. The disk is the truth."""

    def __init__(self, runtime: Runtime, sandbox_id: str) -> None:
        self.runtime = runtime
        self.id = sandbox_id

    def __repr__(self) -> str:
        return f"Sandbox({self.id[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sandbox) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- paths and records -------------------------------------------------------

    @property
    def record_dir(self) -> str:
        return os.path.join(self.runtime.root, "sandboxes", self.id)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.runtime.state, "sandboxes", self.id)

    def ns_path(self, kind: str) -> str:
        return os.path.join(self.state_dir, f"{kind}ns")

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        return store.flock(self._lock_path)

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.runtime.root, "locks", f"sandbox-{self.id}.lock")

    def _parsed(self) -> store.ParsedRecord:
        """The record file as it is now, parsed (reused while its bytes are unchanged)."""
        path = os.path.join(self.record_dir, "record.json")
        try:
            data = store.read_bytes(path)
        except FileNotFoundError:
            self.runtime.parsed.forget(path)
            raise NotFoundError(f"sandbox {self.id} not found") from None
        return self.runtime.parsed.get(path, data, _parse)

    def record(self) -> dict[str, Any]:
        """The record: top-level keys are the caller's to set; nested values are shared
        with other readers, to be replaced, never changed in place."""
        return dict(self._parsed().rec)

    def _write(self, rec: dict[str, Any]) -> None:
        # No fsync: the rename is atomic, so a killed process never leaves a torn
        # record, and after a power loss the processes it describes are gone too
        # (recovery settles them). Image content, by contrast, is fsynced.
        store.write_json(os.path.join(self.record_dir, "record.json"), rec, sync=False)

    @property
    def config(self) -> SandboxConfig:
        """The pod's config (shared with other readers: do not change its dicts)."""
        return self._parsed().config

    @property
    def name(self) -> str:
        return str(self.record()["config"]["name"])

    @property
    def state(self) -> str:
        return str(self.record()["state"])

    @property
    def ip(self) -> str:
        return str(self.record().get("ip", ""))

    def status(self) -> SandboxStatus:
        """State, addresses and config now. The config object is shared while the record
        is unchanged: read it, do not change its dicts."""
        parsed = self._parsed()
        rec, cfg = parsed.rec, parsed.config
        return SandboxStatus(self.id, rec["state"], rec["created_at_ns"], rec.get("ip", ""),
                             tuple(rec.get("ips", [])), cfg,
                             self.ns_path("net")
                             if rec.get("netns") and not rec.get("netns_released") else "")

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def create(cls, runtime: Runtime, config: SandboxConfig) -> Sandbox:
        sb = cls(runtime, secrets.token_hex(32))
        key = [config.name, config.namespace, config.uid, config.attempt]
        # the sandbox's own lock is held from before its record exists until it is
        # ready, so recovery in another process never tears down a pod being made
        with sb._lock():
            with store.flock(os.path.join(runtime.root, "locks", "sandboxes.lock")):
                for other in runtime.sandboxes():
                    with contextlib.suppress(NotFoundError):
                        c = other.record()["config"]
                        if [c["name"], c["namespace"], c["uid"], c["attempt"]] == key:
                            raise AlreadyExistsError(
                                f"sandbox {config.name!r} (namespace {config.namespace!r}, "
                                f"attempt {config.attempt}) already exists as {other.id}")
                store.makedirs(sb.record_dir)
                rec: dict[str, Any] = {
                    "id": sb.id, "state": CREATING, "created_at_ns": time.time_ns(),
                    "config": to_json(config), "netns": False, "ipcns": False, "utsns": False,
                    "cgroup_parent": config.cgroup_parent or runtime.cgroup_parent,
                    "network": "host" if config.network == NODE
                    else ("cni" if runtime.cni else "none"),
                }
                sb._write(rec)
            try:
                sb._setup(rec, config)
            except BaseException:
                with contextlib.suppress(Exception):
                    sb._teardown(remove=True)
                raise
        return sb

    def _setup(self, rec: dict[str, Any], config: SandboxConfig) -> None:
        rt = self.runtime
        store.makedirs(self.state_dir)
        kinds = 0
        if config.network != NODE:
            kinds |= _native.PIN_NET | _native.PIN_UTS
        if config.ipc != NODE:
            kinds |= _native.PIN_IPC
        paths: dict[str, str | None] = {"net": None, "ipc": None, "uts": None, "user": None}
        userns = config.user_namespace
        for kind, bit in (("net", _native.PIN_NET), ("ipc", _native.PIN_IPC),
                          ("uts", _native.PIN_UTS), ("user", 0)):
            if kinds & bit or (kind == "user" and userns):
                p = self.ns_path(kind)
                with open(p, "w"):
                    pass
                paths[kind] = p
        hostname = config.hostname or (config.name if config.network != NODE else os.uname().nodename)
        hostname = hostname[:63]
        if kinds or userns:
            idmap = None
            if userns:
                u, g = userns.uids[0], userns.gids[0]
                idmap = ((u.container_id, u.host_id, u.length),
                         (g.container_id, g.host_id, g.length))
            try:
                _native.ns_pin(kinds, paths["net"], paths["ipc"], paths["uts"], hostname,
                               dict(config.sysctls), user=paths["user"], idmap=idmap)
            except OSError as e:
                raise RuntimeFailure(f"sandbox namespaces: {e.strerror}", stage="namespaces",
                                     errno=e.errno or 0) from e
        rec.update(netns=bool(paths["net"]), ipcns=bool(paths["ipc"]), utsns=bool(paths["uts"]),
                   userns=bool(paths["user"]))
        # CNI ADD (plugin processes, milliseconds of kernel work) runs beside the rest of
        # the setup, which never touches what is inside the network namespace.
        network: Future[NetworkResult] | None = None
        if rec["network"] == "cni":
            assert rt.cni is not None and paths["net"]
            network = _NETWORK_POOL.submit(
                rt.cni.setup, self.id, paths["net"], os.path.join(self.state_dir, "cni.json"),
                name=config.name, namespace=config.namespace, uid=config.uid,
                ports=config.port_mappings)
        try:
            self._setup_rest(rec, config, paths)
        except BaseException:
            if network is not None:  # let it finish: the caller's teardown then undoes it
                with contextlib.suppress(BaseException):
                    network.result()
            raise
        # the first container's slot, made while the network is still being set up:
        # with a root of the image this process last ran, the likeliest guess
        guess = ("", None) if config.user_namespace else slots.last_image(rt)
        slots.make(rt, self.id, rec["cgroup_parent"], *guess)
        ips: tuple[str, ...] = network.result().ips if network is not None else ()
        self._write_etc(hostname, ips, config)
        rec.update(state=READY, ip=ips[0] if ips else "", ips=list(ips), hostname=hostname)
        self._write(rec)
        # ... and its container process, set up ahead now that the pod is complete
        slots.pod_ready(rt, self.id, guess[1])

    def _setup_rest(self, rec: dict[str, Any], config: SandboxConfig,
                    paths: dict[str, str | None]) -> None:
        """What _setup does while the pod's network is being set up."""
        rt = self.runtime
        userns = config.user_namespace
        self._write(rec)
        if paths["ipc"]:
            # the pod's /dev/shm: one tmpfs its containers share, as they share IPC
            shm = store.makedirs(self.shm_path, 0o755)
            try:
                _native.ns_tmpfs(shm, SHM_SIZE)
            except OSError as e:
                raise RuntimeFailure(f"sandbox /dev/shm: {e.strerror}", stage="shm") from e
            rec["shm"] = True
            if userns:
                os.chown(shm, *_mapped_root(config))
        self._write(rec)
        rt.cgroups(rec["cgroup_parent"]).create_pod(self.id)
        if config.pid == POD:
            self._start_infra(rec, paths)

    def _start_infra(self, rec: dict[str, Any], paths: dict[str, str | None]) -> None:
        """Containers sharing the pod's pid namespace need a pid 1 that outlives each
        of them: a tiny reaper (pycri-pause) in a new pid namespace."""
        # exec'd through /proc/self/fd: in a pod with a user namespace the mapped
        # root may not traverse the directories pycri is installed in
        pause = os.path.join(os.path.dirname(os.path.abspath(_native.__file__)), "pycri-pause")
        namespaces = {"pid": "new", "mnt": "host"}
        for kind in ("net", "ipc", "uts", "user"):
            namespaces[kind] = paths[kind] or "host"
        # in the pod's cgroup (what it uses is the pod's, not this process's); it
        # goes with the pod's cgroup
        procs = self.runtime.cgroups(rec["cgroup_parent"]).pod_process_files(self.id)
        pause_fd = os.open(pause, os.O_RDONLY | os.O_CLOEXEC)
        try:
            spec = _native.SpawnSpec(argv=["pycri-pause"], exec_path="/proc/self/fd/3",
                                     keep_fds=[pause_fd], env=[], rootfs=None,
                                     mount_proc=False, mount_sys=False, mount_dev=False,
                                     namespaces=namespaces, no_new_privs=True,
                                     cgroup_procs=procs)
            try:
                res = _native.spawn(spec)
            except OSError as e:
                raise RuntimeFailure(f"sandbox pid namespace holder: {e.strerror or e}",
                                     stage="infra") from e
        finally:
            os.close(pause_fd)
        if res.pidfd >= 0:
            os.close(res.pidfd)
        rec.update(infra_pid=res.pid, infra_start_time=res.start_time)
        self._write(rec)

    def pid_namespace(self, rec: dict[str, Any] | None = None) -> str | None:
        """The pod's shared pid namespace (/proc/PID/ns/pid of its holder), if it has one
        (``rec``: the record, when the caller has just read it)."""
        rec = rec if rec is not None else self.record()
        pid = rec.get("infra_pid", 0)
        if not pid:
            return None
        from pycri.container import _alive

        if not _alive(pid, rec.get("infra_start_time", 0)):
            raise RuntimeFailure(f"sandbox {self.id[:12]}: its pid namespace holder is gone",
                                 stage="infra")
        return f"/proc/{pid}/ns/pid"

    def _stop_infra(self, rec: dict[str, Any]) -> None:
        """Kill the pod's pid 1 (pycri-pause), if it is still there, and wait until it
        has exited (it has let go of the pod's namespaces by then); reap it if this
        process made it. Again later (the pid gone, or someone else's): nothing."""
        pid, start = rec.get("infra_pid", 0), rec.get("infra_start_time", 0)
        if not pid:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            # checked once the pidfd pins the process (a zombie too: still ours to reap)
            if start and _start_time(pid) != start:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], INFRA_EXIT_WAIT_S)  # readable once it exited
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        finally:
            os.close(pidfd)

    def _write_etc(self, hostname: str, ips: tuple[str, ...], config: SandboxConfig) -> None:
        # Not fsynced (sync=False), like the record: made anew for every pod, and of no
        # use after a boot, which ends the pod.
        d = self.files_dir
        store.atomic_write(os.path.join(d, "hostname"), hostname.encode() + b"\n", 0o644,
                           sync=False)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if ips:
            hosts.append(f"{ips[0]}\t{hostname}")
        else:
            hosts[0] += f" {hostname}"
        store.atomic_write(os.path.join(d, "hosts"), ("\n".join(hosts) + "\n").encode(), 0o644,
                           sync=False)
        if config.dns and (config.dns.servers or config.dns.searches or config.dns.options):
            lines = [f"nameserver {s}" for s in config.dns.servers]
            if config.dns.searches:
                lines.append("search " + " ".join(config.dns.searches))
            if config.dns.options:
                lines.append("options " + " ".join(config.dns.options))
            resolv = ("\n".join(lines) + "\n").encode()
        else:
            try:
                with open("/etc/resolv.conf", "rb") as f:
                    resolv = f.read(64 << 10)
            except OSError:
                resolv = b""
        store.atomic_write(os.path.join(d, "resolv.conf"), resolv, 0o644, sync=False)
        if config.user_namespace:
            # root inside may edit them, as in a pod without a user namespace
            for name in ("hostname", "hosts", "resolv.conf"):
                os.chown(os.path.join(d, name), *_mapped_root(config))

    def user_namespace(self) -> str | None:
        """The pinned user namespace of the pod, if it has one."""
        return self.ns_path("user") if self.record().get("userns") else None

    @property
    def files_dir(self) -> str:
        """Where the files the pod's containers mount live (hosts, resolv.conf, shm)."""
        try:
            return self._files_dir(self.record())
        except NotFoundError:
            return self.state_dir

    def _files_dir(self, rec: dict[str, Any]) -> str:
        return str(rec.get("files_dir") or self.state_dir)

    @property
    def shm_path(self) -> str:
        """What containers mount at /dev/shm: the pod's tmpfs, or the host's."""
        return self._shm_path(self.record())

    def _shm_path(self, rec: dict[str, Any]) -> str:
        if not rec.get("ipcns") and not os.path.exists(self.ns_path("ipc")):
            return "/dev/shm"
        return os.path.join(self._files_dir(rec), "shm")

    def container_files(self, rec: dict[str, Any] | None = None) -> dict[str, str]:
        """What a container of this pod mounts from it (one record read): shm_path,
        etc_hostname, etc_hosts, etc_resolv (SpawnSpec keywords)."""
        rec = self.record() if rec is None else rec
        d = self._files_dir(rec)
        return {"shm_path": self._shm_path(rec), "etc_hostname": os.path.join(d, "hostname"),
                "etc_hosts": os.path.join(d, "hosts"),
                "etc_resolv": os.path.join(d, "resolv.conf")}

    def stats(self) -> Any:
        """Usage of the whole pod (its cgroup: every container in it)."""
        rec = self.record()
        return self.runtime.cgroups(rec["cgroup_parent"]).pod(self.id).stats()

    def etc_file(self, name: str) -> str:
        """Path of the pod's hostname, hosts or resolv.conf file (bind-mounted into containers)."""
        return os.path.join(self.files_dir, name)

    def stop(self) -> None:
        """Stop every container of the pod and its pid 1, and tear down its network.
        Idempotent. The pod's network namespace may go with the network (see
        _teardown_network); its status then shows no netns path."""
        for c in self.containers():
            with contextlib.suppress(NotFoundError):
                c.stop(timeout=0)
        with self._lock():
            try:
                rec = self.record()
            except NotFoundError:
                return
            # nothing of this process stays in the pod's namespaces (its slot's held
            # process is in them): the network teardown may free the network namespace,
            # and no create comes now
            slots.forget(self.runtime, self.id)
            self._stop_infra(rec)
            released = self._teardown_network(rec) or bool(
                rec.get("netns") and not os.path.lexists(self.ns_path("net")))  # (a killed stop)
            if rec["state"] != NOTREADY or (released and not rec.get("netns_released")):
                rec["state"] = NOTREADY
                if released:
                    rec["netns_released"] = True
                self._write(rec)

    def remove(self) -> None:
        """Stop, remove every container, release namespaces, cgroup and state. Idempotent."""
        for c in self.containers():
            with contextlib.suppress(NotFoundError):
                c.remove()
        with self._lock():
            self._teardown(remove=True)

    def _teardown_network(self, rec: dict[str, Any]) -> bool:
        """CNI DEL of the pod. Where the network's plugins allow it (pycri/network.py),
        the pod's network namespace is unpinned first and DEL runs without it: the
        kernel then removes the pod's veth in the background instead of the plugin
        waiting for it. The caller has stopped whatever of ours was in the namespace
        (containers, pid 1, the slot). True when the namespace was unpinned here."""
        if rec.get("network") != "cni" or self.runtime.cni is None:
            return False
        netns = self.ns_path("net")

        def release() -> None:
            try:
                _native.ns_unpin(netns)   # (already gone: fine, a killed stop did it)
            except OSError as e:
                raise RuntimeFailure(f"sandbox network namespace: {e.strerror}",
                                     stage="network", errno=e.errno or 0) from e

        return self.runtime.cni.teardown(self.id, netns, os.path.join(self.state_dir, "cni.json"),
                                         release_netns=release)

    def _teardown(self, remove: bool) -> None:
        try:
            rec = self.record()
        except NotFoundError:
            rec = {}
        errors: list[str] = []
        self._stop_infra(rec)
        try:
            slots.forget(self.runtime, self.id)   # (before the network: see stop)
        except PycriError as e:
            errors.append(str(e))
        try:
            self._teardown_network(rec)
        except PycriError as e:
            errors.append(str(e))
        for kind in ("net", "ipc", "uts", "user"):
            try:
                _native.ns_unpin(self.ns_path(kind))
            except OSError as e:
                errors.append(str(e))
        if rec.get("shm"):
            shm = os.path.join(rec.get("files_dir") or self.state_dir, "shm")
            try:
                _native.mount_unmount(shm)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOENT):
                    errors.append(str(e))
        parent = rec.get("cgroup_parent") or self.runtime.cgroup_parent
        with contextlib.suppress(OSError, PycriError):   # (pid 1's v2 leaf: see _start_infra)
            self.runtime.cgroups(parent).drop_pod_process_cgroup(self.id)
        try:
            self.runtime.cgroups(parent).pod(self.id).destroy()
        except PycriError as e:
            errors.append(str(e))
        if errors:
            raise RuntimeFailure("sandbox teardown: " + "; ".join(errors), stage="teardown")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if remove:
            shutil.rmtree(self.record_dir, ignore_errors=True)
            self.runtime.parsed.forget(os.path.join(self.record_dir, "record.json"))
            store.drop_lock_file(self._lock_path)

    # -- containers ------------------------------------------------------------------

    def containers(self) -> list[Container]:
        """Containers of this pod."""
        return self.runtime.containers(sandbox_id=self.id)

    def create_container(self, config: ContainerConfig) -> Container:
        """Create (not start) a container in this pod."""
        return Container.create(self.runtime, self, config)

    def run(self, image: Image | str, argv: list[str], timeout: float | None = None,
            **config: Any) -> RunResult:
        """Create, start, wait for and remove a container; return its exit and output."""
        ref = image if isinstance(image, str) else image.id
        cfg = ContainerConfig(name="run-" + secrets.token_hex(6), image=ref, command=tuple(argv),
                              **config)
        c = self.create_container(cfg)
        try:
            return run_to_completion(c, timeout)
        finally:
            c.remove()

    # -- context manager: `with rt.run_sandbox(cfg) as sb:` removes the pod on exit --

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- resizing the pod ------------------------------------------------------------

    def update_resources(self, resources: Resources | None) -> None:
        """Apply pod-level limits (cpu, memory, hugepages, ...) to the pod's cgroup, all
        or nothing (a value the kernel refuses puts back every value already written).
        The pod's containers keep their own limits; the pod's caps them all. None
        changes nothing. The applied resources are kept in the record."""
        if resources is None:
            return
        if not isinstance(resources, Resources):
            raise InvalidArgumentError("pod resources must be a pycri.Resources")
        with self._lock():
            rec = self.record()
            if rec["state"] == CREATING:
                raise InvalidStateError(f"sandbox {self.id[:12]} is still being created")
            cg = self.runtime.cgroups(rec["cgroup_parent"]).pod(self.id)
            if not cg.exists():
                raise InvalidStateError(f"sandbox {self.id[:12]} has no cgroup any more")
            cg.update(resources)
            rec["resources"] = to_json(resources)
            self._write(rec)


def _mapped_root(config: SandboxConfig) -> tuple[int, int]:
    """The host uid and gid of root in the pod's user namespace."""
    assert config.user_namespace is not None
    return config.user_namespace.uids[0].host_id, config.user_namespace.gids[0].host_id


def recover(runtime: Runtime) -> None:
    """After a crash: finish tearing down sandboxes that never became ready."""
    for sb in runtime.sandboxes():
        with contextlib.suppress(NotFoundError, PycriError, OSError):
            if sb.state == CREATING:
                with sb._lock():
                    if sb.state == CREATING:
                        sb._teardown(remove=True)
