"""Inputs to pycri: frozen dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses as _dc
import functools
import posixpath as _pp
import re as _re
import types as _types
import typing as _t
from collections.abc import Mapping as _Mapping

from dataclasses import dataclass, field

from pycri import cgroup as _cgroup
from pycri.cgroup import DeviceRule, Resources  # noqa: F401 - part of the config API
from pycri.errors import InvalidArgumentError


@dataclass(frozen=True)
class Auth:
    """Registry credentials: a username and password, or a token.

    ``identity_token`` is an OAuth2 refresh token (Docker's ``identitytoken``);
    ``registry_token`` is a bearer token sent as is.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("username", "password", "identity_token", "registry_token"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise InvalidArgumentError(f"Auth.{name} must be a string")
            if "\n" in v or "\r" in v or "\0" in v:
                raise InvalidArgumentError(f"Auth.{name} contains a control character")
        if self.password and not self.username:
            raise InvalidArgumentError("Auth.password given without a username")

    @property
    def empty(self) -> bool:
        return not (self.username or self.identity_token or self.registry_token)


@dataclass(frozen=True)
class Platform:
    """An OCI platform: what an image index entry runs on."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        import platform as _p

        m = _p.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
                "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)
        variant = "v8" if arch == "arm64" else ("v7" if arch == "arm" else "")
        return cls("linux", arch, variant)

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


# ---------------------------------------------------------------------------
# Sandbox and container configuration (the runtime layer).
# ---------------------------------------------------------------------------

# Namespace modes, as the CRI names them.
POD = "pod"
CONTAINER = "container"
NODE = "node"
_NS_MODES = (POD, CONTAINER, NODE)

PROPAGATIONS = ("private", "rslave", "rshared")

# Sysctls that are namespaced, by the namespace that holds them. Anything else
# is a host-wide knob and is refused.
_IPC_SYSCTLS = {"kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced",
                "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem"}
_UTS_SYSCTLS = {"kernel.domainname"}
_SYSCTL_NAME = _re.compile(r"^[a-z0-9_]+(?:[./][a-zA-Z0-9_-]+)+$")
_NAME = _re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}$")


def _bad(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(msg)


def sysctl_namespace(name: str) -> str:
    """Which namespace holds sysctl ``name`` ("ipc", "net" or "uts"); raise if none does."""
    if not _SYSCTL_NAME.match(name) or ".." in name:
        raise _bad(f"sysctl {name!r}: malformed name")
    key = name.replace("/", ".")
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net."):
        return "net"
    if key in _UTS_SYSCTLS:
        return "uts"
    raise _bad(f"sysctl {name!r} is not namespaced: it would change the host; not allowed")


def validate_sysctls(sysctls: _Mapping[str, str], network: str, ipc: str) -> None:
    """Refuse host-wide sysctls, values that could smuggle extra writes, and sysctls
    aimed at a namespace the pod shares with the host (SECURITY.md 12). The UTS
    namespace goes with the network one: a pod on the host network has the host's."""
    if not isinstance(sysctls, _Mapping):
        raise _bad("sysctls must be a mapping of name to value")
    for name, value in sysctls.items():
        if not isinstance(name, str):
            raise _bad(f"sysctl name {name!r} must be a string")
        ns = sysctl_namespace(name)
        if not isinstance(value, str) or any(c in value for c in "+=\n\r\0") or len(value) > 4096:
            raise _bad(f"sysctl {name}: value {value!r} contains '+', '=', a newline or NUL")
        if ns == "net" and network == NODE:
            raise _bad(f"sysctl {name}: the pod uses the host network namespace")
        if ns == "uts" and network == NODE:
            raise _bad(f"sysctl {name}: the pod uses the host UTS namespace (host network)")
        if ns == "ipc" and ipc == NODE:
            raise _bad(f"sysctl {name}: the pod uses the host IPC namespace")


# Resource limits by name (setrlimit(2)); values are Linux's generic numbers, used
# where Python's resource module lacks the constant.
RLIMITS = {"CPU": 0, "FSIZE": 1, "DATA": 2, "STACK": 3, "CORE": 4, "RSS": 5, "NPROC": 6,
           "NOFILE": 7, "MEMLOCK": 8, "AS": 9, "LOCKS": 10, "SIGPENDING": 11, "MSGQUEUE": 12,
           "NICE": 13, "RTPRIO": 14, "RTTIME": 15}
RLIM_UNLIMITED = -1


def rlimit_name(name: object) -> str:
    """The canonical name ("RLIMIT_NOFILE") of "nofile", "NOFILE", "rlimit_nofile" ..."""
    if not isinstance(name, str):
        raise _bad(f"rlimit name {name!r} must be a string")
    key = name.upper().removeprefix("RLIMIT_")
    if key not in RLIMITS:
        raise _bad(f"unknown rlimit {name!r}: use one of "
                   f"{', '.join(k.lower() for k in RLIMITS)} (or RLIMIT_<NAME>)")
    return "RLIMIT_" + key


def _rlimit_value(name: str, what: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (v == RLIM_UNLIMITED or 0 <= v < 2**63):
        raise _bad(f"rlimit {name}: {what} limit {v!r} must be an integer >= 0, "
                   "or -1 for unlimited")
    return v


def validate_rlimits(rlimits: _Mapping[str, object]) -> dict[str, tuple[int, int]]:
    """{name: (soft, hard)} with canonical names; soft may not exceed hard."""
    if not isinstance(rlimits, _Mapping):
        raise _bad("rlimits must be a mapping of name to (soft, hard)")
    out: dict[str, tuple[int, int]] = {}
    for name, pair in rlimits.items():
        key = rlimit_name(name)
        if key in out:
            raise _bad(f"rlimit {key} given twice")
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise _bad(f"rlimit {key}: expected (soft, hard), got {pair!r}")
        soft = _rlimit_value(key, "soft", pair[0])
        hard = _rlimit_value(key, "hard", pair[1])
        if hard != RLIM_UNLIMITED and (soft == RLIM_UNLIMITED or soft > hard):
            shown = "unlimited" if soft == RLIM_UNLIMITED else soft
            raise _bad(f"rlimit {key}: soft limit {shown} is above the hard limit {hard}")
        out[key] = (soft, hard)
    return out


def validate_cgroup_parent(parent: str) -> str:
    """A relative cgroup path of plain components; no '..', no empty parts (SECURITY.md 13)."""
    if not parent:
        return ""
    return "/".join(_cgroup.validate_cgroup_parent(parent))


@dataclass(frozen=True)
class IDMapping:
    """One user-namespace id mapping: container ids [container_id, +length) -> host ids."""

    container_id: int
    host_id: int
    length: int


@dataclass(frozen=True)
class UserNamespace:
    """A user namespace for the pod, with exactly one uid and one gid mapping."""

    uids: tuple[IDMapping, ...]
    gids: tuple[IDMapping, ...]

    def __post_init__(self) -> None:
        for kind, maps in (("uid", self.uids), ("gid", self.gids)):
            if len(maps) != 1:
                raise _bad(f"user namespace needs exactly one {kind} mapping, got {len(maps)}")
            m = maps[0]
            if m.container_id != 0:
                raise _bad(f"user namespace {kind} mapping must start at container id 0")
            if m.length < 1 or m.host_id < 0 or m.host_id + m.length > 2**32 - 1:
                raise _bad(f"user namespace {kind} mapping {m} is out of range")


@dataclass(frozen=True)
class Mount:
    """A bind mount from the host into a container, or (``image`` set, ``host_path``
    empty) an image volume: the image's files, read-only, optionally only ``sub_path``."""

    container_path: str
    host_path: str = ""
    readonly: bool = False
    recursive_readonly: bool = False
    propagation: str = "private"
    image: str = ""
    sub_path: str = ""
    # id-mapped mount (CRI Mount.uidMappings/gidMappings): both or neither, one mapping
    # each, equal to the pod's user namespace. Without them a bind into a pod with a
    # user namespace is id-mapped where the source's filesystem allows it.
    uid_mappings: tuple[IDMapping, ...] = ()
    gid_mappings: tuple[IDMapping, ...] = ()

    def __post_init__(self) -> None:
        if self.uid_mappings or self.gid_mappings:
            try:  # the same rules as the pod's
                UserNamespace(tuple(self.uid_mappings), tuple(self.gid_mappings))
            except InvalidArgumentError as e:
                raise _bad(f"id-mapped mount at {self.container_path!r}: {e}") from None
            object.__setattr__(self, "uid_mappings", tuple(self.uid_mappings))
            object.__setattr__(self, "gid_mappings", tuple(self.gid_mappings))
        cp = self.container_path
        if not isinstance(cp, str) or not cp.startswith("/") or "\0" in cp:
            raise _bad(f"mount target {cp!r} must be an absolute path")
        if any(part == ".." for part in cp.split("/")):
            raise _bad(f"mount target {cp!r} contains '..'")
        norm = _pp.normpath(cp)
        for forbidden in ("/proc", "/sys"):
            if norm == forbidden or norm.startswith(forbidden + "/"):
                raise _bad(f"mount target {cp!r} is inside {forbidden}; not allowed")
        if norm == "/":
            raise _bad("mount target '/' would replace the root filesystem")
        if self.image:
            if self.host_path:
                raise _bad("a mount has either a host_path or an image, not both")
            if not self.readonly:
                raise _bad(f"image volume at {cp!r} must be read-only")
            sp = self.sub_path
            if sp and (sp.startswith("/") or "\0" in sp or ".." in sp.split("/")):
                raise _bad(f"image volume sub_path {sp!r} must be relative, without '..'")
        elif self.sub_path:
            raise _bad("sub_path is only for image volumes")
        elif not isinstance(self.host_path, str) or not self.host_path.startswith("/") \
                or "\0" in self.host_path:
            raise _bad(f"mount source {self.host_path!r} must be an absolute host path")
        if self.propagation not in PROPAGATIONS:
            raise _bad(f"mount propagation {self.propagation!r}: use one of {PROPAGATIONS}")
        if self.recursive_readonly and not self.readonly:
            raise _bad("recursive read-only mount requires readonly=True")
        if self.recursive_readonly and self.propagation != "private":
            raise _bad("recursive read-only mount requires private propagation")
        object.__setattr__(self, "container_path", norm)


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for v in (*self.servers, *self.searches, *self.options):
            if not v or any(c in v for c in " \t\n\r\0#;"):
                raise _bad(f"DNS setting {v!r} is empty or contains whitespace or comment marks")


@dataclass(frozen=True)
class PortMapping:
    container_port: int
    host_port: int = 0
    protocol: str = "tcp"
    host_ip: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp", "sctp"):
            raise _bad(f"port protocol {self.protocol!r}: use tcp, udp or sctp")
        for p in (self.container_port, self.host_port):
            if not 0 <= p <= 65535:
                raise _bad(f"port {p} is out of range")


@dataclass(frozen=True)
class SandboxConfig:
    """A pod: shared namespaces, network, hostname, DNS and a parent cgroup."""

    name: str
    namespace: str = "default"
    uid: str = ""
    attempt: int = 0
    hostname: str = ""
    log_directory: str = ""
    dns: DNSConfig | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    network: str = POD       # POD: own netns (CNI if configured, else loopback only); NODE: host
    pid: str = CONTAINER     # CONTAINER: each container its own; POD: shared; NODE: host
    ipc: str = POD           # POD or NODE
    privileged: bool = False
    user_namespace: UserNamespace | None = None
    runtime_handler: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise _bad(f"sandbox name {self.name!r}: letters, digits, '.', '_' and '-' only")
        if self.hostname and not _re.match(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,62})$", self.hostname):
            raise _bad(f"hostname {self.hostname!r} is not a valid host name")
        for what, mode, allowed in (("network", self.network, (POD, NODE)),
                                    ("pid", self.pid, _NS_MODES), ("ipc", self.ipc, (POD, NODE))):
            if mode not in allowed:
                raise _bad(f"sandbox {what} mode {mode!r}: use one of {allowed}")
        object.__setattr__(self, "cgroup_parent", validate_cgroup_parent(self.cgroup_parent))
        validate_sysctls(self.sysctls, self.network, self.ipc)
        if self.user_namespace and NODE in (self.network, self.pid, self.ipc):
            raise _bad("a user namespace cannot be combined with host namespaces")


@dataclass(frozen=True)
class ContainerConfig:
    """A container in a sandbox. ``command``/``args`` override the image's entrypoint/cmd."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    resources: Resources = field(default_factory=Resources)
    run_as_user: int | None = None
    run_as_username: str = ""
    run_as_group: int | None = None
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: str = "Merge"      # or "Strict": no groups from the image
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    privileged: bool = False
    no_new_privs: bool = False
    readonly_rootfs: bool = False
    masked_paths: tuple[str, ...] | None = None     # None: the default list
    readonly_paths: tuple[str, ...] | None = None   # None: the default list
    seccomp: str = "RuntimeDefault"                 # "RuntimeDefault", "Unconfined" or a file path
    pid: str = ""                                   # "" follows the sandbox; CONTAINER/POD/NODE
    oom_score_adj: int = 0
    # setrlimit(2) limits by name ("RLIMIT_NOFILE" or "nofile") -> (soft, hard), -1 =
    # unlimited; they replace the defaults (see pycri.container.default_rlimits)
    rlimits: dict[str, tuple[int, int]] = field(default_factory=dict)
    # namespaced sysctls only (the allowlist of SandboxConfig.sysctls); they are written
    # into the pod's namespaces, so every container of the pod sees them
    sysctls: dict[str, str] = field(default_factory=dict)
    attempt: int = 0                                # restart count: (name, attempt) is unique

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise _bad(f"container name {self.name!r}: letters, digits, '.', '_' and '-' only")
        if not isinstance(self.image, str) or not self.image:
            raise _bad("container image must be a non-empty string")
        for what in ("command", "args"):
            v = getattr(self, what)
            if isinstance(v, str) or not all(isinstance(x, str) and "\0" not in x for x in v):
                raise _bad(f"container {what} must be a list of strings without NUL")
            object.__setattr__(self, what, tuple(v))
        env = self.env
        if isinstance(env, _Mapping):
            env = tuple(env.items())
        for k, v in env:
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise _bad(f"environment variable {k!r}: empty, or contains '=' or NUL")
        object.__setattr__(self, "env", tuple(env))
        if self.working_dir and not self.working_dir.startswith("/"):
            raise _bad(f"working_dir {self.working_dir!r} must be absolute")
        if self.run_as_group is not None and self.run_as_user is None and not self.run_as_username:
            raise _bad("run_as_group requires run_as_user or run_as_username")
        for what, v in (("run_as_user", self.run_as_user), ("run_as_group", self.run_as_group)):
            if v is not None and not 0 <= v <= 2**31 - 1:
                raise _bad(f"{what} {v} is out of range")
        if any(not 0 <= g <= 2**31 - 1 for g in self.supplemental_groups):
            raise _bad("supplemental group id out of range")
        if self.supplemental_groups_policy not in ("Merge", "Strict"):
            raise _bad("supplemental_groups_policy must be 'Merge' or 'Strict'")
        if self.pid and self.pid not in _NS_MODES:
            raise _bad(f"container pid mode {self.pid!r}: use one of {_NS_MODES}")
        for cap in (*self.cap_add, *self.cap_drop):
            if cap.upper() != "ALL" and not _re.match(r"^(CAP_)?[A-Z_]+$", cap.upper()):
                raise _bad(f"capability {cap!r} is malformed")
        if not isinstance(self.resources, Resources):
            raise _bad("container resources must be a Resources")
        if self.stdin_once and not self.stdin:
            raise _bad("stdin_once requires stdin")
        object.__setattr__(self, "rlimits", validate_rlimits(self.rlimits))
        # the pod's namespace modes are checked at create, against the sandbox
        validate_sysctls(self.sysctls, POD, POD)
        object.__setattr__(self, "sysctls", dict(self.sysctls))


# ---------------------------------------------------------------------------
# JSON round trip of the config dataclasses (for on-disk records).
# ---------------------------------------------------------------------------

_PLAIN = frozenset((str, int, float, bool, type(None)))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields of a dataclass type, None for any other type (looked up once)."""
    return tuple(f.name for f in _dc.fields(cls)) if _dc.is_dataclass(cls) else None


def to_json(obj: object) -> object:
    """A dataclass config as plain JSON values (tuples become lists)."""
    # The exact types records are made of go first; anything else takes the general
    # path below (same answers, a few type tests more).
    t = type(obj)
    if t in _PLAIN:
        return obj
    if t is tuple or t is list:
        return [to_json(x) for x in obj]  # type: ignore[attr-defined]
    if t is dict:
        return {str(k): to_json(v) for k, v in obj.items()}  # type: ignore[attr-defined]
    names = _field_names(t)  # type: ignore[arg-type]
    if names is not None:
        return {n: to_json(getattr(obj, n)) for n in names}
    if isinstance(obj, _Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(x) for x in obj]
    return obj


def _same(v: object) -> object:
    return v


def _converter(tp: object) -> _t.Callable[[object], object]:
    """How a JSON value becomes a field of type ``tp`` (None stays None), worked out
    once per field from its type instead of once per value."""
    origin = _t.get_origin(tp)
    args = _t.get_args(tp)
    if origin in (_t.Union, _types.UnionType):
        real = [a for a in args if a is not type(None)]
        return _converter(real[0]) if real else _same
    if isinstance(tp, type) and _dc.is_dataclass(tp):
        cls = tp
        return lambda v: None if v is None else from_json(cls, v)
    if origin is tuple:
        inner = _converter(args[0] if args else object)
        if inner is _same:
            return lambda v: None if v is None else tuple(v)  # type: ignore[arg-type]
        return lambda v: None if v is None else tuple(inner(x) for x in v)  # type: ignore[attr-defined]
    if origin in (dict, _Mapping) or tp is dict:
        return lambda v: None if v is None else dict(v)  # type: ignore[call-overload]
    return _same


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, _t.Callable[[object], object]], ...]:
    """Each field of a config class with its converter (resolving hints is slow)."""
    hints = _t.get_type_hints(cls)
    return tuple((f.name, _converter(hints[f.name])) for f in _dc.fields(cls))


def from_json(cls: type, data: object) -> object:
    """Rebuild a config dataclass (validating it again) from ``to_json`` output."""
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{cls.__name__}: expected an object")
    return cls(**{name: conv(data[name]) for name, conv in _plan(cls) if name in data})
