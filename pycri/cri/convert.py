"""Pure conversions between pycri library objects and CRI v1 protobuf messages.

No I/O and no state: every function maps its arguments to a result, so each is
unit-tested on its own and the server stays a list of one-line calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from pycri import reference
from pycri.config import (
    CONTAINER,
    NODE,
    POD,
    Auth,
    ContainerConfig,
    DNSConfig,
    IDMapping,
    Mount,
    PortMapping,
    Resources,
    SandboxConfig,
    UserNamespace,
    to_json,
)
from pycri.container import CREATED, EXITED, RUNNING, ContainerStatus, ExecResult
from pycri.sandbox import NOTREADY, READY, SandboxStatus
from pycri.cri._gen import api_pb2
from pycri.cgroup import SHARES_MAX
from pycri.errors import InvalidArgumentError
from pycri.image import FsInfo, Image

# Names the Docker Hub registry goes by in credentials (docker login writes the first).
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


# -- images ---------------------------------------------------------------------

def image_name(spec: api_pb2.ImageSpec | None, what: str = "image") -> str:
    """The image reference (tag, digest reference, id or id prefix) an ImageSpec names."""
    name = spec.image.strip() if spec is not None else ""
    if not name:
        raise InvalidArgumentError(f"{what}: ImageSpec.image must not be empty")
    return name


def user_of(user: str) -> tuple[int | None, str]:
    """Split an image config ``User`` into (uid, username) as CRI wants them.

    ``"1000"`` or ``"1000:50"`` give uid 1000; ``"nginx"`` or ``"nginx:web"`` give the
    name; ``""`` gives neither (the container then runs as root, uid 0, but CRI leaves
    both unset for that, as containerd and CRI-O do).
    """
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name


def image_to_proto(img: Image, pinned: bool = False) -> api_pb2.Image:
    """A pycri Image as a CRI Image: id is the config digest (= PullImage's image_ref)."""
    uid, username = user_of(img.config.user)
    spec_name = (img.repo_tags or img.repo_digests or (img.id,))[0]
    msg = api_pb2.Image(
        id=img.id,
        repo_tags=list(img.repo_tags),
        repo_digests=list(img.repo_digests),
        size=max(1, img.size),  # CRI: "Must be > 0"
        username=username,
        spec=api_pb2.ImageSpec(image=spec_name, annotations=dict(img.annotations)),
        pinned=pinned,
    )
    if uid is not None:
        msg.uid.value = uid
    return msg


def image_info(img: Image) -> dict[str, str]:
    """ImageStatus's verbose info map: values are JSON documents (crictl parses them)."""
    return {"info": json.dumps(img.to_json(), sort_keys=True)}


def pinned_names(pinned_refs: Iterable[str]) -> frozenset[str]:
    """``pinned_refs`` normalised as image names are stored (unparsable ones dropped)."""
    out = set()
    for ref in pinned_refs:
        try:
            parsed = reference.parse(ref)
        except InvalidArgumentError:
            continue
        out.add(f"{parsed.name}@{parsed.digest}" if parsed.digest else str(parsed))
    return frozenset(out)


def is_pinned(img: Image, pinned_refs: Iterable[str]) -> bool:
    """Whether ``img`` carries one of ``pinned_refs`` (normalised) as a tag or digest name.
    (``pinned_refs`` may be a pinned_names() set, already normalised.)"""
    names = pinned_refs if isinstance(pinned_refs, frozenset) else pinned_names(pinned_refs)
    return any(n in names for n in img.repo_tags) or any(n in names for n in img.repo_digests)


def fs_usage(fs: FsInfo) -> api_pb2.FilesystemUsage:
    return api_pb2.FilesystemUsage(
        timestamp=max(1, fs.timestamp_ns),  # CRI: "Must be > 0"
        fs_id=api_pb2.FilesystemIdentifier(mountpoint=fs.path),
        used_bytes=api_pb2.UInt64Value(value=fs.used_bytes),
        inodes_used=api_pb2.UInt64Value(value=fs.inodes_used),
    )


# -- values kept per shared snapshot ---------------------------------------------------

class ObjectMemo:
    """Values computed from objects the library hands out as shared, unchanging
    snapshots (one config object per record version, one Image per image record
    and names version), kept per object: the same object gives the same value, a
    new version is a new object. Each entry holds its object, so its id is not
    reused while remembered. At most ``limit`` entries; the oldest goes first."""

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._values: dict[int, tuple[object, Any]] = {}

    def get(self, obj: object, make: Callable[[Any], Any]) -> Any:
        hit = self._values.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        value = make(obj)
        with self._lock:
            while len(self._values) >= self.limit:
                del self._values[next(iter(self._values))]
            self._values[id(obj)] = (obj, value)
        return value


_config_texts = ObjectMemo(256)


def _dumps_config(cfg: object) -> str:
    return json.dumps(to_json(cfg), sort_keys=True)


def config_text(cfg: object) -> str:
    """``json.dumps(to_json(cfg), sort_keys=True)`` of a config object, kept per object:
    every reader of one record version gets the same config object, so repeated
    verbose statuses serialise it once."""
    return _config_texts.get(cfg, _dumps_config)  # type: ignore[no-any-return]


# -- runtime status ---------------------------------------------------------------------

def network_condition(ready: bool, reason: str) -> api_pb2.RuntimeCondition:
    """The NetworkReady condition from the library's CNI status (ready, why not)."""
    if ready:
        return api_pb2.RuntimeCondition(type="NetworkReady", status=True)
    return api_pb2.RuntimeCondition(type="NetworkReady", status=False,
                                    reason="NetworkPluginNotReady",
                                    message="network plugin not ready: " + reason)


# -- credentials ------------------------------------------------------------------

def _host_of(server_address: str) -> str:
    """The host[:port] of a credential's server address (a URL or a bare host)."""
    s = server_address.strip()
    if "://" not in s:
        s = "//" + s
    host = urllib.parse.urlsplit(s).netloc.lower()
    return "docker.io" if host in _DOCKER_HUB else host


def auth_from_proto(cfg: api_pb2.AuthConfig | None, registry: str) -> Auth | None:
    """CRI AuthConfig -> pycri Auth for a pull from ``registry`` (None: anonymous).

    username/password win over ``auth`` (base64 of ``user:password``), as in Docker's
    config. Credentials whose ``server_address`` names another registry are not sent
    there: they are dropped and the pull goes anonymous, as containerd does.
    """
    if cfg is None:
        return None
    if cfg.server_address:
        want = "docker.io" if registry.lower() in _DOCKER_HUB else registry.lower()
        if _host_of(cfg.server_address) != want:
            return None
    username, password = cfg.username, cfg.password
    if not username and cfg.auth:
        try:
            decoded = base64.b64decode(cfg.auth, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidArgumentError("AuthConfig.auth is not base64 of 'user:password'") from None
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise InvalidArgumentError("AuthConfig.auth must decode to 'user:password'")
    auth = Auth(username=username, password=password, identity_token=cfg.identity_token,
                registry_token=cfg.registry_token)
    return None if auth.empty else auth


def registry_of(ref: str) -> str:
    """The registry host a pull of ``ref`` goes to (raises InvalidArgumentError if malformed)."""
    return reference.parse(ref).registry


# -- pod sandboxes --------------------------------------------------------------------

# CRI NamespaceMode numbers -> the library's namespace modes.
_NS_MODE = {api_pb2.POD: POD, api_pb2.CONTAINER: CONTAINER, api_pb2.NODE: NODE}
_NS_ENUM = {v: k for k, v in _NS_MODE.items()}
_PROTOCOL = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp", api_pb2.SCTP: "sctp"}
_PROPAGATION = {api_pb2.PROPAGATION_PRIVATE: "private",
                api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
                api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared"}
_PROPAGATION_ENUM = {v: k for k, v in _PROPAGATION.items()}
SANDBOX_STATE = {READY: api_pb2.SANDBOX_READY}  # everything else is NOTREADY
_SANDBOX_STATE_NAME = {api_pb2.SANDBOX_READY: READY, api_pb2.SANDBOX_NOTREADY: NOTREADY}
CONTAINER_STATE = {CREATED: api_pb2.CONTAINER_CREATED, RUNNING: api_pb2.CONTAINER_RUNNING,
                   EXITED: api_pb2.CONTAINER_EXITED}
_CONTAINER_STATE_NAME = {v: k for k, v in CONTAINER_STATE.items()}


def _ns_mode(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    mode = _NS_MODE.get(value)
    if mode is None or mode not in allowed:
        raise InvalidArgumentError(f"{what} namespace mode {api_pb2.NamespaceMode.Name(value)} "
                                   "is not supported")
    return mode


def _user_namespace(opts: api_pb2.UserNamespace) -> UserNamespace | None:
    if opts.mode == api_pb2.NODE:
        return None
    if opts.mode != api_pb2.POD:
        raise InvalidArgumentError("user namespace mode must be NODE or POD")

    return UserNamespace(uids=_idmaps(opts.uids), gids=_idmaps(opts.gids))


def sandbox_config(cfg: api_pb2.PodSandboxConfig, runtime_handler: str = "") -> SandboxConfig:
    """CRI PodSandboxConfig -> SandboxConfig (validated by its constructor)."""
    md = cfg.metadata
    if not md.name:
        raise InvalidArgumentError("PodSandboxConfig.metadata.name must not be empty")
    linux = cfg.linux
    sc = linux.security_context
    ns = sc.namespace_options
    dns = None
    if cfg.HasField("dns_config"):
        d = cfg.dns_config
        dns = DNSConfig(servers=tuple(d.servers), searches=tuple(d.searches),
                        options=tuple(d.options))
    ports = tuple(PortMapping(container_port=p.container_port, host_port=p.host_port,
                              protocol=_PROTOCOL.get(p.protocol, "tcp"), host_ip=p.host_ip)
                  for p in cfg.port_mappings)
    userns = _user_namespace(ns.userns_options) if ns.HasField("userns_options") else None
    return SandboxConfig(
        name=md.name, namespace=md.namespace or "default", uid=md.uid, attempt=md.attempt,
        hostname=cfg.hostname, log_directory=cfg.log_directory, dns=dns, port_mappings=ports,
        labels=dict(cfg.labels), annotations=dict(cfg.annotations),
        cgroup_parent=linux.cgroup_parent, sysctls=dict(linux.sysctls),
        network=_ns_mode(ns.network, "network", (POD, NODE)),
        pid=_ns_mode(ns.pid, "pid", (POD, CONTAINER, NODE)),
        ipc=_ns_mode(ns.ipc, "ipc", (POD, NODE)),
        privileged=sc.privileged, user_namespace=userns, runtime_handler=runtime_handler)


def _sandbox_metadata(cfg: SandboxConfig) -> api_pb2.PodSandboxMetadata:
    return api_pb2.PodSandboxMetadata(name=cfg.name, namespace=cfg.namespace, uid=cfg.uid,
                                      attempt=cfg.attempt)


def namespace_options(cfg: SandboxConfig) -> api_pb2.NamespaceOption:
    opts = api_pb2.NamespaceOption(network=_NS_ENUM[cfg.network], pid=_NS_ENUM[cfg.pid],
                                   ipc=_NS_ENUM[cfg.ipc])
    if cfg.user_namespace is not None:
        u = cfg.user_namespace
        opts.userns_options.CopyFrom(api_pb2.UserNamespace(
            mode=api_pb2.POD,
            uids=[api_pb2.IDMapping(host_id=m.host_id, container_id=m.container_id,
                                    length=m.length) for m in u.uids],
            gids=[api_pb2.IDMapping(host_id=m.host_id, container_id=m.container_id,
                                    length=m.length) for m in u.gids]))
    else:
        opts.userns_options.mode = api_pb2.NODE
    return opts


def sandbox_status(st: SandboxStatus, info: dict[str, Any] | None = None
                   ) -> api_pb2.PodSandboxStatusResponse:
    """A library SandboxStatus as PodSandboxStatusResponse (``info``: verbose details)."""
    cfg = st.config
    network = api_pb2.PodSandboxNetworkStatus(
        ip=st.ip, additional_ips=[api_pb2.PodIP(ip=ip) for ip in st.ips[1:]])
    status = api_pb2.PodSandboxStatus(
        id=st.id, metadata=_sandbox_metadata(cfg),
        state=SANDBOX_STATE.get(st.state, api_pb2.SANDBOX_NOTREADY),
        created_at=st.created_at_ns, network=network,
        linux=api_pb2.LinuxPodSandboxStatus(
            namespaces=api_pb2.Namespace(options=namespace_options(cfg))),
        labels=cfg.labels, annotations=cfg.annotations, runtime_handler=cfg.runtime_handler)
    verbose = {"info": json.dumps(info, sort_keys=True, default=str)} if info is not None else {}
    return api_pb2.PodSandboxStatusResponse(status=status, info=verbose)


def sandbox_info(st: SandboxStatus, container_ids: list[str]) -> str:
    """PodSandboxStatus's verbose info document: json.dumps({"config", "netns",
    "containers"}, sort_keys=True), put together from the config's remembered text."""
    return ('{"config": ' + config_text(st.config) + ', "containers": '
            + json.dumps(container_ids) + ', "netns": ' + json.dumps(st.netns_path) + "}")


def sandbox_to_proto(st: SandboxStatus) -> api_pb2.PodSandbox:
    cfg = st.config
    return api_pb2.PodSandbox(id=st.id, metadata=_sandbox_metadata(cfg),
                              state=SANDBOX_STATE.get(st.state, api_pb2.SANDBOX_NOTREADY),
                              created_at=st.created_at_ns, labels=cfg.labels,
                              annotations=cfg.annotations, runtime_handler=cfg.runtime_handler)


def sandbox_filter(f: api_pb2.PodSandboxFilter | None) -> dict[str, Any]:
    """ListPodSandbox's filter as keyword arguments: id (prefix), state, labels."""
    if f is None:
        return {}
    out: dict[str, Any] = {"id": f.id, "labels": dict(f.label_selector)}
    if f.HasField("state"):
        out["state"] = _SANDBOX_STATE_NAME.get(f.state.state, NOTREADY)
    return out


def sandbox_matches(st: SandboxStatus, id: str = "", state: str | None = None,
                    labels: dict[str, str] | None = None) -> bool:
    if id and not st.id.startswith(id):
        return False
    if state is not None and (READY if st.state == READY else NOTREADY) != state:
        return False
    return all(st.config.labels.get(k) == v for k, v in (labels or {}).items())


# -- containers --------------------------------------------------------------------------

def _seccomp(sc: api_pb2.LinuxContainerSecurityContext) -> str:
    """The library's seccomp setting. No profile at all means unconfined (kubelet sends
    Unconfined explicitly when a pod asks for nothing; containerd does the same)."""
    if sc.HasField("seccomp"):
        p = sc.seccomp
        if p.profile_type == api_pb2.SecurityProfile.RuntimeDefault:
            return "RuntimeDefault"
        if p.profile_type == api_pb2.SecurityProfile.Unconfined:
            return "Unconfined"
        ref = p.localhost_ref.removeprefix("localhost/")
        if not ref.startswith("/"):
            raise InvalidArgumentError(f"seccomp localhost profile {p.localhost_ref!r} "
                                       "must be an absolute path")
        return ref
    path = sc.seccomp_profile_path  # deprecated field, still sent by old clients
    if path in ("runtime/default", "docker/default"):
        return "RuntimeDefault"
    if path in ("", "unconfined"):
        return "Unconfined"
    if path.startswith("localhost/"):
        return path.removeprefix("localhost/")
    raise InvalidArgumentError(f"seccomp profile {path!r} is not understood")


def resources(r: api_pb2.LinuxContainerResources) -> Resources:
    """CRI LinuxContainerResources -> Resources (0 means unset, in both)."""
    return Resources(
        cpu_shares=r.cpu_shares, cpu_quota=r.cpu_quota, cpu_period=r.cpu_period,
        cpuset_cpus=r.cpuset_cpus, cpuset_mems=r.cpuset_mems,
        memory_limit_in_bytes=r.memory_limit_in_bytes,
        memory_swap_limit_in_bytes=r.memory_swap_limit_in_bytes,
        hugepage_limits={h.page_size: h.limit for h in r.hugepage_limits},
        unified=dict(r.unified))


def _idmaps(ms: Iterable[api_pb2.IDMapping]) -> tuple[IDMapping, ...]:
    return tuple(IDMapping(m.container_id, m.host_id, m.length) for m in ms)


def mount(m: api_pb2.Mount) -> Mount:
    """CRI Mount -> Mount. uidMappings/gidMappings ask for an id-mapped mount; kubelet
    sends the pod's own mappings (checked against the pod when the container is made)."""
    if m.image.image and (m.uidMappings or m.gidMappings):
        raise InvalidArgumentError("an image volume cannot have id mappings")
    if m.propagation not in _PROPAGATION:
        raise InvalidArgumentError(f"mount propagation {m.propagation} is not known")
    if m.image.image:  # an image volume: the image's files, read-only
        return Mount(container_path=m.container_path, image=m.image.image,
                     readonly=m.readonly, sub_path=m.image_sub_path,
                     propagation=_PROPAGATION[m.propagation])
    return Mount(container_path=m.container_path, host_path=m.host_path, readonly=m.readonly,
                 recursive_readonly=m.recursive_read_only,
                 propagation=_PROPAGATION[m.propagation],
                 uid_mappings=_idmaps(m.uidMappings), gid_mappings=_idmaps(m.gidMappings))


def _text(v: str | bytes, what: str) -> str:
    """This proto declares KeyValue.value as bytes (wire-compatible with CRI's string)."""
    if isinstance(v, str):
        return v
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{what} is not UTF-8") from None


def container_config(cfg: api_pb2.ContainerConfig, image_id: str,
                     log_directory: str = "") -> ContainerConfig:
    """CRI ContainerConfig -> ContainerConfig, the image already resolved to its id.
    log_path is relative to the sandbox's log directory (CRI)."""
    md = cfg.metadata
    if not md.name:
        raise InvalidArgumentError("ContainerConfig.metadata.name must not be empty")
    linux = cfg.linux
    sc = linux.security_context
    pid = ""
    if sc.HasField("namespace_options"):
        pid = _ns_mode(sc.namespace_options.pid, "pid", (POD, CONTAINER, NODE))
    log_path = cfg.log_path
    if log_path:
        if os.path.isabs(log_path) or ".." in log_path.split("/"):
            raise InvalidArgumentError(f"log_path {log_path!r} must be relative to the "
                                       "sandbox's log directory, without '..'")
        if log_directory:
            log_path = os.path.join(log_directory, log_path)
    return ContainerConfig(
        name=md.name, attempt=md.attempt, image=image_id,
        command=tuple(cfg.command), args=tuple(cfg.args), working_dir=cfg.working_dir,
        env=tuple((kv.key, _text(kv.value, "environment value")) for kv in cfg.envs),
        mounts=tuple(mount(m) for m in cfg.mounts),
        labels=dict(cfg.labels), annotations=dict(cfg.annotations), log_path=log_path,
        stdin=cfg.stdin, stdin_once=cfg.stdin_once, tty=cfg.tty,
        resources=resources(linux.resources),
        oom_score_adj=linux.resources.oom_score_adj,
        run_as_user=sc.run_as_user.value if sc.HasField("run_as_user") else None,
        run_as_group=sc.run_as_group.value if sc.HasField("run_as_group") else None,
        run_as_username=sc.run_as_username,
        supplemental_groups=tuple(sc.supplemental_groups),
        supplemental_groups_policy="Strict" if sc.supplemental_groups_policy == api_pb2.Strict
        else "Merge",
        cap_add=tuple(sc.capabilities.add_capabilities),
        cap_drop=tuple(sc.capabilities.drop_capabilities),
        privileged=sc.privileged, no_new_privs=sc.no_new_privs,
        readonly_rootfs=sc.readonly_rootfs,
        # kubelet always sends its default lists; an empty list means "use the
        # runtime's defaults" (containerd reads it the same way).
        masked_paths=tuple(sc.masked_paths) or None,
        readonly_paths=tuple(sc.readonly_paths) or None,
        seccomp=_seccomp(sc), pid=pid)


def _container_metadata(cfg: ContainerConfig) -> api_pb2.ContainerMetadata:
    return api_pb2.ContainerMetadata(name=cfg.name, attempt=cfg.attempt)


def _mount_to_proto(m: Mount, image_ref: str = "") -> api_pb2.Mount:
    out = api_pb2.Mount(container_path=m.container_path, host_path=m.host_path,
                        readonly=m.readonly, recursive_read_only=m.recursive_readonly,
                        propagation=_PROPAGATION_ENUM[m.propagation])
    if m.image:
        out.image.CopyFrom(api_pb2.ImageSpec(image=m.image, image_ref=image_ref))
        out.image_sub_path = m.sub_path
    for field, maps in (("uidMappings", m.uid_mappings), ("gidMappings", m.gid_mappings)):
        getattr(out, field).extend(api_pb2.IDMapping(host_id=x.host_id, container_id=x.container_id,
                                                     length=x.length) for x in maps)
    return out


def container_to_proto(st: ContainerStatus) -> api_pb2.Container:
    cfg = st.config
    return api_pb2.Container(
        id=st.id, pod_sandbox_id=st.sandbox_id, metadata=_container_metadata(cfg),
        image=api_pb2.ImageSpec(image=st.image), image_ref=st.image_ref,
        image_id=st.image_ref, state=CONTAINER_STATE.get(st.state, api_pb2.CONTAINER_UNKNOWN),
        created_at=st.created_at_ns, labels=cfg.labels, annotations=cfg.annotations)


def container_status(st: ContainerStatus) -> api_pb2.ContainerStatus:
    cfg = st.config
    return api_pb2.ContainerStatus(
        id=st.id, metadata=_container_metadata(cfg),
        state=CONTAINER_STATE.get(st.state, api_pb2.CONTAINER_UNKNOWN),
        created_at=st.created_at_ns, started_at=st.started_at_ns,
        finished_at=st.finished_at_ns, exit_code=st.exit_code,
        image=api_pb2.ImageSpec(image=st.image), image_ref=st.image_ref, image_id=st.image_ref,
        reason=st.reason, message=st.message, labels=cfg.labels, annotations=cfg.annotations,
        mounts=[_mount_to_proto(m, (st.image_volumes or {}).get(m.container_path, ""))
                for m in cfg.mounts],
        log_path=st.log_path,
        user=api_pb2.ContainerUser(linux=api_pb2.LinuxContainerUser(
            uid=st.uid, gid=st.gid, supplemental_groups=list(st.groups))))


def container_info(st: ContainerStatus, sandbox_id: str) -> dict[str, str]:
    """ContainerStatus's verbose info: one JSON document, as crictl inspect reads it:
    json.dumps({"sandboxID", "pid", "config", "logPath"}, sort_keys=True), put together
    from the config's remembered text."""
    return {"info": '{"config": ' + config_text(st.config) + ', "logPath": '
            + json.dumps(st.log_path) + ', "pid": ' + json.dumps(st.pid) + ', "sandboxID": '
            + json.dumps(sandbox_id) + "}"}


def container_filter(f: api_pb2.ContainerFilter | None) -> dict[str, Any]:
    if f is None:
        return {}
    out: dict[str, Any] = {"id": f.id, "sandbox_id": f.pod_sandbox_id,
                           "labels": dict(f.label_selector)}
    if f.HasField("state"):
        out["state"] = _CONTAINER_STATE_NAME.get(f.state.state, "unknown")
    return out


# -- stats -------------------------------------------------------------------------------

def _u64(v: int) -> api_pb2.UInt64Value:
    return api_pb2.UInt64Value(value=max(0, int(v)))


def _opt_u64(v: int | None) -> api_pb2.UInt64Value | None:
    return None if v is None else _u64(v)


def _psi(p: Any) -> api_pb2.PsiStats | None:
    """A pressure file's figures (metrics.Psi, totals in microseconds) as PsiStats."""
    if p is None:
        return None
    return api_pb2.PsiStats(
        Some=api_pb2.PsiData(Total=p.some_us * 1000, Avg10=p.some_avg[0], Avg60=p.some_avg[1],
                             Avg300=p.some_avg[2]),
        Full=api_pb2.PsiData(Total=p.full_us * 1000, Avg10=p.full_avg[0], Avg60=p.full_avg[1],
                             Avg300=p.full_avg[2]))


def cpu_usage(s: Any, nano_cores: int | None) -> api_pb2.CpuUsage:
    """A cgroup sample (metrics.CgroupSample) as CpuUsage; ``nano_cores`` is the rate
    over the last window, None when there is no earlier sample yet."""
    msg = api_pb2.CpuUsage(timestamp=s.wall_ns, usage_core_nano_seconds=_u64(s.cpu_ns),
                           usage_nano_cores=_opt_u64(nano_cores), psi=_psi(s.psi.get("cpu")))
    return msg


def memory_usage(s: Any) -> api_pb2.MemoryUsage:
    """A cgroup sample as MemoryUsage. available_bytes only when there is a limit."""
    return api_pb2.MemoryUsage(
        timestamp=s.wall_ns, working_set_bytes=_u64(s.memory_working_set or 0),
        usage_bytes=_u64(s.memory_usage or 0), available_bytes=_opt_u64(s.memory_available),
        rss_bytes=_opt_u64(s.memory_rss), page_faults=_opt_u64(s.pgfault),
        major_page_faults=_opt_u64(s.pgmajfault), psi=_psi(s.psi.get("memory")))


def _io_usage(s: Any) -> api_pb2.IoUsage | None:
    p = s.psi.get("io")
    return None if p is None else api_pb2.IoUsage(timestamp=s.wall_ns, psi=_psi(p))


def container_stats(st: ContainerStatus, s: Any, layer_bytes: int, layer_inodes: int,
                    fs_mount: str, nano_cores: int | None = None) -> api_pb2.ContainerStats:
    """A container's attributes, a sample of its cgroup (metrics.CgroupSample) and its
    writable layer's usage as CRI ContainerStats."""
    cfg = st.config
    ts = s.wall_ns
    out = api_pb2.ContainerStats(
        attributes=api_pb2.ContainerAttributes(id=st.id, metadata=_container_metadata(cfg),
                                               labels=cfg.labels, annotations=cfg.annotations),
        cpu=cpu_usage(s, nano_cores), memory=memory_usage(s),
        writable_layer=api_pb2.FilesystemUsage(
            timestamp=ts, fs_id=api_pb2.FilesystemIdentifier(mountpoint=fs_mount),
            used_bytes=_u64(layer_bytes), inodes_used=_u64(layer_inodes)),
        io=_io_usage(s))
    if s.memory_swap is not None:
        out.swap.CopyFrom(api_pb2.SwapUsage(timestamp=ts, swap_usage_bytes=_u64(s.memory_swap),
                                            swap_available_bytes=_opt_u64(s.swap_available)))
    return out


def network_usage(timestamp_ns: int, devs: Any) -> api_pb2.NetworkUsage:
    """The pod's interfaces (metrics.NetDev, loopback left out): eth0 is the default
    interface, as kubelet expects; without eth0 the first one is."""
    ifaces = [api_pb2.NetworkInterfaceUsage(name=d.name, rx_bytes=_u64(d.rx_bytes),
                                            rx_errors=_u64(d.rx_errors), tx_bytes=_u64(d.tx_bytes),
                                            tx_errors=_u64(d.tx_errors)) for d in devs]
    ifaces.sort(key=lambda i: (i.name != "eth0", i.name))
    out = api_pb2.NetworkUsage(timestamp=timestamp_ns, interfaces=ifaces[1:])
    if ifaces:
        out.default_interface.CopyFrom(ifaces[0])
    return out


def sandbox_stats(st: SandboxStatus, s: Any, net: Any, timestamp_ns: int,
                  containers: list[api_pb2.ContainerStats],
                  nano_cores: int | None = None) -> api_pb2.PodSandboxStats:
    """A pod's attributes, a sample of its cgroup (or None), its interfaces (or None)
    and its containers' stats as CRI PodSandboxStats."""
    cfg = st.config
    linux = api_pb2.LinuxPodSandboxStats(containers=containers)
    if s is not None:
        linux.cpu.CopyFrom(cpu_usage(s, nano_cores))
        linux.memory.CopyFrom(memory_usage(s))
        linux.process.CopyFrom(api_pb2.ProcessUsage(timestamp=s.wall_ns,
                                                    process_count=_u64(len(s.pids))))
        io = _io_usage(s)
        if io is not None:
            linux.io.CopyFrom(io)
    if net:  # no interface but loopback: nothing kubelet could use
        linux.network.CopyFrom(network_usage(timestamp_ns, net))
    return api_pb2.PodSandboxStats(
        attributes=api_pb2.PodSandboxAttributes(id=st.id, metadata=_sandbox_metadata(cfg),
                                                labels=cfg.labels, annotations=cfg.annotations),
        linux=linux)


DEFAULT_CFS_PERIOD = 100_000  # microseconds: the kernel's period when none is set


def sandbox_resources(overhead: api_pb2.LinuxContainerResources | None,
                      total: api_pb2.LinuxContainerResources | None) -> Resources | None:
    """UpdatePodSandboxResources: the pod cgroup's limits are the sum of its containers'
    (``total``) plus the pod's ``overhead``. A limit the total leaves unset stays
    unset (overhead alone does not cap a pod); cpuset and unified come from the total.
    None when the request carries neither."""
    if total is None and overhead is None:
        return None
    t = total if total is not None else api_pb2.LinuxContainerResources()
    o = overhead if overhead is not None else api_pb2.LinuxContainerResources()

    def plus(a: int, b: int) -> int:
        return a + b if a > 0 and b > 0 else a

    quota = t.cpu_quota
    if quota > 0 and o.cpu_quota > 0:
        # the overhead's quota, rescaled to the total's period when they differ
        period = t.cpu_period or DEFAULT_CFS_PERIOD
        quota += o.cpu_quota * period // (o.cpu_period or DEFAULT_CFS_PERIOD)
    hugepages = {h.page_size: h.limit for h in t.hugepage_limits}
    for h in o.hugepage_limits:
        if hugepages.get(h.page_size, 0) > 0:
            hugepages[h.page_size] += h.limit
    return Resources(
        cpu_shares=min(SHARES_MAX, plus(t.cpu_shares, o.cpu_shares)), cpu_quota=quota,
        cpu_period=t.cpu_period,
        cpuset_cpus=t.cpuset_cpus, cpuset_mems=t.cpuset_mems,
        memory_limit_in_bytes=plus(t.memory_limit_in_bytes, o.memory_limit_in_bytes),
        memory_swap_limit_in_bytes=plus(t.memory_swap_limit_in_bytes,
                                        o.memory_swap_limit_in_bytes),
        hugepage_limits=hugepages, unified=dict(t.unified))


def exec_sync(r: ExecResult) -> api_pb2.ExecSyncResponse:
    return api_pb2.ExecSyncResponse(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code)
