"""Cgroups: Resources -> cgroup v1 / v2 files, stats, kill-all and removal.

Policy lives here; the C core (csrc/cgroup.c via ``pycri._native``) only opens
files beneath a cgroup directory fd (openat2 RESOLVE_BENEATH), writes values in
one write(2), reads files, runs the kill loop and retries rmdir.

Layout: ``<parent>/<pod-id>`` for a pod and ``<parent>/<pod-id>/<ctr-id>`` for a
container, in every v1 controller hierarchy, or once under the v2 mount. On a
hybrid host (v1 controllers plus a cgroup2 mount holding controllers that no v1
hierarchy has, e.g. hugetlb) the cgroup is created in the unified mount as well,
with those controllers enabled along the path, and its cgroup.procs is one of
the files a spawner must join.

Use::

    mgr = CgroupManager("pycri")                    # detects v1 / v2 / hybrid
    pod = mgr.create_pod(pod_id, Resources(cpu_shares=512))
    ctr = mgr.create_container(pod_id, ctr_id, Resources(memory_limit_in_bytes=64 << 20))
    spawner_writes_pid_into(ctr.procs_files())      # absolute .../cgroup.procs paths
    ctr.update(Resources(pids_limit=100))           # all-or-nothing
    ctr.stats()                                     # Stats(cpu_usage_ns=..., ...)
    ctr.kill(); ctr.remove()                        # or ctr.destroy(); then pod.destroy()

Errors: InvalidArgumentError for bad input or a value the kernel refuses,
UnsupportedError for a controller the host lacks, AlreadyExistsError,
NotFoundError (container without its pod), RuntimeFailure(stage="cgroup") for
other failures; kill/remove raise OSError (TimeoutError when processes remain).

Limitations (documented, tested where they can be):
  - v2 device rules need an eBPF program; they are not applied on v2.
  - The ``unified`` map is a v2 feature and is refused on v1.
  - Only the cgroupfs layout (plain directories) is supported, not systemd slices.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pycri import _native
from pycri.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    RuntimeFailure,
    UnsupportedError,
)

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "pycri"

# The v1 controllers pycri manages (one hierarchy each; a comounted "cpu,cpuacct"
# mount serves both names).
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
                  "blkio", "hugetlb")
# The v2 controllers pycri enables in subtree_control along its path.
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io", "hugetlb")

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_@+:.-]{1,255}$")
_UNIFIED_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
_CPUSET_RE = re.compile(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$")
_PAGESIZE_RE = re.compile(r"^([0-9]+)(KB|MB|GB)$")
# Files a unified key may never name: they move or kill processes, or reshape the tree.
_UNIFIED_DENY = frozenset({"cgroup.procs", "cgroup.threads", "cgroup.kill",
                           "cgroup.subtree_control", "cgroup.type"})

SHARES_MIN, SHARES_MAX = 2, 262144


# --- inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRule:
    """One v1 devices rule: ``allow`` or deny ``type major:minor access``.

    ``type`` is "a", "c" or "b"; ``major``/``minor`` None means any (``*``);
    ``access`` a subset of "rwm".
    """

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = "rwm"

    def __post_init__(self) -> None:
        if self.type not in ("a", "c", "b"):
            raise InvalidArgumentError(f"device rule type {self.type!r} is not a, c or b")
        for name in ("major", "minor"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)
                                  or not 0 <= v < 1 << 20):
                raise InvalidArgumentError(f"device rule {name} {v!r} out of range")
        if not self.access or any(c not in "rwm" for c in self.access) \
                or len(set(self.access)) != len(self.access):
            raise InvalidArgumentError(f"device rule access {self.access!r} is not a subset of rwm")

    def line(self) -> str:
        if self.type == "a":
            return "a"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {self.access}"


# What every container may use (the usual OCI default set).
DEFAULT_DEVICES: tuple[DeviceRule, ...] = (
    DeviceRule(True, "c", 1, 3, "rwm"),     # /dev/null
    DeviceRule(True, "c", 1, 5, "rwm"),     # /dev/zero
    DeviceRule(True, "c", 1, 7, "rwm"),     # /dev/full
    DeviceRule(True, "c", 1, 8, "rwm"),     # /dev/random
    DeviceRule(True, "c", 1, 9, "rwm"),     # /dev/urandom
    DeviceRule(True, "c", 5, 0, "rwm"),     # /dev/tty
    DeviceRule(True, "c", 5, 2, "rwm"),     # /dev/ptmx
    DeviceRule(True, "c", 136, None, "rwm"),  # /dev/pts/*
)


def _limit(name: str, v: object, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(v).__name__}")
    if v != -1 and not minimum <= v <= (1 << 62):
        raise InvalidArgumentError(f"{name} {v} out of range")
    return v


@dataclass(frozen=True)
class Resources:
    """Container or pod resources, in CRI units (``LinuxContainerResources``).

    0 means "not set" (leave the kernel's value); -1 means "unlimited" where the
    kernel has such a value (quota, memory, swap, pids).
    ``memory_swap_limit_in_bytes`` is memory plus swap, as in CRI and v1 memsw.
    ``hugepage_limits`` maps a page size ("2MB", "1GB") to a byte limit.
    ``unified`` is the raw v2 map: file name -> value (v2 only).
    ``devices`` are extra rules after the default set (v1 only).
    """

    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    memory_limit_in_bytes: int = 0
    memory_swap_limit_in_bytes: int = 0
    pids_limit: int = 0
    hugepage_limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    unified: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    devices: tuple[DeviceRule, ...] = ()

    def __post_init__(self) -> None:
        s = _limit("cpu_shares", self.cpu_shares)
        if s == -1 or (s and not SHARES_MIN <= s <= SHARES_MAX):
            raise InvalidArgumentError(f"cpu_shares {s} outside {SHARES_MIN}..{SHARES_MAX}")
        q = _limit("cpu_quota", self.cpu_quota)
        if q not in (0, -1) and q < 1000:
            raise InvalidArgumentError(f"cpu_quota {q} is below 1000 microseconds")
        p = _limit("cpu_period", self.cpu_period)
        if p == -1 or (p and not 1000 <= p <= 1_000_000):
            raise InvalidArgumentError(f"cpu_period {p} outside 1000..1000000 microseconds")
        for name in ("cpuset_cpus", "cpuset_mems"):
            v = getattr(self, name)
            if not isinstance(v, str) or (v and not _CPUSET_RE.fullmatch(v)):
                raise InvalidArgumentError(f"{name} {v!r} is not a cpu list like 0-3,5")
        _limit("memory_limit_in_bytes", self.memory_limit_in_bytes)
        _limit("memory_swap_limit_in_bytes", self.memory_swap_limit_in_bytes)
        _limit("pids_limit", self.pids_limit)
        for size, lim in self.hugepage_limits.items():
            if not isinstance(size, str) or not _PAGESIZE_RE.fullmatch(size):
                raise InvalidArgumentError(f"hugepage size {size!r} is not like 2MB or 1GB")
            _limit(f"hugepage_limits[{size}]", lim)
        for key, val in self.unified.items():
            validate_unified_key(key)
            if not isinstance(val, str) or "\n" in val or "\0" in val or len(val) > 4096:
                raise InvalidArgumentError(f"unified[{key!r}] value must be one line of text")
        object.__setattr__(self, "hugepage_limits", MappingProxyType(dict(self.hugepage_limits)))
        object.__setattr__(self, "unified", MappingProxyType(dict(self.unified)))
        object.__setattr__(self, "devices", tuple(self.devices))
        for d in self.devices:
            if not isinstance(d, DeviceRule):
                raise InvalidArgumentError("devices must be DeviceRule values")


def validate_unified_key(key: object) -> str:
    """A unified key is a plain cgroup file name: no '/', no '..', not a control file."""
    if not isinstance(key, str) or not _UNIFIED_KEY_RE.fullmatch(key) or ".." in key:
        raise InvalidArgumentError(f"unified key {key!r} is not a plain cgroup file name")
    if key in _UNIFIED_DENY:
        raise InvalidArgumentError(f"unified key {key!r} may not be set")
    return key


def validate_cgroup_parent(parent: object) -> tuple[str, ...]:
    """Split a cgroup_parent ("pycri", "/kubepods/burstable") into checked components.

    A leading '/' means "from the hierarchy root" (as kubelet sends it); ``..``,
    ``.``, empty components and odd characters are refused (SECURITY.md 13).
    """
    if not isinstance(parent, str) or not parent:
        raise InvalidArgumentError("cgroup_parent must be a non-empty string")
    rel = parent.removeprefix("/")
    parts = tuple(rel.split("/"))
    for p in parts:
        if p in ("", ".", "..") or not _COMPONENT_RE.fullmatch(p):
            raise InvalidArgumentError(f"cgroup_parent {parent!r}: bad component {p!r}")
    return parts


def _validate_id(kind: str, v: object) -> str:
    if not isinstance(v, str) or v in (".", "..") or not _COMPONENT_RE.fullmatch(v):
        raise InvalidArgumentError(f"{kind} {v!r} is not a valid cgroup name")
    return v


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) to cpu.weight (1..10000), the usual linear map."""
    return 1 + ((shares - 2) * 9999) // 262142


def hugepage_sizes() -> list[str]:
    """Host huge page sizes as cgroup names ("2MB", "1GB")."""
    out: list[str] = []
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except FileNotFoundError:
        return out
    for n in names:
        m = re.fullmatch(r"^hugepages-([0-9]+)kB$", n)
        if m:
            kb = int(m.group(1))
            if kb % (1 << 20) == 0:
                out.append(f"{kb >> 20}GB")
            elif kb % 1024 == 0:
                out.append(f"{kb >> 10}MB")
            else:
                out.append(f"{kb}KB")
    return sorted(out)


# --- the host's hierarchies ---------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """Where the controllers are mounted.

    ``version`` 2: everything under ``v2_root``. ``version`` 1: ``v1`` maps each
    controller to its mount point; ``v2_root`` (if any) is the unified mount of a
    hybrid host, used for ``v2_only`` controllers (those in its cgroup.controllers
    that no v1 hierarchy has).
    """

    version: int
    v1: Mapping[str, str] = field(default_factory=dict)
    v2_root: str | None = None
    v2_only: frozenset[str] = frozenset()

    @classmethod
    def detect(cls, root: str = CGROUP_ROOT, mountinfo: str = "/proc/self/mountinfo") -> Hierarchy:
        if _native.cgroup_fstype(root) == _native.CGROUP_V2:
            return cls(2, {}, root, frozenset())
        v1: dict[str, str] = {}
        unified = None
        with open(mountinfo) as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                rest = post.split()
                if len(fields) < 5 or len(rest) < 3:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if rest[0] == "cgroup2" and unified is None:
                    unified = mnt
                elif rest[0] == "cgroup":
                    for opt in rest[2].split(","):
                        if opt in V1_CONTROLLERS and opt not in v1:
                            v1[opt] = mnt
        if not v1:
            if unified is not None:
                return cls(2, {}, unified, frozenset())
            raise UnsupportedError("no cgroup hierarchy is mounted")
        v2_only: frozenset[str] = frozenset()
        if unified is not None:
            try:
                with open(os.path.join(unified, "cgroup.controllers")) as f:
                    avail = set(f.read().split())
                v2_only = frozenset(c for c in avail if c not in v1 and c in V2_CONTROLLERS)
            except OSError:
                pass
        return cls(1, v1, unified if v2_only else None, v2_only)


# --- one cgroup across hierarchies --------------------------------------------


@dataclass
class Stats:
    """Usage figures of one cgroup (CRI ContainerStats units)."""

    cpu_usage_ns: int = 0
    memory_usage_bytes: int = 0
    memory_working_set_bytes: int = 0
    pids_current: int = 0
    oom_kill_count: int = 0


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _to_int(text: str) -> int:
    t = text.strip()
    return int(t) if t.lstrip("-").isdigit() else 0


class _Dirs:
    """Open dir fds by key, closed together."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def get(self, key: str, path: str) -> int:
        fd = self.fds.get(key)
        if fd is None:
            fd = self.fds[key] = _native.cgroup_open(path)
        return fd

    def __enter__(self) -> _Dirs:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            os.close(fd)


class Cgroup:
    """One cgroup (``relpath`` below each hierarchy root) in every hierarchy it lives in.

    ``dirs`` maps a key to an absolute directory: a v1 controller name, or "unified"
    for the v2 directory (the whole cgroup on a v2 host, the v2-only controllers on
    a hybrid one).
    """

    def __init__(self, hierarchy: Hierarchy, relpath: str) -> None:
        self.hierarchy = hierarchy
        self.relpath = relpath
        dirs: dict[str, str] = {}
        if hierarchy.version == 1:
            for ctl, mnt in hierarchy.v1.items():
                dirs[ctl] = os.path.join(mnt, relpath)
        if hierarchy.v2_root is not None:
            dirs["unified"] = os.path.join(hierarchy.v2_root, relpath)
        self.dirs = dirs

    @property
    def v2(self) -> bool:
        return self.hierarchy.version == 2

    def __repr__(self) -> str:
        return f"Cgroup({self.relpath!r}, v{self.hierarchy.version})"

    def paths(self) -> list[str]:
        """Distinct directories of this cgroup (co-mounted controllers share one)."""
        return sorted(set(self.dirs.values()))

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a new process must be written into."""
        return [os.path.join(d, "cgroup.procs") for d in self.paths()]

    def _accounting_dirs(self) -> set[str]:
        return {self.dirs[c] for c in ("memory", "pids") if c in self.dirs}

    def procs_files_accounting_last(self) -> tuple[list[str], int]:
        """procs_files() with those of the dirs that account memory and pids last,
        and how many those are (SpawnSpec.cgroup_late)."""
        late = self._accounting_dirs()
        early = [d for d in self.paths() if d not in late]
        return [os.path.join(d, "cgroup.procs") for d in early + sorted(late)], len(late)

    @property
    def accounting_in_v2(self) -> bool:
        """Whether memory or pids is accounted in a v2 dir (which a held process could
        join only by taking the global threadgroup lock: no pre-clone there)."""
        return self.dirs.get("unified") in self._accounting_dirs()

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.paths())

    def add_pid(self, pid: int) -> None:
        """Move pid into this cgroup in every hierarchy."""
        for d in self.paths():
            fd = _native.cgroup_open(d)
            try:
                _native.cgroup_write(fd, "cgroup.procs", str(pid))
            finally:
                os.close(fd)

    def pids(self) -> list[int]:
        d = self._dir_for("freezer") or self._dir_for("pids") or self.paths()[0]
        fd = _native.cgroup_open(d)
        try:
            text = _native.cgroup_read(fd, "cgroup.procs", 1 << 22)
        finally:
            os.close(fd)
        return [int(x) for x in text.split()]

    def has_processes(self) -> bool:
        """Whether any process is in the cgroup (FileNotFoundError if it is gone)."""
        d = self._dir_for("freezer") or self._dir_for("pids") or self.paths()[0]
        fd = os.open(os.path.join(d, "cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return bool(os.read(fd, 16).strip())
        finally:
            os.close(fd)

    def _dir_for(self, controller: str) -> str | None:
        if self.v2:
            return self.dirs["unified"]
        if controller in self.dirs:
            return self.dirs[controller]
        if controller in self.hierarchy.v2_only:
            return self.dirs.get("unified")
        return None

    def _key_for(self, controller: str) -> str | None:
        if self.v2 or (controller not in self.dirs and controller in self.hierarchy.v2_only):
            return "unified" if "unified" in self.dirs else None
        return controller if controller in self.dirs else None

    # -- writes ----------------------------------------------------------------

    def _plan(self, res: Resources, fds: _Dirs) -> list[tuple[str, str, str]]:
        """The (dir key, file, value) writes that apply res, in a safe order."""
        w: list[tuple[str, str, str]] = []

        def need(controller: str) -> str:
            key = self._key_for(controller)
            if key is None:
                raise UnsupportedError(f"the {controller} controller is not available here")
            return key

        hp_sizes = hugepage_sizes()
        for size in res.hugepage_limits:
            if size not in hp_sizes:
                raise InvalidArgumentError(
                    f"hugepage size {size} is not supported by this host ({hp_sizes})")

        if self.v2:
            u = "unified"
            if res.cpu_shares:
                w.append((u, "cpu.weight", str(shares_to_weight(res.cpu_shares))))
            if res.cpu_quota or res.cpu_period:
                quota = "max" if res.cpu_quota in (0, -1) else str(res.cpu_quota)
                w.append((u, "cpu.max", f"{quota} {res.cpu_period or 100000}"))
            if res.cpuset_cpus:
                w.append((u, "cpuset.cpus", res.cpuset_cpus))
            if res.cpuset_mems:
                w.append((u, "cpuset.mems", res.cpuset_mems))
            mem = res.memory_limit_in_bytes
            if mem:
                w.append((u, "memory.max", "max" if mem == -1 else str(mem)))
            swap = res.memory_swap_limit_in_bytes
            if swap and os.path.exists(os.path.join(self.dirs[u], "memory.swap.max")):
                if swap == -1 or mem == -1:
                    w.append((u, "memory.swap.max", "max"))
                elif mem > 0:
                    if swap < mem:
                        raise InvalidArgumentError("memory_swap_limit_in_bytes is below the memory limit")
                    w.append((u, "memory.swap.max", str(swap - mem)))
            if res.pids_limit:
                w.append((u, "pids.max", "max" if res.pids_limit == -1 else str(res.pids_limit)))
            for size, lim in sorted(res.hugepage_limits.items()):
                w.append((u, f"hugetlb.{size}.max", "max" if lim == -1 else str(lim)))
            # A controller that is not enabled here has no files: say so clearly.
            for _k, name, _v in w:
                if not os.path.exists(os.path.join(self.dirs[u], name)):
                    ctl = name.split(".", 1)[0]
                    raise UnsupportedError(f"the {ctl} controller is not available here "
                                           f"({name} is missing)")
            for key, val in sorted(res.unified.items()):
                if not os.path.exists(os.path.join(self.dirs[u], key)):
                    raise InvalidArgumentError(f"unified key {key!r} is not a file of this cgroup")
                w.append((u, key, val))
            return w

        if res.unified:
            raise InvalidArgumentError("the unified map needs cgroup v2; this host runs v1")
        if res.cpu_shares:
            w.append((need("cpu"), "cpu.shares", str(res.cpu_shares)))
        if res.cpu_period:
            w.append((need("cpu"), "cpu.cfs_period_us", str(res.cpu_period)))
        if res.cpu_quota:
            w.append((need("cpu"), "cpu.cfs_quota_us", str(res.cpu_quota)))
        if res.cpuset_cpus:
            w.append((need("cpuset"), "cpuset.cpus", res.cpuset_cpus))
        if res.cpuset_mems:
            w.append((need("cpuset"), "cpuset.mems", res.cpuset_mems))
        mem, swap = res.memory_limit_in_bytes, res.memory_swap_limit_in_bytes
        if mem or swap:
            k = need("memory")
            has_memsw = os.path.exists(os.path.join(self.dirs[k], "memory.memsw.limit_in_bytes"))
            mem_w = [(k, "memory.limit_in_bytes", str(mem))] if mem else []
            swap_w = [(k, "memory.memsw.limit_in_bytes", str(swap))] if swap and has_memsw else []
            if mem > 0 and swap > 0 and swap < mem:
                raise InvalidArgumentError("memory_swap_limit_in_bytes is below the memory limit")
            # memsw must stay >= limit at every step: raise memsw first when growing.
            cur_memsw = -1
            if has_memsw:
                cur_memsw = _to_int(_native.cgroup_read(fds.get(k, self.dirs[k]),
                                                        "memory.memsw.limit_in_bytes"))
            if mem == -1 or (mem > 0 and cur_memsw >= 0 and mem > cur_memsw):
                w += swap_w + mem_w
            else:
                w += mem_w + swap_w
        if res.pids_limit:
            w.append((need("pids"), "pids.max", "max" if res.pids_limit == -1 else str(res.pids_limit)))
        for size, lim in sorted(res.hugepage_limits.items()):
            k = need("hugetlb")
            if k == "unified":
                w.append((k, f"hugetlb.{size}.max", "max" if lim == -1 else str(lim)))
            else:
                w.append((k, f"hugetlb.{size}.limit_in_bytes", str(lim)))
        return w

    def apply(self, res: Resources, devices: bool = True) -> None:
        """Write res (at creation). On v1, also the device rules (deny all, then the
        default set and res.devices) when ``devices`` is true."""
        self.update(res)
        if devices and not self.v2 and "devices" in self.dirs:
            lines = [("devices.deny", "a")]
            lines += [("devices.allow" if d.allow else "devices.deny", d.line())
                      for d in DEFAULT_DEVICES + res.devices]
            with _Dirs() as fds:
                _native.cgroup_write_batch(fds.get("devices", self.dirs["devices"]), lines)

    def update(self, res: Resources) -> None:
        """Apply res all-or-nothing: old values are read first and written back,
        newest first, if any write fails."""
        with _Dirs() as fds:
            plan = self._plan(res, fds)
            done: list[tuple[str, str, str]] = []
            try:
                for key, name, value in plan:
                    fd = fds.get(key, self.dirs[key])
                    old = _native.cgroup_read(fd, name).strip()
                    _native.cgroup_write(fd, name, value)
                    done.append((key, name, old))
            except OSError as e:
                for key, name, old in reversed(done):
                    try:
                        _native.cgroup_write(fds.get(key, self.dirs[key]), name, old)
                    except OSError:
                        pass  # best effort: the original error is what matters
                if e.errno in (errno.EINVAL, errno.ERANGE, errno.EBUSY):
                    raise InvalidArgumentError(f"cgroup update refused: {e.strerror}") from e
                raise RuntimeFailure(f"cgroup update failed: {e.strerror}", "cgroup",
                                     e.errno or 0) from e

    # -- reads ---------------------------------------------------------------

    def read(self, controller: str, name: str) -> str:
        d = self._dir_for(controller)
        if d is None:
            raise UnsupportedError(f"the {controller} controller is not available here")
        fd = _native.cgroup_open(d)
        try:
            return _native.cgroup_read(fd, name)
        finally:
            os.close(fd)

    def stats(self) -> Stats:
        st = Stats()

        def opt(controller: str, name: str) -> str:
            try:
                return self.read(controller, name)
            except (OSError, UnsupportedError):
                return ""

        if self.v2:
            st.cpu_usage_ns = _kv(opt("cpu", "cpu.stat")).get("usage_usec", 0) * 1000
            st.memory_usage_bytes = _to_int(opt("memory", "memory.current"))
            inactive = _kv(opt("memory", "memory.stat")).get("inactive_file", 0)
            st.oom_kill_count = _kv(opt("memory", "memory.events")).get("oom_kill", 0)
        else:
            st.cpu_usage_ns = _to_int(opt("cpuacct", "cpuacct.usage"))
            st.memory_usage_bytes = _to_int(opt("memory", "memory.usage_in_bytes"))
            inactive = _kv(opt("memory", "memory.stat")).get("total_inactive_file", 0)
            st.oom_kill_count = _kv(opt("memory", "memory.oom_control")).get("oom_kill", 0)
        st.memory_working_set_bytes = max(0, st.memory_usage_bytes - inactive)
        st.pids_current = _to_int(opt("pids", "pids.current"))
        return st

    def oom_kill_file(self) -> str | None:
        """The file whose "oom_kill N" line counts this cgroup's OOM kills (v1
        memory.oom_control, v2 memory.events), or None without a memory controller."""
        d = self._dir_for("memory")
        if d is None:
            return None
        return os.path.join(d, "memory.events" if self.v2 else "memory.oom_control")

    def oom_kill_count(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            return int(_kv(self.read("memory", name)).get("oom_kill", 0))
        except (OSError, UnsupportedError):
            return 0

    # -- teardown -----------------------------------------------------------------

    def kill(self, timeout: float = 10.0) -> int:
        """SIGKILL every process in the cgroup (and below) until none is left."""
        sent = 0
        deadline = time.monotonic() + timeout
        if self.v2:
            order = [("unified", self.dirs["unified"])]
        else:
            # The freezer hierarchy first (frozen while we kill), then the rest
            # for anything that sits only in some hierarchies.
            order = sorted(self.dirs.items(), key=lambda kv: kv[0] != "freezer")
        seen = set()
        for key, d in order:
            if d in seen or not os.path.isdir(d):
                continue
            seen.add(d)
            for sub in self._walk_dirs(d):
                fd = _native.cgroup_open(sub)
                ffd = -1
                try:
                    if key == "freezer":
                        ffd = fd
                    left = max(0.1, deadline - time.monotonic())
                    sent += _native.cgroup_kill(fd, ffd, key == "unified" and self.v2, left)
                finally:
                    os.close(fd)
        return sent

    @staticmethod
    def _walk_dirs(top: str) -> list[str]:
        """top and its sub-cgroups, deepest first."""
        out = []
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            out.append(dirpath)
        return out

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir this cgroup (and any sub-cgroups, deepest first) in every hierarchy,
        retrying while exiting tasks still hold it."""
        deadline = time.monotonic() + timeout
        for d in self.paths():
            if not os.path.isdir(d):
                continue
            for sub in self._walk_dirs(d):
                _native.cgroup_rmdir(sub, max(0.1, deadline - time.monotonic()))

    def destroy(self, timeout: float = 10.0) -> None:
        """Remove the cgroup, killing whatever still runs in it first.

        The common case is a container that has exited: then one rmdir per hierarchy
        is all it takes. Only where that fails (tasks or sub-cgroups left) does the
        full kill() + remove() run."""
        busy = False
        for d in self.paths():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                busy = True
        if busy:
            self.kill(timeout)
            self.remove(timeout)


# --- policy: pods and containers ----------------------------------------------


_NO_LIMITS = Resources()


class CgroupManager:
    """Creates pod and container cgroups under ``parent`` (default "pycri")."""

    def __init__(self, parent: str = DEFAULT_PARENT, hierarchy: Hierarchy | None = None) -> None:
        self.parent = validate_cgroup_parent(parent)
        self.hierarchy = hierarchy if hierarchy is not None else Hierarchy.detect()

    def pod(self, pod_id: str) -> Cgroup:
        return Cgroup(self.hierarchy, "/".join(self.parent + (_validate_id("pod id", pod_id),)))

    def container(self, pod_id: str, ctr_id: str) -> Cgroup:
        rel = "/".join(self.parent + (_validate_id("pod id", pod_id),
                                      _validate_id("container id", ctr_id)))
        return Cgroup(self.hierarchy, rel)

    def create_pod(self, pod_id: str, resources: Resources | None = None) -> Cgroup:
        cg = self.pod(pod_id)
        self._create(cg, resources, devices=False)
        return cg

    def create_container(self, pod_id: str, ctr_id: str,
                         resources: Resources | None = None) -> Cgroup:
        pod = self.pod(pod_id)
        cg = self.container(pod_id, ctr_id)
        if not pod.exists():
            raise NotFoundError(f"pod cgroup {pod.relpath} does not exist")
        self._create(cg, resources, devices=True)
        return cg

    def pod_process_files(self, pod_id: str) -> list[str]:
        """cgroup.procs files for a process of the pod itself (its pid 1): the pod's
        own cgroup in v1 hierarchies; in the v2 one, which allows no process beside
        child cgroups with controllers, a leaf named after the pod (made here, gone
        with drop_pod_process_cgroup or the pod's cgroup)."""
        files = []
        v2 = self.hierarchy.v2_root
        for d in self.pod(pod_id).paths():
            if v2 is not None and (d == v2 or d.startswith(v2.rstrip("/") + "/")):
                d = os.path.join(d, _validate_id("pod id", pod_id))
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d, 0o755)
            files.append(os.path.join(d, "cgroup.procs"))
        return files

    def drop_pod_process_cgroup(self, pod_id: str) -> None:
        """rmdir the v2 leaf of pod_process_files (its process gone), if any."""
        v2 = self.hierarchy.v2_root
        for d in self.pod(pod_id).paths():
            if v2 is not None and (d == v2 or d.startswith(v2.rstrip("/") + "/")):
                with contextlib.suppress(FileNotFoundError):
                    _native.cgroup_rmdir(os.path.join(d, pod_id), 1.0)

    def configure_container(self, pod_id: str, ctr_id: str,
                            resources: Resources | None = None) -> Cgroup:
        """A container cgroup made ahead with the default limits and device rules
        (pycri/slots.py): apply ``resources``, all or nothing as ``update`` is."""
        cg = self.container(pod_id, ctr_id)
        res = resources if resources is not None else Resources()
        if res == _NO_LIMITS:
            return cg       # (what it was made with)
        cg.update(res)
        if res.devices and not cg.v2 and "devices" in cg.dirs:
            with _Dirs() as fds:
                _native.cgroup_write_batch(
                    fds.get("devices", cg.dirs["devices"]),
                    [("devices.allow" if r.allow else "devices.deny", r.line())
                     for r in res.devices])
        return cg

    def remove_parent(self, timeout: float = 5.0) -> None:
        """rmdir the parent's own components (deepest first) where they are empty;
        a parent still holding pods is left alone."""
        roots = list(self.hierarchy.v1.values())
        if self.hierarchy.v2_root is not None:
            roots.append(self.hierarchy.v2_root)
        for root in sorted(set(roots)):
            for i in range(len(self.parent), 0, -1):
                d = os.path.join(root, *self.parent[:i])
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    continue
                except OSError:
                    break

    def _create(self, cg: Cgroup, res: Resources | None, devices: bool) -> None:
        res = res if res is not None else Resources()
        created: list[str] = []
        try:
            try:
                items = sorted(cg.dirs.items())
                if devices:     # a container: its parents exist, one mkdir each, in one call
                    items = self._mkdir_leaves(items, created)
                for key, d in items:
                    self._mkdirs(key, d, created, devices)
                cg.apply(res, devices=devices)
            except OSError as e:
                raise RuntimeFailure(f"creating cgroup {cg.relpath}: {e}", "cgroup",
                                     e.errno or 0) from e
        except BaseException:
            # Nothing half-made stays behind: remove what this call created.
            for d in reversed(created):
                try:
                    _native.cgroup_rmdir(d, 1.0)
                except OSError:
                    pass
            raise

    def _mkdir_leaves(self, items: list[tuple[str, str]],
                      created: list[str]) -> list[tuple[str, str]]:
        """mkdir every leaf in one C call (their parents exist: a container under
        its pod); what is left for the slow path from the first that failed on a
        missing parent."""
        made = len(items)
        try:
            _native.mkdir_each([(d, 0o755) for _key, d in items])
        except FileExistsError as e:
            created.extend(d for _key, d in items[:e.made])  # type: ignore[attr-defined]
            raise AlreadyExistsError(f"cgroup {items[e.made][1]} already exists") from None  # type: ignore[attr-defined]
        except FileNotFoundError as e:
            made = e.made  # type: ignore[attr-defined]
        for key, d in items[:made]:
            created.append(d)
            if key == "cpuset":
                self._copy_cpuset(os.path.dirname(d), d, clone_children=False)
        return items[made:]

    def _mkdirs(self, key: str, leaf: str, created: list[str], devices: bool = False) -> None:
        if key == "unified" and not devices:
            # a pod: the walk below, then its own subtree_control, so its containers
            # get the controllers with a single mkdir (the fast path)
            self._mkdirs_walk(key, leaf, created)
            self._enable_v2(leaf)
            return
        # Fast path: the parent exists (a container under its pod), so one mkdir.
        try:
            os.mkdir(leaf, 0o755)
        except FileNotFoundError:
            pass                      # an ancestor is missing: the walk below
        except FileExistsError:
            raise AlreadyExistsError(f"cgroup {leaf} already exists") from None
        else:
            created.append(leaf)
            if key == "cpuset":
                self._copy_cpuset(os.path.dirname(leaf), leaf, clone_children=not devices)
            return
        self._mkdirs_walk(key, leaf, created)

    def _mkdirs_walk(self, key: str, leaf: str, created: list[str]) -> None:
        if key == "unified":
            root = self.hierarchy.v2_root
        else:
            root = self.hierarchy.v1[key]
        assert root is not None
        rel = os.path.relpath(leaf, root)
        cur = root
        for part in rel.split("/"):
            if key == "unified":
                self._enable_v2(cur)
            parent, cur = cur, os.path.join(cur, part)
            try:
                os.mkdir(cur, 0o755)
                created.append(cur)
            except FileExistsError:
                if cur == leaf and cur not in created:
                    raise AlreadyExistsError(f"cgroup {cur} already exists") from None
                continue
            if key == "cpuset":
                self._copy_cpuset(parent, cur)

    def _enable_v2(self, d: str) -> None:
        """Enable the controllers pycri uses in d's subtree_control."""
        fd = _native.cgroup_open(d)
        try:
            avail = set(_native.cgroup_read(fd, "cgroup.controllers").split())
            on = set(_native.cgroup_read(fd, "cgroup.subtree_control").split())
            want = [c for c in V2_CONTROLLERS if c in avail and c not in on
                    and (self.hierarchy.version == 2 or c in self.hierarchy.v2_only)]
            if want:
                _native.cgroup_write(fd, "cgroup.subtree_control",
                                     " ".join("+" + c for c in want))
        finally:
            os.close(fd)

    @staticmethod
    def _copy_cpuset(parent: str, child: str, clone_children: bool = True) -> None:
        """v1 cpuset: a new cgroup starts with empty cpus/mems and then no task can
        join it; inherit the parent's. Each cgroup pycri makes also gets
        cgroup.clone_children set, so the kernel fills in its children's at mkdir
        and this finds nothing to copy for them."""
        cfd = _native.cgroup_open(child)
        try:
            if not _native.cgroup_read(cfd, "cpuset.cpus").strip():
                pfd = _native.cgroup_open(parent)
                try:
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        if not _native.cgroup_read(cfd, name).strip():
                            _native.cgroup_write(cfd, name,
                                                 _native.cgroup_read(pfd, name).strip())
                finally:
                    os.close(pfd)
            if clone_children:
                try:
                    _native.cgroup_write(cfd, "cgroup.clone_children", "1")
                except OSError:
                    pass      # an old kernel without the flag: children copy instead
        finally:
            os.close(cfd)


__all__ = [
    "DEFAULT_DEVICES",
    "Cgroup",
    "CgroupManager",
    "DeviceRule",
    "Hierarchy",
    "Resources",
    "Stats",
    "hugepage_sizes",
    "shares_to_weight",
    "validate_cgroup_parent",
    "validate_unified_key",
]
