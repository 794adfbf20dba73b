"""CRI metrics, and the figures behind the CRI stats messages.

kubelet asks a runtime about usage two ways. The stats RPCs (ContainerStats,
PodSandboxStats and their lists) carry typed fields for the summary API and
eviction; the metrics RPCs (ListMetricDescriptors, ListPodSandboxMetrics) carry
the cAdvisor-named series kubelet republishes on /metrics/cadvisor when it runs
without cAdvisor. Both are built here from what the kernel says at the moment
of the call:

* the cgroup files of the pod's cgroup and of each container's (v1 or v2; on a
  hybrid host the pressure files come from the unified mount, whose cgroup the
  container joins as well),
* /proc/<pid>/fd and /proc/<pid>/limits of the cgroup's processes,
* /proc/<pid>/net/dev of a process inside the pod's network namespace; the
  process must be in the pod's cgroup and its namespace inode must equal the
  pinned namespace's, so a reused pid is never read,
* statvfs and a walk of the writable layer (Container.stats).

The one thing kept between calls is the previous CPU sample of each pod and
container: usage_nano_cores is a rate, so it needs two samples at least
CPU_WINDOW apart (the first call after a start leaves it unset, and kubelet
then computes it itself). Samples older than CPU_SAMPLE_TTL are dropped.

Metric series carry cAdvisor's label names: container, id (the cgroup path),
image, name (container or pod id), namespace, pod, then per-metric labels (cpu,
interface, device, ...). The pod's own series (its cgroup and its network) have
container="" and image="", as cAdvisor's pod cgroups do. Values are UInt64
(CRI's type): times in whole seconds, sizes in bytes; an unlimited limit
reads 0, as cAdvisor reports it. A series whose source this host lacks is
left out, never invented. Metric.timestamp is 0: every value is read live.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pycri import _native
from pycri.cgroup import Cgroup, hugepage_sizes
from pycri.cri import convert
from pycri.cri._gen import api_pb2
from pycri.errors import NotFoundError, PycriError

if TYPE_CHECKING:
    from pycri.container import Container
    from pycri.runtime import Runtime
    from pycri.sandbox import Sandbox, SandboxStatus

COUNTER = api_pb2.COUNTER
GAUGE = api_pb2.GAUGE
NS = 1_000_000_000
CPU_WINDOW = 1.0  # seconds: the shortest window a usage_nano_cores rate is taken over
CPU_SAMPLE_TTL = 600.0  # seconds a CPU sample of a pod or container is kept unused
_UNLIMITED = 1 << 62  # v1 says "no limit" with a page-rounded LLONG_MAX
_PROCS_CAP = 1 << 22
_CLK_TCK = os.sysconf("SC_CLK_TCK")

BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    labels: tuple[str, ...] = ()  # after BASE_LABELS
    type: api_pb2.MetricType = GAUGE

    @property
    def label_keys(self) -> tuple[str, ...]:
        return BASE_LABELS + self.labels


_NET = ("interface",)
_DEV = ("device",)

DESCRIPTORS: tuple[Descriptor, ...] = (
    # cpu
    Descriptor("container_cpu_usage_seconds_total", "Cumulative CPU time consumed, in seconds.",
               ("cpu",), COUNTER),
    Descriptor("container_cpu_user_seconds_total", "Cumulative user CPU time consumed, in seconds.",
               (), COUNTER),
    Descriptor("container_cpu_system_seconds_total",
               "Cumulative system CPU time consumed, in seconds.", (), COUNTER),
    Descriptor("container_cpu_cfs_periods_total", "Number of elapsed CFS enforcement periods.",
               (), COUNTER),
    Descriptor("container_cpu_cfs_throttled_periods_total",
               "Number of CFS periods in which the container was throttled.", (), COUNTER),
    Descriptor("container_cpu_cfs_throttled_seconds_total",
               "Total time the container has been throttled, in seconds.", (), COUNTER),
    # memory
    Descriptor("container_memory_usage_bytes",
               "Current memory usage in bytes, whatever its last access."),
    Descriptor("container_memory_max_usage_bytes", "Highest memory usage recorded, in bytes."),
    Descriptor("container_memory_working_set_bytes",
               "Current working set in bytes: usage less inactive file pages."),
    Descriptor("container_memory_rss", "Anonymous and swap cache memory, in bytes."),
    Descriptor("container_memory_cache", "Page cache memory, in bytes."),
    Descriptor("container_memory_mapped_file", "Memory-mapped file pages, in bytes."),
    Descriptor("container_memory_swap", "Swap in use, in bytes."),
    Descriptor("container_memory_kernel_usage", "Kernel memory charged to the cgroup, in bytes."),
    Descriptor("container_memory_failcnt", "Number of times memory usage hit its limit.",
               (), COUNTER),
    Descriptor("container_memory_failures_total", "Cumulative count of page faults.",
               ("failure_type", "scope"), COUNTER),
    Descriptor("container_oom_events_total", "Number of processes killed by the OOM killer.",
               (), COUNTER),
    # huge pages
    Descriptor("container_hugetlb_usage_bytes", "Huge page memory in use, in bytes.",
               ("pagesize",)),
    Descriptor("container_hugetlb_max_usage_bytes", "Highest huge page usage recorded, in bytes.",
               ("pagesize",)),
    # processes
    Descriptor("container_processes", "Number of processes in the container."),
    Descriptor("container_threads", "Number of threads in the container."),
    Descriptor("container_threads_max",
               "Most threads the container may have (pids limit); 0 means no limit."),
    Descriptor("container_file_descriptors", "Number of open file descriptors."),
    Descriptor("container_sockets", "Number of open sockets."),
    Descriptor("container_ulimits_soft", "Soft resource limits of the container's first process.",
               ("ulimit",)),
    # limits as set
    Descriptor("container_spec_cpu_period", "CFS period of the container, in microseconds."),
    Descriptor("container_spec_cpu_quota", "CFS quota of the container, in microseconds."),
    Descriptor("container_spec_cpu_shares", "CPU shares of the container."),
    Descriptor("container_spec_memory_limit_bytes", "Memory limit in bytes; 0 means no limit."),
    Descriptor("container_spec_memory_reservation_limit_bytes",
               "Memory reservation (soft limit) in bytes; 0 means none."),
    Descriptor("container_spec_memory_swap_limit_bytes",
               "Memory plus swap limit in bytes; 0 means no limit."),
    # filesystem: the writable layer's, and block I/O
    Descriptor("container_fs_usage_bytes", "Bytes used by the container's writable layer.", _DEV),
    Descriptor("container_fs_limit_bytes", "Size of the filesystem holding the writable layer.",
               _DEV),
    Descriptor("container_fs_inodes_total", "Inodes of the filesystem holding the writable layer.",
               _DEV),
    Descriptor("container_fs_inodes_free",
               "Free inodes of the filesystem holding the writable layer.", _DEV),
    Descriptor("container_fs_reads_bytes_total", "Cumulative bytes read from block devices.",
               _DEV, COUNTER),
    Descriptor("container_fs_reads_total", "Cumulative reads completed from block devices.",
               _DEV, COUNTER),
    Descriptor("container_fs_writes_bytes_total", "Cumulative bytes written to block devices.",
               _DEV, COUNTER),
    Descriptor("container_fs_writes_total", "Cumulative writes completed to block devices.",
               _DEV, COUNTER),
    Descriptor("container_blkio_device_usage_total", "Block device I/O, in bytes.",
               ("device", "major", "minor", "operation"), COUNTER),
    # network (the pod's)
    Descriptor("container_network_receive_bytes_total", "Cumulative bytes received.",
               _NET, COUNTER),
    Descriptor("container_network_receive_packets_total", "Cumulative packets received.",
               _NET, COUNTER),
    Descriptor("container_network_receive_packets_dropped_total",
               "Cumulative packets dropped while receiving.", _NET, COUNTER),
    Descriptor("container_network_receive_errors_total", "Cumulative errors while receiving.",
               _NET, COUNTER),
    Descriptor("container_network_transmit_bytes_total", "Cumulative bytes transmitted.",
               _NET, COUNTER),
    Descriptor("container_network_transmit_packets_total", "Cumulative packets transmitted.",
               _NET, COUNTER),
    Descriptor("container_network_transmit_packets_dropped_total",
               "Cumulative packets dropped while transmitting.", _NET, COUNTER),
    Descriptor("container_network_transmit_errors_total", "Cumulative errors while transmitting.",
               _NET, COUNTER),
    # pressure stall information
    Descriptor("container_pressure_cpu_waiting_seconds_total",
               "Time some tasks waited for CPU, in seconds.", (), COUNTER),
    Descriptor("container_pressure_cpu_stalled_seconds_total",
               "Time all tasks were stalled on CPU, in seconds.", (), COUNTER),
    Descriptor("container_pressure_memory_waiting_seconds_total",
               "Time some tasks waited for memory, in seconds.", (), COUNTER),
    Descriptor("container_pressure_memory_stalled_seconds_total",
               "Time all tasks were stalled on memory, in seconds.", (), COUNTER),
    Descriptor("container_pressure_io_waiting_seconds_total",
               "Time some tasks waited for I/O, in seconds.", (), COUNTER),
    Descriptor("container_pressure_io_stalled_seconds_total",
               "Time all tasks were stalled on I/O, in seconds.", (), COUNTER),
    # when
    Descriptor("container_start_time_seconds", "Start time, in seconds since the Unix epoch."),
    Descriptor("container_last_seen", "When the runtime last read the container, in seconds "
               "since the Unix epoch."),
)
_BY_NAME = {d.name: d for d in DESCRIPTORS}


def descriptors() -> list[api_pb2.MetricDescriptor]:
    """ListMetricDescriptors' answer: every series name pycri may serve."""
    return [api_pb2.MetricDescriptor(name=d.name, help=d.help, label_keys=list(d.label_keys))
            for d in DESCRIPTORS]


# -- reading a cgroup -------------------------------------------------------------------


@dataclass(frozen=True)
class Psi:
    """One pressure file: "some" and "full" totals (microseconds) and averages (%)."""

    some_us: int
    full_us: int
    some_avg: tuple[float, float, float]
    full_avg: tuple[float, float, float]


@dataclass(frozen=True)
class IoDevice:
    major: int
    minor: int
    read_bytes: int
    write_bytes: int
    reads: int
    writes: int


@dataclass
class CgroupSample:
    """What one cgroup's files said at ``wall_ns``. None: this host has no such file.
    Limits are 0 when unlimited."""

    wall_ns: int
    mono_ns: int
    cpu_ns: int = 0
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    cfs_periods: int | None = None
    cfs_throttled_periods: int | None = None
    cfs_throttled_ns: int | None = None
    cpu_period_us: int | None = None
    cpu_quota_us: int | None = None
    cpu_shares: int | None = None
    memory_usage: int | None = None
    memory_max_usage: int | None = None
    memory_working_set: int | None = None
    memory_rss: int | None = None
    memory_cache: int | None = None
    memory_mapped_file: int | None = None
    memory_swap: int | None = None
    memory_kernel: int | None = None
    memory_failcnt: int | None = None
    pgfault: int | None = None           # the cgroup and its descendants
    pgmajfault: int | None = None
    pgfault_own: int | None = None       # the cgroup's own processes only
    pgmajfault_own: int | None = None
    memory_limit: int | None = None
    memory_swap_limit: int | None = None  # memory + swap, as CRI counts it
    memory_reservation: int | None = None
    oom_kills: int | None = None
    threads_max: int | None = None
    pids: list[int] = field(default_factory=list)
    threads: int = 0
    io: list[IoDevice] = field(default_factory=list)
    hugetlb: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    psi: dict[str, Psi] = field(default_factory=dict)

    @property
    def memory_available(self) -> int | None:
        if not self.memory_limit or self.memory_working_set is None:
            return None
        return max(0, self.memory_limit - self.memory_working_set)

    @property
    def swap_available(self) -> int | None:
        if not self.memory_swap_limit or not self.memory_limit or self.memory_swap is None:
            return None
        return max(0, self.memory_swap_limit - self.memory_limit - self.memory_swap)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    t = text.strip()
    return int(t) if t.lstrip("-").isdigit() else None


def _kv(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _v1_limit(text: str | None) -> int | None:
    v = _int(text)
    if v is None:
        return None
    return 0 if v < 0 or v >= _UNLIMITED else v


def _v2_limit(text: str | None) -> int | None:
    if text is None:
        return None
    return 0 if text.strip() == "max" else _int(text)


def _psi(text: str | None) -> Psi | None:
    """Parse a *.pressure file ("some avg10=.. avg60=.. avg300=.. total=..", then "full")."""
    if not text:
        return None
    lines: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        lines[kind] = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)

    def part(kind: str) -> tuple[int, tuple[float, float, float]]:
        d = lines.get(kind, {})
        try:
            return int(d.get("total", 0)), (float(d.get("avg10", 0)), float(d.get("avg60", 0)),
                                             float(d.get("avg300", 0)))
        except ValueError:
            return 0, (0.0, 0.0, 0.0)

    if "some" not in lines:
        return None
    some, some_avg = part("some")
    full, full_avg = part("full")
    return Psi(some, full, some_avg, full_avg)


class _CgroupFiles:
    """Reads files of one cgroup; each directory is opened once. A missing file or
    controller reads as None."""

    def __init__(self, cg: Cgroup) -> None:
        self.cg = cg
        self.fds: dict[str, int] = {}

    def dir(self, controller: str) -> str | None:
        cg = self.cg
        if cg.v2 or controller == "psi":
            return cg.dirs.get("unified")
        d = cg.dirs.get(controller)
        if d is None and controller in cg.hierarchy.v2_only:
            d = cg.dirs.get("unified")
        return d

    def read(self, controller: str, name: str, cap: int = 1 << 16) -> str | None:
        d = self.dir(controller)
        if d is None:
            return None
        try:
            fd = self.fds.get(d)
            if fd is None:
                fd = self.fds[d] = _native.cgroup_open(d)
            return _native.cgroup_read(fd, name, cap)
        except OSError:
            return None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _procs_below(top: str | None) -> tuple[list[int], int]:
    """(pids, thread count) of a cgroup directory and its sub-cgroups."""
    pids: list[int] = []
    threads = 0
    if top is None:
        return pids, threads
    for dirpath, _dirs, files in os.walk(top):
        for name, is_procs in (("cgroup.procs", True), ("tasks", False), ("cgroup.threads", False)):
            if name not in files:
                continue
            try:
                with open(os.path.join(dirpath, name)) as f:
                    ids = f.read(_PROCS_CAP).split()
            except OSError:
                continue
            if is_procs:
                pids.extend(int(x) for x in ids)
            else:
                threads += len(ids)
    return pids, threads


def _io_v1(files: _CgroupFiles) -> list[IoDevice]:
    def table(name: str) -> dict[tuple[int, int], dict[str, int]]:
        out: dict[tuple[int, int], dict[str, int]] = {}
        for line in (files.read("blkio", name) or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or ":" not in parts[0] or not parts[2].isdigit():
                continue
            major, _, minor = parts[0].partition(":")
            if major.isdigit() and minor.isdigit():
                out.setdefault((int(major), int(minor)), {})[parts[1]] = int(parts[2])
        return out

    nbytes = table("blkio.throttle.io_service_bytes_recursive")
    nops = table("blkio.throttle.io_serviced_recursive")
    return [IoDevice(mj, mn, b.get("Read", 0), b.get("Write", 0),
                     nops.get((mj, mn), {}).get("Read", 0), nops.get((mj, mn), {}).get("Write", 0))
            for (mj, mn), b in sorted(nbytes.items())]


def _io_v2(files: _CgroupFiles) -> list[IoDevice]:
    out = []
    for line in (files.read("io", "io.stat") or "").splitlines():
        dev, *kvs = line.split()
        major, _, minor = dev.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        d = {k: int(v) for k, _, v in (kv.partition("=") for kv in kvs) if v.isdigit()}
        out.append(IoDevice(int(major), int(minor), d.get("rbytes", 0), d.get("wbytes", 0),
                            d.get("rios", 0), d.get("wios", 0)))
    return out


def read_cgroup(cg: Cgroup, recursive: bool = False) -> CgroupSample | None:
    """Sample one cgroup (None if it does not exist). ``recursive``: count the
    processes of its sub-cgroups too (a pod's cgroup holds its containers')."""
    if not cg.exists():
        return None
    f = _CgroupFiles(cg)
    try:
        s = CgroupSample(wall_ns=time.time_ns(), mono_ns=time.monotonic_ns())
        if cg.v2:
            _read_v2(f, s)
        else:
            _read_v1(f, s)
        for kind in ("cpu", "memory", "io"):
            p = _psi(f.read("psi", f"{kind}.pressure"))
            if p is not None:
                s.psi[kind] = p
        ctl = next((c for c in ("pids", "cpu", "memory") if f.dir(c)), "pids")
        if recursive:
            s.pids, s.threads = _procs_below(f.dir(ctl))
        else:
            s.pids = [int(x) for x in (f.read(ctl, "cgroup.procs", _PROCS_CAP) or "").split()]
            s.threads = len((f.read(ctl, "cgroup.threads" if cg.v2 else "tasks", _PROCS_CAP)
                             or "").split())
        return s
    finally:
        f.close()


def _read_v1(f: _CgroupFiles, s: CgroupSample) -> None:
    s.cpu_ns = _int(f.read("cpuacct", "cpuacct.usage")) or 0
    s.cpu_user_ns = _int(f.read("cpuacct", "cpuacct.usage_user"))
    s.cpu_system_ns = _int(f.read("cpuacct", "cpuacct.usage_sys"))
    if s.cpu_user_ns is None or s.cpu_system_ns is None:
        ticks = _kv(f.read("cpuacct", "cpuacct.stat"))
        if "user" in ticks and "system" in ticks:
            s.cpu_user_ns = ticks["user"] * NS // _CLK_TCK
            s.cpu_system_ns = ticks["system"] * NS // _CLK_TCK
    cpu = _kv(f.read("cpu", "cpu.stat"))
    s.cfs_periods = cpu.get("nr_periods")
    s.cfs_throttled_periods = cpu.get("nr_throttled")
    s.cfs_throttled_ns = cpu.get("throttled_time")
    s.cpu_period_us = _int(f.read("cpu", "cpu.cfs_period_us"))
    quota = _int(f.read("cpu", "cpu.cfs_quota_us"))
    s.cpu_quota_us = None if quota is None else max(0, quota)
    s.cpu_shares = _int(f.read("cpu", "cpu.shares"))

    s.memory_usage = _int(f.read("memory", "memory.usage_in_bytes"))
    s.memory_max_usage = _int(f.read("memory", "memory.max_usage_in_bytes"))
    s.memory_failcnt = _int(f.read("memory", "memory.failcnt"))
    s.memory_kernel = _int(f.read("memory", "memory.kmem.usage_in_bytes"))
    s.memory_limit = _v1_limit(f.read("memory", "memory.limit_in_bytes"))
    s.memory_swap_limit = _v1_limit(f.read("memory", "memory.memsw.limit_in_bytes"))
    s.memory_reservation = _v1_limit(f.read("memory", "memory.soft_limit_in_bytes"))
    st = _kv(f.read("memory", "memory.stat"))
    if st:
        s.memory_rss = st.get("total_rss")
        s.memory_cache = st.get("total_cache")
        s.memory_mapped_file = st.get("total_mapped_file")
        s.memory_swap = st.get("total_swap")
        s.pgfault, s.pgmajfault = st.get("total_pgfault"), st.get("total_pgmajfault")
        s.pgfault_own, s.pgmajfault_own = st.get("pgfault"), st.get("pgmajfault")
        if s.memory_usage is not None:
            s.memory_working_set = max(0, s.memory_usage - st.get("total_inactive_file", 0))
    s.oom_kills = _kv(f.read("memory", "memory.oom_control")).get("oom_kill")
    s.threads_max = _v2_limit(f.read("pids", "pids.max"))
    s.io = _io_v1(f)
    hugetlb_v2 = f.dir("hugetlb") is not None and f.dir("hugetlb") == f.cg.dirs.get("unified")
    for size in hugepage_sizes():
        if hugetlb_v2:
            cur = _int(f.read("hugetlb", f"hugetlb.{size}.current"))
            if cur is not None:
                s.hugetlb[size] = (cur, None)
        else:
            cur = _int(f.read("hugetlb", f"hugetlb.{size}.usage_in_bytes"))
            if cur is not None:
                s.hugetlb[size] = (cur, _int(f.read("hugetlb", f"hugetlb.{size}.max_usage_in_bytes")))


def _read_v2(f: _CgroupFiles, s: CgroupSample) -> None:
    cpu = _kv(f.read("cpu", "cpu.stat"))
    s.cpu_ns = cpu.get("usage_usec", 0) * 1000
    if "user_usec" in cpu:
        s.cpu_user_ns = cpu["user_usec"] * 1000
    if "system_usec" in cpu:
        s.cpu_system_ns = cpu["system_usec"] * 1000
    s.cfs_periods = cpu.get("nr_periods")
    s.cfs_throttled_periods = cpu.get("nr_throttled")
    if "throttled_usec" in cpu:
        s.cfs_throttled_ns = cpu["throttled_usec"] * 1000
    cpu_max = (f.read("cpu", "cpu.max") or "").split()
    if len(cpu_max) == 2:
        s.cpu_quota_us = 0 if cpu_max[0] == "max" else _int(cpu_max[0])
        s.cpu_period_us = _int(cpu_max[1])
    weight = _int(f.read("cpu", "cpu.weight"))
    if weight is not None:
        # back to shares: the smallest that cgroup.shares_to_weight maps to this weight
        # (the map is many-to-one, so 1024 shares come back as 999)
        s.cpu_shares = 2 + -(-(weight - 1) * 262142 // 9999)

    s.memory_usage = _int(f.read("memory", "memory.current"))
    s.memory_max_usage = _int(f.read("memory", "memory.peak"))
    events = _kv(f.read("memory", "memory.events"))
    s.memory_failcnt = events.get("max")
    s.oom_kills = events.get("oom_kill")
    s.memory_limit = _v2_limit(f.read("memory", "memory.max"))
    swap_max = _v2_limit(f.read("memory", "memory.swap.max"))
    if swap_max is not None and s.memory_limit is not None:
        s.memory_swap_limit = 0 if not swap_max or not s.memory_limit \
            else s.memory_limit + swap_max
    s.memory_reservation = _v2_limit(f.read("memory", "memory.low"))
    s.memory_swap = _int(f.read("memory", "memory.swap.current"))
    st = _kv(f.read("memory", "memory.stat"))
    if st:
        s.memory_rss = st.get("anon")
        s.memory_cache = st.get("file")
        s.memory_mapped_file = st.get("file_mapped")
        s.memory_kernel = st.get("kernel", sum(st.get(k, 0) for k in (
            "kernel_stack", "pagetables", "percpu", "sock", "vmalloc", "slab")))
        s.pgfault = s.pgfault_own = st.get("pgfault")
        s.pgmajfault = s.pgmajfault_own = st.get("pgmajfault")
        if s.memory_usage is not None:
            s.memory_working_set = max(0, s.memory_usage - st.get("inactive_file", 0))
    s.threads_max = _v2_limit(f.read("pids", "pids.max"))
    s.io = _io_v2(f)
    for size in hugepage_sizes():
        cur = _int(f.read("hugetlb", f"hugetlb.{size}.current"))
        if cur is not None:
            s.hugetlb[size] = (cur, None)


# -- processes, network, filesystems ----------------------------------------------------


def fd_counts(pids: Iterable[int]) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of these processes."""
    fds = sockets = 0
    for pid in pids:
        d = f"/proc/{pid}/fd"
        try:
            names = os.listdir(d)
        except OSError:
            continue  # exited meanwhile
        fds += len(names)
        for n in names:
            with contextlib.suppress(OSError):
                if os.readlink(f"{d}/{n}").startswith("socket:"):
                    sockets += 1
    return fds, sockets


def soft_nofile(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process (None if gone or unlimited)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line[len("Max open files"):].split()[0]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class NetDev:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


def parse_net_dev(text: str) -> list[NetDev]:
    """/proc/net/dev, loopback left out (cAdvisor leaves it out too)."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        v = rest.split()
        if not sep or len(v) < 16 or not all(x.isdigit() for x in v[:16]):
            continue
        name = name.strip()
        if name == "lo":
            continue
        n = [int(x) for x in v[:16]]
        out.append(NetDev(name, n[0], n[1], n[2], n[3], n[8], n[9], n[10], n[11]))
    return out


def pod_net_dev(netns_path: str, pids: Iterable[int]) -> list[NetDev] | None:
    """Interfaces of the pod's network namespace, read through one of its processes
    whose namespace is the pinned one. None when no such process is alive."""
    if not netns_path:
        return None
    try:
        want = _native.ns_inode(netns_path)
    except OSError:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != want:
                continue
            with open(f"/proc/{pid}/net/dev") as f:
                text = f.read(1 << 20)
            # still the same process's namespace after the read (pid not reused)
            if os.stat(f"/proc/{pid}/ns/net").st_ino != want:
                continue
        except OSError:
            continue
        return parse_net_dev(text)
    return None


@functools.lru_cache(maxsize=64)
def device_name(major: int, minor: int) -> str:
    """/dev/NAME of a block device, else the source of a mount on it, else "MAJ:MIN"."""
    try:
        with open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.strip().partition("=")[2]
    except OSError:
        pass
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, rest = pre.split(), post.split()
                if len(fields) > 2 and fields[2] == f"{major}:{minor}" and len(rest) > 1:
                    return rest[1]
    except OSError:
        pass
    return f"{major}:{minor}"


@dataclass(frozen=True)
class FsFigures:
    device: str
    capacity_bytes: int
    inodes_total: int
    inodes_free: int


def fs_figures(path: str) -> FsFigures | None:
    """The filesystem holding ``path``: its device, size and inodes."""
    try:
        st = os.stat(path)
        vfs = os.statvfs(path)
    except OSError:
        return None
    return FsFigures(device_name(os.major(st.st_dev), os.minor(st.st_dev)),
                     vfs.f_blocks * vfs.f_frsize, vfs.f_files, vfs.f_ffree)


# -- usage_nano_cores --------------------------------------------------------------------


class CpuRates:
    """usage_nano_cores from CPU samples at least ``window`` seconds apart.

    The first sample of a key only sets the baseline (no rate yet). A later sample
    ``window`` or more after the baseline gives the rate over that span and becomes
    the new baseline; one sooner answers the last rate computed, so rates always
    span a full window however often clients ask."""

    def __init__(self, window: float = CPU_WINDOW, ttl: float = CPU_SAMPLE_TTL) -> None:
        self.window_ns = int(window * NS)
        self.ttl_ns = int(ttl * NS)
        self._lock = threading.Lock()
        self._samples: dict[str, tuple[int, int, int | None]] = {}  # mono, usage, rate
        self._next_prune = 0

    def rate(self, key: str, mono_ns: int, usage_ns: int) -> int | None:
        with self._lock:
            if mono_ns >= self._next_prune:
                self._samples = {k: v for k, v in self._samples.items()
                                 if mono_ns - v[0] < self.ttl_ns}
                self._next_prune = mono_ns + self.ttl_ns // 2
            old = self._samples.get(key)
            if old is None or usage_ns < old[1]:  # new, or a counter that went back
                self._samples[key] = (mono_ns, usage_ns, None)
                return None
            base, base_usage, last = old
            if mono_ns - base < self.window_ns:
                return last
            rate = (usage_ns - base_usage) * NS // (mono_ns - base)
            self._samples[key] = (mono_ns, usage_ns, rate)
            return rate

    def __len__(self) -> int:
        return len(self._samples)


# -- the collector the servicer calls ----------------------------------------------------


@dataclass
class _Pod:
    """One read of a pod: its status, its cgroup and what each container needs."""

    sandbox: Sandbox
    status: SandboxStatus
    cgroup: Cgroup
    sample: CgroupSample | None
    net: list[NetDev] | None


def _seconds(ns: int) -> int:
    return max(0, ns) // NS


class Collector:
    """Builds ContainerStats, PodSandboxStats and PodSandboxMetrics for a Runtime."""

    def __init__(self, runtime: Runtime, cpu_window: float = CPU_WINDOW) -> None:
        self.rt = runtime
        self.cpu = CpuRates(cpu_window)

    # -- shared reads ------------------------------------------------------------------

    def _container_cgroup(self, c: Container) -> Cgroup:
        rec = c.record()
        return self.rt.cgroups(rec["cgroup_parent"]).container(rec["sandbox_id"], c.id)

    def _pod(self, sb: Sandbox) -> _Pod:
        st = sb.status()
        rec = sb.record()
        cg = self.rt.cgroups(rec.get("cgroup_parent") or None).pod(sb.id)
        sample = read_cgroup(cg, recursive=True)
        net = pod_net_dev(st.netns_path, sample.pids) if sample is not None else None
        return _Pod(sb, st, cg, sample, net)

    # -- stats -------------------------------------------------------------------------

    def container_stats(self, c: Container) -> api_pb2.ContainerStats:
        st = c.status()
        sample = read_cgroup(self._container_cgroup(c))
        layer = c.stats()  # the writable layer's bytes and inodes (a walk of it)
        if sample is None:  # no cgroup any more (removed meanwhile): zeros, as of now
            sample = CgroupSample(wall_ns=layer.timestamp_ns, mono_ns=time.monotonic_ns())
        rate = self.cpu.rate("c/" + c.id, sample.mono_ns, sample.cpu_ns)
        return convert.container_stats(st, sample, layer.writable_layer_bytes,
                                       layer.writable_layer_inodes, self.rt.root, rate)

    def sandbox_stats(self, sb: Sandbox) -> api_pb2.PodSandboxStats:
        pod = self._pod(sb)
        containers = []
        for c in sb.containers():
            with contextlib.suppress(NotFoundError, PycriError, OSError):
                containers.append(self.container_stats(c))
        rate = None
        if pod.sample is not None:
            rate = self.cpu.rate("p/" + sb.id, pod.sample.mono_ns, pod.sample.cpu_ns)
        return convert.sandbox_stats(pod.status, pod.sample, pod.net, time.time_ns(),
                                     containers, rate)

    # -- metrics -----------------------------------------------------------------------

    def all_pod_metrics(self) -> list[api_pb2.PodSandboxMetrics]:
        out = []
        for sb in self.rt.sandboxes():
            with contextlib.suppress(NotFoundError, PycriError, OSError):
                out.append(self.pod_metrics(sb))
        return out

    def pod_metrics(self, sb: Sandbox) -> api_pb2.PodSandboxMetrics:
        pod = self._pod(sb)
        cfg = pod.status.config
        now = time.time_ns()
        labels = ("", "/" + pod.cgroup.relpath, "", sb.id, cfg.namespace, cfg.name)
        series = _Series(labels)
        if pod.sample is not None:
            _cgroup_series(series, pod.sample)
            _process_series(series, pod.sample.pids, pod.sample)
        for n in pod.net or ():
            _network_series(series, n)
        series.add("container_start_time_seconds", _seconds(pod.status.created_at_ns))
        series.add("container_last_seen", _seconds(now))
        out = api_pb2.PodSandboxMetrics(pod_sandbox_id=sb.id, metrics=series.metrics)
        for c in sb.containers():
            with contextlib.suppress(NotFoundError, PycriError, OSError):
                m = self._container_metrics(c, pod.status, now)
                if m is not None:
                    out.container_metrics.append(m)
        return out

    def _container_metrics(self, c: Container, pod: SandboxStatus,
                           now: int) -> api_pb2.ContainerMetrics | None:
        st = c.status()
        cg = self._container_cgroup(c)
        sample = read_cgroup(cg)
        if sample is None:
            return None  # exited and cleaned up: nothing left to measure
        labels = (st.config.name, "/" + cg.relpath, st.image, c.id, pod.config.namespace,
                  pod.config.name)
        series = _Series(labels)
        _cgroup_series(series, sample)
        _process_series(series, sample.pids, sample)
        if st.pid and st.pid in sample.pids:
            nofile = soft_nofile(st.pid)
            if nofile is not None:
                series.add("container_ulimits_soft", nofile, "max_open_files")
        _fs_series(series, c)
        started = st.started_at_ns or st.created_at_ns
        series.add("container_start_time_seconds", _seconds(started))
        series.add("container_last_seen", _seconds(now))
        return api_pb2.ContainerMetrics(container_id=c.id, metrics=series.metrics)


class _Series:
    """Metric messages with one set of base label values."""

    def __init__(self, base: tuple[str, ...]) -> None:
        self.base = list(base)
        self.metrics: list[api_pb2.Metric] = []

    def add(self, name: str, value: int | None, *labels: str) -> None:
        if value is None:
            return
        d = _BY_NAME[name]
        assert len(labels) == len(d.labels), name
        self.metrics.append(api_pb2.Metric(
            name=name, timestamp=0, metric_type=d.type, label_values=self.base + list(labels),
            value=api_pb2.UInt64Value(value=max(0, int(value)))))


def _cgroup_series(out: _Series, s: CgroupSample) -> None:
    out.add("container_cpu_usage_seconds_total", _seconds(s.cpu_ns), "total")
    if s.cpu_user_ns is not None:
        out.add("container_cpu_user_seconds_total", _seconds(s.cpu_user_ns))
    if s.cpu_system_ns is not None:
        out.add("container_cpu_system_seconds_total", _seconds(s.cpu_system_ns))
    out.add("container_cpu_cfs_periods_total", s.cfs_periods)
    out.add("container_cpu_cfs_throttled_periods_total", s.cfs_throttled_periods)
    if s.cfs_throttled_ns is not None:
        out.add("container_cpu_cfs_throttled_seconds_total", _seconds(s.cfs_throttled_ns))
    out.add("container_spec_cpu_period", s.cpu_period_us)
    if s.cpu_quota_us:  # no quota: no series, as cAdvisor does
        out.add("container_spec_cpu_quota", s.cpu_quota_us)
    out.add("container_spec_cpu_shares", s.cpu_shares)

    out.add("container_memory_usage_bytes", s.memory_usage)
    out.add("container_memory_max_usage_bytes", s.memory_max_usage)
    out.add("container_memory_working_set_bytes", s.memory_working_set)
    out.add("container_memory_rss", s.memory_rss)
    out.add("container_memory_cache", s.memory_cache)
    out.add("container_memory_mapped_file", s.memory_mapped_file)
    out.add("container_memory_swap", s.memory_swap)
    out.add("container_memory_kernel_usage", s.memory_kernel)
    out.add("container_memory_failcnt", s.memory_failcnt)
    out.add("container_memory_failures_total", s.pgfault_own, "pgfault", "container")
    out.add("container_memory_failures_total", s.pgfault, "pgfault", "hierarchy")
    out.add("container_memory_failures_total", s.pgmajfault_own, "pgmajfault", "container")
    out.add("container_memory_failures_total", s.pgmajfault, "pgmajfault", "hierarchy")
    out.add("container_oom_events_total", s.oom_kills)
    out.add("container_spec_memory_limit_bytes", s.memory_limit)
    out.add("container_spec_memory_reservation_limit_bytes", s.memory_reservation)
    out.add("container_spec_memory_swap_limit_bytes", s.memory_swap_limit)

    for size, (usage, peak) in sorted(s.hugetlb.items()):
        out.add("container_hugetlb_usage_bytes", usage, size)
        out.add("container_hugetlb_max_usage_bytes", peak, size)
    for kind in ("cpu", "memory", "io"):
        p = s.psi.get(kind)
        if p is not None:
            out.add(f"container_pressure_{kind}_waiting_seconds_total", p.some_us // 1_000_000)
            out.add(f"container_pressure_{kind}_stalled_seconds_total", p.full_us // 1_000_000)
    for dev in s.io:
        name = device_name(dev.major, dev.minor)
        out.add("container_fs_reads_bytes_total", dev.read_bytes, name)
        out.add("container_fs_reads_total", dev.reads, name)
        out.add("container_fs_writes_bytes_total", dev.write_bytes, name)
        out.add("container_fs_writes_total", dev.writes, name)
        for op, v in (("Read", dev.read_bytes), ("Write", dev.write_bytes)):
            out.add("container_blkio_device_usage_total", v, name, str(dev.major),
                    str(dev.minor), op)


def _process_series(out: _Series, pids: list[int], s: CgroupSample) -> None:
    fds, sockets = fd_counts(pids)
    out.add("container_processes", len(pids))
    out.add("container_threads", s.threads)
    out.add("container_threads_max", s.threads_max)
    out.add("container_file_descriptors", fds)
    out.add("container_sockets", sockets)


def _network_series(out: _Series, n: NetDev) -> None:
    out.add("container_network_receive_bytes_total", n.rx_bytes, n.name)
    out.add("container_network_receive_packets_total", n.rx_packets, n.name)
    out.add("container_network_receive_packets_dropped_total", n.rx_dropped, n.name)
    out.add("container_network_receive_errors_total", n.rx_errors, n.name)
    out.add("container_network_transmit_bytes_total", n.tx_bytes, n.name)
    out.add("container_network_transmit_packets_total", n.tx_packets, n.name)
    out.add("container_network_transmit_packets_dropped_total", n.tx_dropped, n.name)
    out.add("container_network_transmit_errors_total", n.tx_errors, n.name)


def _fs_series(out: _Series, c: Container) -> None:
    upper = os.path.join(c.record_dir, "fs", "upper")
    fs = fs_figures(upper)
    if fs is None:
        return
    layer = c.stats()
    out.add("container_fs_usage_bytes", layer.writable_layer_bytes, fs.device)
    out.add("container_fs_limit_bytes", fs.capacity_bytes, fs.device)
    out.add("container_fs_inodes_total", fs.inodes_total, fs.device)
    out.add("container_fs_inodes_free", fs.inodes_free, fs.device)


__all__ = [
    "BASE_LABELS",
    "DESCRIPTORS",
    "CgroupSample",
    "Collector",
    "CpuRates",
    "Descriptor",
    "NetDev",
    "descriptors",
    "parse_net_dev",
    "read_cgroup",
]

