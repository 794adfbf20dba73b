"""The C boundary: the only module that imports the compiled ``pycri._core``.

One small, typed Python function or class per C entry point. A C failure
(rc < 0) becomes ``OSError(errno, message, path)``; Python picks the subclass
(FileNotFoundError, PermissionError ...) from errno. Domain meaning is added by
the callers with ``raise ... from``.

Sections below follow the csrc/api/ headers; keep each section to its concern.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, Self

from pycri import _core  # type: ignore[attr-defined]  # built by cffi

ffi = _core.ffi
lib = _core.lib


def _new_err():  # type: ignore[no-untyped-def]
    return ffi.new("struct pycri_error *")


def _raise(err, path: str | None = None) -> NoReturn:  # type: ignore[no-untyped-def]
    msg = ffi.string(err.msg).decode("utf-8", "replace") or "pycri core error"
    if path is None:
        raise OSError(err.code or 0, msg)
    raise OSError(err.code or 0, msg, path)


def _check(rc: int, err, path: str | None = None) -> int:  # type: ignore[no-untyped-def]
    if rc < 0:
        _raise(err, path)
    return rc


# --- digest (csrc/sha256.c) -------------------------------------------------


class Sha256:
    """Incremental SHA-256 in C (OpenSSL's SHA-NI code); the GIL is released per update."""

    __slots__ = ("_h", "_err", "_done")

    def __init__(self) -> None:
        self._h = ffi.new("struct pycri_sha256 *")
        self._err = _new_err()
        self._done: str | None = None
        _check(lib.pycri_sha256_init(self._h, self._err), self._err)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._done is not None:
            raise ValueError("Sha256.update after hexdigest")
        buf = ffi.from_buffer(data)
        _check(lib.pycri_sha256_update(self._h, buf, len(buf), self._err), self._err)

    def hexdigest(self) -> str:
        if self._done is None:
            out = ffi.new("char[65]")
            _check(lib.pycri_sha256_final(self._h, out, self._err), self._err)
            self._done = ffi.string(out).decode("ascii")
        return self._done


def sha256_fd(fd: int) -> tuple[str, int]:
    """Hash all of fd from its current offset; returns (hex digest, byte count)."""
    err = _new_err()
    out = ffi.new("char[65]")
    n = ffi.new("unsigned long long *")
    _check(lib.pycri_sha256_fd(fd, out, n, err), err)
    return ffi.string(out).decode("ascii"), int(n[0])


# --- layer apply (csrc/layer.c) ---------------------------------------------


class LayerStats(NamedTuple):
    """Counters from the C layer writer (see csrc/api/layer.h)."""

    bytes: int
    entries: int
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    devices: int
    whiteouts: int
    xattrs_dropped: int
    lower_copies: int


class LayerWriter:
    """Streams an uncompressed layer tar into ``dest`` (an existing directory).

    ``open`` happens in the constructor; then ``feed`` chunks, ``finish`` (returns
    the diff_id hex) and ``close`` (idempotent; also done by ``with``). A failed
    ``feed`` or ``finish`` raises ``OSError`` and the writer refuses further
    input. ``lowers`` are the directories of the layers below (top first), used
    only for hardlinks to files this layer does not contain. Zero limits mean
    the C defaults. ``feed`` releases the GIL while C parses and writes.

    With ``hash_separately=True``, ``feed`` does not hash: pass the same bytes to
    ``hash`` (it may run in another thread while ``feed`` works, so hashing and
    writing overlap); ``finish`` checks that both saw the same byte count.
    """

    __slots__ = ("_dest", "_err", "_l")

    def __init__(self, dest: str, *, lowers: Sequence[str] = (), max_entries: int = 0,
                 max_bytes: int = 0, max_meta_size: int = 0, max_path_len: int = 0,
                 hash_separately: bool = False) -> None:
        self._dest = dest
        self._err = _new_err()
        # closed by close(), or by the collector if a caller forgets
        self._l = ffi.gc(ffi.new("struct pycri_layer *"), lib.pycri_layer_close)
        lim = ffi.new("struct pycri_layer_limits *")
        lim.max_entries = max_entries
        lim.max_bytes = max_bytes
        lim.max_meta_size = max_meta_size
        lim.max_path_len = max_path_len
        fds: list[int] = []
        try:
            for d in lowers:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            arr = ffi.new("int[]", fds) if fds else ffi.NULL
            flags = lib.PYCRI_LAYER_HASH_SEPARATELY if hash_separately else 0
            rc = lib.pycri_layer_open(self._l, -100, os.fsencode(dest), lim, arr, len(fds),
                                      flags, self._err)
            if rc < 0:
                lib.pycri_layer_close(self._l)
                _raise(self._err, dest)
        finally:
            for fd in fds:
                os.close(fd)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        buf = ffi.from_buffer(data)
        _check(lib.pycri_layer_feed(self._l, buf, len(buf), self._err), self._err, self._dest)

    def hash(self, data: bytes | bytearray | memoryview) -> None:
        # its own error struct: it may run while feed (using self._err) is busy
        err = _new_err()
        buf = ffi.from_buffer(data)
        _check(lib.pycri_layer_hash(self._l, buf, len(buf), err), err, self._dest)

    def finish(self) -> str:
        out = ffi.new("char[65]")
        _check(lib.pycri_layer_finish(self._l, out, self._err), self._err, self._dest)
        return ffi.string(out).decode("ascii")

    @property
    def stats(self) -> LayerStats:
        s = self._l.stats
        return LayerStats(*(int(getattr(s, f)) for f in LayerStats._fields))

    def close(self) -> None:
        lib.pycri_layer_close(self._l)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- spawn (csrc/spawn.c) ---------------------------------------------------

#: Namespace kinds, in the order of SpawnSpec.namespaces keys and C's PYCRI_NS_*.
NS_KINDS = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup")
#: PYCRI_STAGE_* names by number.
SPAWN_STAGES = (
    "none", "prepare", "clone", "namespace", "idmap", "cgroup", "rootfs", "mount", "pivot",
    "hostname", "sysctl", "rlimit", "oom", "fds", "tty", "cwd", "user", "caps", "seccomp",
    "exec", "start",
)
PROPAGATION = {"private": 0, "rslave": 1, "rshared": 2}


@dataclass
class BindMount:
    """A bind mount: host ``source`` (must exist; symlinks resolved on the host) onto
    ``target`` inside the rootfs (resolved in-root, created if missing)."""

    source: str
    target: str
    readonly: bool = False
    recursive_readonly: bool = False
    recursive: bool = True
    propagation: str = "private"  # private | rslave | rshared
    # joining a user namespace: "none", "auto" (id-mapped where the source's
    # filesystem allows it) or "require"
    idmap: str = "none"


IDMAP = {"none": 0, "auto": 1, "require": 2}


@dataclass
class SpawnSpec:
    """Everything pycri_spawn needs, as plain values; mirrors ``struct pycri_spawn_spec``.

    namespaces maps a kind in NS_KINDS to "new", a path to join (/proc/PID/ns/x or a
    pinned file), or "pidfd" (the namespace of join_pidfd's process, checked against
    pid reuse); kinds not listed stay the caller's. oom_score_adj is written as
    given: clamp it (>= 0 without CAP_SYS_RESOURCE) before calling. Capability sets
    are bit masks (bit n = capability n); cap_inheritable is ORed with cap_ambient.
    """

    argv: list[str]
    env: list[str] = field(default_factory=list)  # "K=V"; its PATH drives the lookup
    exec_path: str | None = None
    cwd: str | None = None
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    cap_bounding: int = 0
    cap_effective: int = 0
    cap_permitted: int = 0
    cap_inheritable: int = 0
    cap_ambient: int = 0
    no_new_privs: bool = False
    seccomp_bpf: bytes | None = None  # struct sock_filter[], 8 bytes per instruction
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (RLIMIT_*, soft, hard); -1 = inf
    oom_score_adj: int | None = None
    hostname: str | None = None
    sysctls: dict[str, str] = field(default_factory=dict)
    parent_death_signal: int = 0
    stdin: int = -1  # -1 = /dev/null (or the tty)
    stdout: int = -1
    stderr: int = -1
    tty_fd: int = -1
    tty_new: bool = False  # a pty of the container's own devpts instead; master in the result
    keep_fds: list[int] = field(default_factory=list)  # become 3, 4, ... in the container
    namespaces: dict[str, str] = field(default_factory=dict)  # kind -> "new" | path | "pidfd"
    join_pidfd: int = -1  # for kinds set to "pidfd": the namespaces of this pidfd's process
    uid_map: tuple[int, int, int] | None = None  # (inside, outside, count) for a new userns
    gid_map: tuple[int, int, int] | None = None
    cgroup_procs: list[str] = field(default_factory=list)
    # (pre-clones: the last this many are joined only when resumed: see api/spawn.h)
    cgroup_late: int = 0
    rootfs: str | None = None
    overlay_lower: list[str] = field(default_factory=list)  # top first; empty = bind rootfs
    overlay_upper: str | None = None
    overlay_work: str | None = None
    rootfs_mount_fd: int = -1  # an overlay_premount fd to attach at rootfs (not mounted again)
    dev_mount_fd: int = -1     # a dev_premount fd to attach at /dev (not made again)
    rootfs_readonly: bool = False
    root_propagation: str = "private"
    mount_proc: bool = True
    mount_sys: bool = True
    sys_writable: bool = False  # /sys read-write (privileged)
    mount_dev: bool = True
    host_devices: bool = False  # the host's device nodes in /dev too (privileged)
    shm_path: str | None = None
    shm_size: int = 0
    etc_hostname: str | None = None
    etc_hosts: str | None = None
    etc_resolv: str | None = None
    binds: list[BindMount] = field(default_factory=list)
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    start_wait: bool = False


@dataclass
class SpawnResult:
    """pid (the caller's child: reap it), a CLOEXEC pidfd, /proc start time, and for
    start_wait the two fds that spawn_start consumes."""

    pid: int
    pidfd: int
    start_time: int
    start_fd: int = -1
    report_fd: int = -1
    tty_master: int = -1  # tty_new: the pty master (CLOEXEC), the caller's to close


def namespaces_of(pid: int) -> dict[str, str]:
    """Join paths for every namespace of pid, for an exec into a running container
    (SpawnSpec.namespaces). Kinds it shares with the caller are skipped in C."""
    return {k: f"/proc/{pid}/ns/{k}" for k in NS_KINDS}


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_procs_of(pid: int) -> list[str]:
    """The cgroup.procs files of every cgroup pid is in (v1 hierarchies and v2), as
    paths in the caller's mount namespace: SpawnSpec.cgroup_procs for an exec."""
    mounts: list[tuple[str, str, set[str]]] = []  # (root, mount point, super options)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                opts = set(rfields[2].split(",")) if rfields[0] == "cgroup" else {""}
                mounts.append((_unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4]),
                               opts))
    out: list[str] = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            want = set(controllers.split(",")) if controllers else {""}
            for root, mp, opts in mounts:
                if not want <= opts or not (path == root or path.startswith(root.rstrip("/") + "/")):
                    continue
                rel = path[len(root.rstrip("/")):].lstrip("/")
                procs = os.path.join(mp, rel, "cgroup.procs")
                if os.path.exists(procs):
                    out.append(procs)
                break
    return out


def _spawn_error(err, res_stage: int | None = None) -> OSError:  # type: ignore[no-untyped-def]
    msg = ffi.string(err.msg).decode("utf-8", "replace") or "spawn failed"
    e = OSError(err.code or 0, msg)
    if res_stage is None:
        stage = msg.split(":", 1)[0] if ":" in msg else ""
        res_stage = SPAWN_STAGES.index(stage) if stage in SPAWN_STAGES else 0
    e.stage = SPAWN_STAGES[res_stage] if 0 <= res_stage < len(SPAWN_STAGES) else "unknown"  # type: ignore[attr-defined]
    return e


class _Builder:
    """Keeps every cffi allocation alive while the C call runs."""

    def __init__(self) -> None:
        self.keep: list[object] = []

    def s(self, v: str | None):  # type: ignore[no-untyped-def]
        if v is None:
            return ffi.NULL
        b = ffi.new("char[]", os.fsencode(v))
        self.keep.append(b)
        return b

    def strv(self, items) -> object:  # type: ignore[no-untyped-def]
        arr = ffi.new("char *[]", [self.s(x) for x in items] + [ffi.NULL])
        self.keep.append(arr)
        return arr


def _spec_struct(spec: SpawnSpec) -> tuple[Any, _Builder]:
    """The C spawn spec for ``spec``; the builder keeps its memory alive."""
    b = _Builder()
    c = ffi.new("struct pycri_spawn_spec *")
    if not spec.argv:
        raise ValueError("argv is empty")
    c.argv = b.strv(spec.argv)
    c.envp = b.strv(spec.env)
    c.exec_path = b.s(spec.exec_path)
    c.cwd = b.s(spec.cwd)
    c.uid, c.gid = spec.uid, spec.gid
    groups = ffi.new("unsigned int[]", max(1, len(spec.groups)))
    for i, g in enumerate(spec.groups):
        groups[i] = g
    b.keep.append(groups)
    c.groups, c.n_groups = groups, len(spec.groups)
    c.cap_bounding, c.cap_effective = spec.cap_bounding, spec.cap_effective
    c.cap_permitted, c.cap_inheritable = spec.cap_permitted, spec.cap_inheritable
    c.cap_ambient = spec.cap_ambient
    c.no_new_privs = int(spec.no_new_privs)
    if spec.seccomp_bpf:
        if len(spec.seccomp_bpf) % 8:
            raise ValueError("seccomp_bpf is not a whole number of 8-byte instructions")
        prog = ffi.new("unsigned char[]", spec.seccomp_bpf)
        b.keep.append(prog)
        c.seccomp_bpf, c.seccomp_len = prog, len(spec.seccomp_bpf) // 8
    rl = ffi.new("struct pycri_rlimit[]", max(1, len(spec.rlimits)))
    b.keep.append(rl)
    inf = 0xFFFFFFFFFFFFFFFF
    for i, (res, soft, hard) in enumerate(spec.rlimits):
        rl[i].resource = res
        rl[i].soft = inf if soft < 0 else soft
        rl[i].hard = inf if hard < 0 else hard
    c.rlimits, c.n_rlimits = rl, len(spec.rlimits)
    if spec.oom_score_adj is not None:
        c.set_oom_score_adj, c.oom_score_adj = 1, spec.oom_score_adj
    c.hostname = b.s(spec.hostname)
    c.sysctls = b.strv(f"{k}={v}" for k, v in spec.sysctls.items())
    c.parent_death_signal = spec.parent_death_signal
    c.stdio = [spec.stdin, spec.stdout, spec.stderr]
    c.tty_fd = spec.tty_fd
    c.tty_new = int(spec.tty_new)
    c.join_pidfd = spec.join_pidfd
    keep = ffi.new("int[]", max(1, len(spec.keep_fds)))
    for i, fd in enumerate(spec.keep_fds):
        keep[i] = fd
    b.keep.append(keep)
    c.keep_fds, c.n_keep_fds = keep, len(spec.keep_fds)
    for kind, how in spec.namespaces.items():
        k = NS_KINDS.index(kind)
        if how == "new":
            c.ns_mode[k] = lib.PYCRI_NS_NEW
        elif how in ("host", "", None):
            c.ns_mode[k] = lib.PYCRI_NS_HOST
        elif how == "pidfd":
            c.ns_mode[k] = lib.PYCRI_NS_JOIN  # ns_path stays NULL: C uses join_pidfd
        else:
            c.ns_mode[k] = lib.PYCRI_NS_JOIN
            c.ns_path[k] = b.s(how)
    if spec.uid_map:
        c.uid_map_inside, c.uid_map_outside, c.uid_map_count = spec.uid_map
    if spec.gid_map:
        c.gid_map_inside, c.gid_map_outside, c.gid_map_count = spec.gid_map
    c.cgroup_procs = b.strv(spec.cgroup_procs)
    c.cgroup_late = spec.cgroup_late
    c.rootfs = b.s(spec.rootfs)
    if spec.overlay_lower:
        c.overlay_lower = b.s(":".join(spec.overlay_lower))
        c.overlay_upper = b.s(spec.overlay_upper)
        c.overlay_work = b.s(spec.overlay_work)
    if spec.rootfs_mount_fd >= 0:
        c.rootfs_premounted = 1
        c.rootfs_mount_fd = spec.rootfs_mount_fd
    if spec.dev_mount_fd >= 0:
        c.dev_premounted = 1
        c.dev_mount_fd = spec.dev_mount_fd
    c.rootfs_readonly = int(spec.rootfs_readonly)
    c.root_propagation = PROPAGATION[spec.root_propagation]
    c.mount_proc, c.mount_sys, c.mount_dev = spec.mount_proc, spec.mount_sys, spec.mount_dev
    c.sys_writable, c.host_devices = int(spec.sys_writable), int(spec.host_devices)
    c.shm_path, c.shm_size = b.s(spec.shm_path), spec.shm_size
    c.etc_hostname, c.etc_hosts = b.s(spec.etc_hostname), b.s(spec.etc_hosts)
    c.etc_resolv = b.s(spec.etc_resolv)
    binds = ffi.new("struct pycri_bind[]", max(1, len(spec.binds)))
    b.keep.append(binds)
    for i, m in enumerate(spec.binds):
        binds[i].source, binds[i].target = b.s(m.source), b.s(m.target)
        binds[i].readonly = int(m.readonly or m.recursive_readonly)
        binds[i].recursive_readonly = int(m.recursive_readonly)
        binds[i].nonrecursive = int(not m.recursive)
        binds[i].propagation = PROPAGATION[m.propagation]
        binds[i].idmap = IDMAP[m.idmap]
    c.binds, c.n_binds = binds, len(spec.binds)
    c.masked_paths = b.strv(spec.masked_paths)
    c.readonly_paths = b.strv(spec.readonly_paths)
    c.start_wait = int(spec.start_wait)
    return c, b


def spawn(spec: SpawnSpec) -> SpawnResult:
    """Create the process described by spec; raise OSError (with ``.stage``) on failure.

    The GIL is released while the child is set up. On failure no process and no
    mount is left behind.
    """
    c, _keep = _spec_struct(spec)
    res = ffi.new("struct pycri_spawn_result *")
    err = _new_err()
    if lib.pycri_spawn(c, res, err) < 0:
        raise _spawn_error(err, res.stage)
    return SpawnResult(pid=res.pid, pidfd=res.pidfd, start_time=res.start_time,
                       start_fd=res.start_fd, report_fd=res.report_fd,
                       tty_master=res.tty_master)


def spawn_start(result: SpawnResult) -> None:
    """Let a start_wait process run to execve; raise OSError (with ``.stage``) if
    execve failed. Consumes start_fd and report_fd; the caller still reaps pid."""
    if result.start_fd < 0:
        raise ValueError("process was not created with start_wait")
    fds = (result.start_fd, result.report_fd)
    result.start_fd = result.report_fd = -1
    start_direct(*fds)


# --- mounts (csrc/mount.c) --------------------------------------------------


def mount_overlay(target: str, lower: list[str], upper: str | None = None,
                  work: str | None = None) -> None:
    """Mount an overlay (lower top first) at target in the caller's mount namespace."""
    err = _new_err()
    _check(lib.pycri_mount_overlay(os.fsencode(target), os.fsencode(":".join(lower)),
                                   os.fsencode(upper) if upper else ffi.NULL,
                                   os.fsencode(work) if work else ffi.NULL, err), err, target)


def mount_overlay_idmapped(target: str, lower: list[str], userns_path: str) -> None:
    """A read-only overlay of ``lower`` (top first) at target, every layer id-mapped to
    the user namespace pinned at ``userns_path``."""
    err = _new_err()
    _check(lib.pycri_mount_overlay_idmapped(os.fsencode(target), os.fsencode(":".join(lower)),
                                            os.fsencode(userns_path), err), err, target)


def mount_unmount(target: str) -> None:
    """Lazily unmount target (MNT_DETACH, final symlink not followed)."""
    err = _new_err()
    _check(lib.pycri_mount_unmount(os.fsencode(target), err), err, target)


# --- cgroups (csrc/cgroup.c) ------------------------------------------------

CGROUP_UNKNOWN = 0
CGROUP_V1 = 1
CGROUP_V2 = 2


def cgroup_fstype(path: str) -> int:
    """CGROUP_V2 for a cgroup2 mount, CGROUP_V1 for a v1 one, else CGROUP_UNKNOWN."""
    err = _new_err()
    return _check(lib.pycri_cgroup_fstype(path.encode(), err), err, path)


def cgroup_open(path: str) -> int:
    """An O_DIRECTORY fd on a cgroup dir; the caller closes it."""
    err = _new_err()
    return _check(lib.pycri_cgroup_open(path.encode(), err), err, path)


def cgroup_write(dirfd: int, name: str, value: str) -> None:
    """Write value to name beneath dirfd in one write(2); names cannot escape dirfd."""
    err = _new_err()
    data = value.encode()
    _check(lib.pycri_cgroup_write(dirfd, name.encode(), data, len(data), err), err, name)


def cgroup_write_batch(dirfd: int, pairs: list[tuple[str, str]]) -> None:
    """Write (name, value) pairs in order; on failure the OSError carries
    ``.failed_index`` (how many writes succeeded before it)."""
    err = _new_err()
    keep = [(ffi.new("char[]", n.encode()), ffi.new("char[]", v.encode())) for n, v in pairs]
    names = ffi.new("const char *[]", [k[0] for k in keep] or [ffi.NULL])
    values = ffi.new("const char *[]", [k[1] for k in keep] or [ffi.NULL])
    failed = ffi.new("int *")
    rc = lib.pycri_cgroup_write_batch(dirfd, names, values, len(pairs), failed, err)
    if rc < 0:
        idx = int(failed[0])
        msg = ffi.string(err.msg).decode("utf-8", "replace")
        e = OSError(err.code or 0, msg, pairs[idx][0] if idx < len(pairs) else None)
        e.failed_index = idx  # type: ignore[attr-defined]
        raise e


# buffers the C side fills: not zeroed first (ffi.new would clear every byte of cap)
_new_unzeroed = ffi.new_allocator(should_clear_after_alloc=False)


def cgroup_read(dirfd: int, name: str, cap: int = 1 << 16) -> str:
    """The text of the file name beneath dirfd (EFBIG past cap bytes)."""
    err = _new_err()
    buf = _new_unzeroed("char[]", cap)
    n = _check(lib.pycri_cgroup_read(dirfd, name.encode(), buf, cap, err), err, name)
    return bytes(ffi.buffer(buf, n)).decode("utf-8", "replace")


def cgroup_kill(procs_dirfd: int, freezer_dirfd: int, v2: bool, timeout: float) -> int:
    """SIGKILL everything in the cgroup until cgroup.procs is empty; returns signals sent.
    Raises TimeoutError (ETIMEDOUT) when processes remain after timeout seconds."""
    err = _new_err()
    return _check(lib.pycri_cgroup_kill(procs_dirfd, freezer_dirfd, 1 if v2 else 0,
                                        int(timeout * 1000), err), err)


def cgroup_rmdir(path: str, timeout: float) -> None:
    """rmdir a cgroup dir, retrying EBUSY up to timeout seconds; missing is fine."""
    err = _new_err()
    _check(lib.pycri_cgroup_rmdir(path.encode(), int(timeout * 1000), err), err, path)


# --- monitor (csrc/main_monitor.c -> pycri/pycri-monitor) ---------------------
#
# The monitor is an executable, not a function of _core: it must outlive this
# process. Its command line, log format, exit file and attach protocol are
# documented at the top of csrc/main_monitor.c; the helpers below build the
# command, launch it detached, and read what it leaves behind.

ATTACH_STDIN = 0
ATTACH_STDOUT = 1
ATTACH_STDERR = 2
ATTACH_EXIT = 3
ATTACH_RESIZE = 4
ATTACH_CLOSE_STDIN = 5
ATTACH_MAX_FRAME = 65536


def monitor_path() -> str:
    """Absolute path of the built pycri-monitor (FileNotFoundError if not built)."""
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pycri-monitor")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(2, "pycri-monitor is not built (run setup.py build_ext)", path)
    return path


def monitor_command(exit_file: str, log: str, *, argv: Sequence[str] | None = None,
                    adopt: int | None = None, stdin: bool = False, tty: bool = False,
                    attach_socket: str | None = None, ready_fd: int | None = None,
                    pid_file: str | None = None, log_max_line: int | None = None,
                    detach: bool = False, stdout_fd: int | None = None,
                    stderr_fd: int | None = None, stdin_fd: int | None = None,
                    pty_master_fd: int | None = None, oom_file: str | None = None,
                    done_fd: int | None = None, for_launch: bool = False) -> list[str]:
    """The argv that runs a monitor; exactly one of ``argv`` / ``adopt``, or neither
    with ``for_launch`` (launch() appends ``--adopt PID`` once the container exists,
    and ``--pty-master-fd N`` when the spec has ``tty_new``)."""
    if for_launch:
        if argv is not None or adopt is not None:
            raise ValueError("for_launch takes neither argv nor adopt")
    elif (argv is None) == (adopt is None):
        raise ValueError("give exactly one of argv and adopt")
    cmd = [monitor_path(), "--exit-file", exit_file, "--log", log]
    if stdin:
        cmd.append("--stdin")
    if tty:
        cmd.append("--tty")
    if detach:
        cmd.append("--detach")
    for flag, val in (("--attach-socket", attach_socket), ("--ready-fd", ready_fd),
                      ("--pid-file", pid_file), ("--log-max-line", log_max_line),
                      ("--stdout-fd", stdout_fd), ("--stderr-fd", stderr_fd),
                      ("--stdin-fd", stdin_fd), ("--pty-master-fd", pty_master_fd),
                      ("--oom-file", oom_file), ("--done-fd", done_fd)):
        if val is not None:
            cmd += [flag, str(val)]
    if for_launch:
        pass
    elif adopt is not None:
        cmd += ["--adopt", str(adopt)]
    else:
        assert argv is not None
        if not argv:
            raise ValueError("argv is empty")
        cmd += ["--", *argv]
    return cmd


def launch_monitor(exit_file: str, log: str, argv: Sequence[str], *, timeout: float = 30.0,
                   **kw: Any) -> tuple[int, int]:
    """Start a detached monitor that runs argv; returns (monitor pid, container pid)
    once it is ready. The intermediate process is reaped here, so the monitor is
    nobody's child in this process and survives it. Setup failures raise OSError
    with the monitor's message."""
    import subprocess

    cmd = monitor_command(exit_file, log, argv=argv, detach=True, **kw)
    r = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                       close_fds=True)
    if r.returncode != 0:
        raise OSError(0, r.stderr.decode("utf-8", "replace").strip() or "pycri-monitor failed")
    mon, ctr = r.stdout.split()
    return int(mon), int(ctr)


@dataclass(frozen=True)
class ExitStatus:
    """What the monitor recorded when the container process ended."""

    pid: int
    exit_code: int
    signal: int
    exited_at_ns: int
    oom_killed: bool


def read_exit_file(path: str) -> ExitStatus | None:
    """The exit file written by the monitor, or None while the container runs.
    A malformed file raises ValueError (the monitor writes it atomically)."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    try:
        return ExitStatus(int(data["pid"]), int(data["exit_code"]), int(data["signal"]),
                          int(data["exited_at_ns"]), bool(data["oom_killed"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed exit file {path}: {e}") from e


def attach_frame(kind: int, data: bytes = b"") -> bytes:
    """One client->monitor frame (ATTACH_STDIN, ATTACH_RESIZE, ATTACH_CLOSE_STDIN)."""
    if len(data) > ATTACH_MAX_FRAME:
        raise ValueError("attach frame too large")
    return bytes([kind]) + len(data).to_bytes(4, "big") + data


def attach_resize_frame(rows: int, cols: int) -> bytes:
    return attach_frame(ATTACH_RESIZE, rows.to_bytes(2, "big") + cols.to_bytes(2, "big"))


def attach_read_frame(sock: Any) -> tuple[int, bytes] | None:
    """Read one monitor->client frame from a blocking socket; None at EOF."""

    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    hdr = exact(5)
    if hdr is None:
        return None
    n = int.from_bytes(hdr[1:], "big")
    body = exact(n) if n else b""
    if body is None:
        return None
    return hdr[0], body


# --- pinned namespaces (csrc/ns.c) -------------------------------------------

PIN_NET = 1
PIN_IPC = 2
PIN_UTS = 4


def ns_pin(kinds: int, net: str | None, ipc: str | None, uts: str | None,
           hostname: str = "", sysctls: dict[str, str] | None = None,
           user: str | None = None,
           idmap: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None) -> None:
    """Create and pin new namespaces onto the given (existing, empty) files.

    With ``user`` (a file) and ``idmap`` ((inside, outside, count) for uids, then
    gids): a new user namespace is made and pinned first, and the other namespaces
    are made inside it, so it owns them."""
    from pycri.config import sysctl_namespace

    err = _new_err()
    items = list((sysctls or {}).items())
    for k, _ in items:  # never let a host-wide sysctl through, whoever calls this
        sysctl_namespace(k)
    blob = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in items)

    def c(s: str | None):  # type: ignore[no-untyped-def]
        return s.encode() if s else ffi.NULL

    if user is None:
        _check(lib.pycri_ns_pin(kinds, c(net), c(ipc), c(uts), hostname.encode(),
                                blob or ffi.NULL, len(items), err), err)
        return
    if idmap is None:
        raise ValueError("a pinned user namespace needs its id maps")
    m = ffi.new("struct pycri_idmap *")
    (m.uid_inside, m.uid_outside, m.uid_count), (m.gid_inside, m.gid_outside, m.gid_count) = idmap
    _check(lib.pycri_ns_pin_userns(user.encode(), m, kinds, c(net), c(ipc), c(uts),
                                   hostname.encode(), blob or ffi.NULL, len(items), err), err)


def ns_unpin(path: str) -> None:
    err = _new_err()
    _check(lib.pycri_ns_unpin(path.encode(), err), err, path)


def ns_inode(path: str) -> int:
    err = _new_err()
    ino = ffi.new("unsigned long long *")
    _check(lib.pycri_ns_inode(path.encode(), ino, err), err, path)
    return int(ino[0])


# --- launch: detached containers that outlive the caller (csrc/launch.c) -------


class LaunchResult(NamedTuple):
    monitor_pid: int
    pid: int
    start_time: int
    start_fd: int = -1      # the held container's start and report sockets (see
    report_fd: int = -1     # api/launch.h): start it with start_direct, or close them


def start_direct(start_fd: int, report_fd: int) -> None:
    """Let a held process (start_wait) run to execve through its start and report
    sockets (closes both); raises OSError (with ``.stage``, from the child's
    message) if execve failed."""
    err = _new_err()
    if lib.pycri_spawn_start(start_fd, report_fd, err) < 0:
        raise _spawn_error(err)


def launcher_new(path: str) -> int:
    """A launcher waiting for its container: the socket to it (see api/launch.h)."""
    out = ffi.new("int *")
    err = _new_err()
    _check(lib.pycri_launcher_new(path.encode(), out, err), err, path)
    return int(out[0])


def launcher_factory_new(path: str) -> tuple[int, int]:
    """A launcher factory: (the socket to it, its pid) (see api/launch.h)."""
    out = ffi.new("int *")
    pid = ffi.new("int *")
    err = _new_err()
    _check(lib.pycri_launcher_factory_new(path.encode(), out, pid, err), err, path)
    return int(out[0]), int(pid[0])


def launcher_from_factory(factory: int) -> int:
    """A new launcher forked by the factory: the socket to it."""
    out = ffi.new("int *")
    err = _new_err()
    _check(lib.pycri_launcher_from_factory(factory, out, err), err, "launcher factory")
    return int(out[0])


class _SpareLaunchers:
    """One launcher made ahead of need, so a container create does not wait for
    the posix_spawn + exec + fork of a new one (~0.5 ms here).

    A daemon thread makes a spare whenever there is none (the C call releases the
    GIL, so it runs beside the caller); ``take`` hands it out, or -1 when there is
    none yet. The spare is an idle process that exits when its socket closes:
    with this process, or in a forked child, which drops the inherited spare.
    Spares are forked by a launcher factory this thread keeps (one process, made
    on first use, gone with its socket): a fork of that small process costs a
    fraction of a posix_spawn + exec (~0.4 ms of CPU here, on every create)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._spare: tuple[str, int] | None = None     # (launcher path, socket fd)
        self._factory: tuple[str, int, int] | None = None   # (launcher path, socket, pid)
        self._wanted: str | None = None
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def take(self, path: str) -> int:
        with self._cv:
            fd = -1
            if self._spare is not None and self._spare[0] == path:
                fd = self._spare[1]
                self._spare = None
            self._wanted = path
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pycri-launcher",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()
            return fd

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._spare is not None or self._wanted is None:
                    self._cv.wait()
                path = self._wanted
            try:
                fd = self._from_factory(path)
            except OSError:
                with self._cv:
                    self._wanted = None     # the next take retries
                continue
            with self._cv:
                if self._spare is None and self._wanted == path:
                    self._spare = (path, fd)
                    fd = -1
            if fd >= 0:
                os.close(fd)

    def _from_factory(self, path: str) -> int:
        """A new launcher from the factory for ``path`` (made, or made again after
        it died, here); a spawned one if there can be no factory."""
        for _ in range(2):
            if self._factory is None or self._factory[0] != path:
                if self._factory is not None:
                    os.close(self._factory[1])
                    self._factory = None
                try:
                    self._factory = (path, *launcher_factory_new(path))
                except OSError:
                    break
            try:
                return launcher_from_factory(self._factory[1])
            except OSError:
                os.close(self._factory[1])      # (it died: a new one)
                self._factory = None
        return launcher_new(path)

    def _after_fork(self) -> None:
        # the parent's spare, factory and thread are not this process's
        for held in (self._spare, self._factory):
            if held is not None:
                with contextlib.suppress(OSError):
                    os.close(held[1])
        self.__init_state()

    def __init_state(self) -> None:
        self._cv = threading.Condition()
        self._spare = None
        self._factory = None
        self._wanted = None
        self._thread = None


_spares = _SpareLaunchers()


@dataclass
class Preclone:
    """A container process set up ahead by a launcher and held there (csrc/api/
    launch.h, pycri_launch_pre): ``launch(..., preclone=)`` resumes it with the real
    spec; ``discard`` ends it. The socket is this process's (CLOEXEC)."""

    sock: int
    pid: int
    monitor_pid: int
    start_time: int
    fd_base: int
    _pidfd: int = -1

    def alive(self) -> bool:
        """Whether the launcher still holds it (no hangup on the socket)."""
        if self.sock < 0:
            return False
        return not _readable_now(self.sock)

    def discard(self, wait: float = 2.0) -> None:
        """Close the socket: the launcher kills and reaps the process and exits.
        Waits (up to ``wait`` s) for that, so its cgroup and mounts are free after."""
        sock, self.sock = self.sock, -1
        if sock < 0:
            return
        os.close(sock)
        pidfd = self._pidfd
        self._pidfd = -1
        if pidfd >= 0:
            try:
                _wait_readable(pidfd, wait)
            finally:
                os.close(pidfd)


def _readable_now(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLHUP)
    return bool(p.poll(0))


def _wait_readable(fd: int, timeout: float) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN)
    p.poll(int(timeout * 1000))


def preclone(spec: SpawnSpec, launcher_path: str) -> Preclone:
    """Set a container process up ahead with the stand-in ``spec`` and hold it
    (see Preclone). Raises OSError (with ``.stage``)."""
    if not spec.start_wait:
        raise ValueError("a pre-clone needs start_wait=True")
    c, _b = _spec_struct(spec)
    out = ffi.new("struct pycri_prelaunch *")
    sock = ffi.new("int *", -1)
    err = _new_err()
    launcher = _spares.take(launcher_path)
    rc = lib.pycri_launch_pre(launcher, launcher_path.encode(), c, sock, out, err)
    if rc < 0:
        if sock[0] >= 0:
            os.close(sock[0])
        elif launcher >= 0:
            os.close(launcher)
        raise _spawn_error(err, out.stage)
    pc = Preclone(sock[0], out.pid, out.monitor_pid, out.start_time, out.fd_base)
    try:
        pc._pidfd = os.pidfd_open(out.monitor_pid)
    except OSError:
        pc._pidfd = -1
    return pc


def launch(spec: SpawnSpec, start_sock: str, monitor_argv: Sequence[str],
           monitor_fds: Sequence[int], spare: bool = True,
           on_pid: Callable[[LaunchResult], None] | None = None,
           preclone: Preclone | None = None) -> LaunchResult:
    """Create a container held before execve by a detached launcher that becomes
    its monitor on start (see csrc/api/launch.h). Raises OSError with ``.stage``.
    ``spare``: use (and then replace) a launcher made ahead of need. ``on_pid`` is
    called with the pids (no fds) as soon as the container process exists, while
    it still sets itself up (not for every launch: then only the result has them);
    what it raises is raised once the launch is over, with its fds closed.
    ``preclone``: resume that held process with this spec instead (its setup must
    be the one the pre-clone was made with; the caller checks): it is used up."""
    if not spec.start_wait:
        raise ValueError("launch needs start_wait=True")
    c, b = _spec_struct(spec)
    argv = b.strv(list(monitor_argv))
    fds = ffi.new("int[]", max(1, len(monitor_fds)))
    for i, fd in enumerate(monitor_fds):
        fds[i] = fd
    res = ffi.new("struct pycri_launch_result *")
    err = _new_err()
    sock = ffi.new("int *", -1)
    failed: BaseException | None = None
    if preclone is not None:
        launcher, preclone.sock = preclone.sock, -1
        if preclone._pidfd >= 0:
            os.close(preclone._pidfd)
            preclone._pidfd = -1
    else:
        launcher = _spares.take(monitor_argv[0]) if spare else -1
    try:
        if preclone is not None:
            rc = lib.pycri_launch_resume_send(launcher, preclone.fd_base, c,
                                              start_sock.encode(), argv, fds,
                                              len(monitor_fds), err)
        else:
            rc = lib.pycri_launch_send(launcher, c, start_sock.encode(), argv, fds,
                                       len(monitor_fds), sock, err)
        if sock[0] >= 0:
            launcher = sock[0]      # (the spare, or a new launcher made for this)
        while rc == 0 or rc == 1:
            rc = lib.pycri_launch_wait(launcher, res, err)
            if rc != 1:
                break
            if on_pid is not None and failed is None:
                try:
                    on_pid(LaunchResult(res.monitor_pid, res.pid, res.start_time))
                except BaseException as e:  # noqa: BLE001 - raised below
                    failed = e
    finally:
        if launcher >= 0:
            os.close(launcher)
    if rc < 0:
        raise _spawn_error(err, res.stage)
    out = LaunchResult(res.monitor_pid, res.pid, res.start_time, res.start_fd, res.report_fd)
    if failed is not None:
        for fd in (out.start_fd, out.report_fd):
            if fd >= 0:
                os.close(fd)
        raise failed
    return out


def overlay_premount(lower: Sequence[str], upper: str, work: str,
                     dirs: Sequence[str] = (), files: Sequence[str] = ()) -> int:
    """An overlay of ``lower`` (top first) + upper + work as a detached mount, with the
    mount points ``dirs`` and ``files`` made in it where missing (csrc/api/mount.h).
    Returns its fd (CLOEXEC): SpawnSpec.rootfs_mount_fd; closing it unmounts it."""
    b = _Builder()
    out = ffi.new("int *", -1)
    err = _new_err()
    _check(lib.pycri_overlay_premount(b.s(":".join(lower)), b.s(upper), b.s(work),
                                      b.strv(list(dirs)), b.strv(list(files)), out, err),
           err, upper)
    return out[0]


def mount_clone(fd: int) -> int:
    """A new detached mount (fd, CLOEXEC) of the mount at ``fd``: the same file
    system, attached and dropped on its own (csrc/api/mount.h)."""
    out = ffi.new("int *", -1)
    err = _new_err()
    _check(lib.pycri_mount_clone(fd, out, err), err, f"fd {fd}")
    return out[0]


def dev_premount() -> int:
    """A container's /dev made ahead: a tmpfs with its nodes, links and mount point
    dirs, as a detached mount (csrc/api/mount.h). Its fd (CLOEXEC) is
    SpawnSpec.dev_mount_fd; closing it unmounts it."""
    out = ffi.new("int *", -1)
    err = _new_err()
    _check(lib.pycri_dev_premount(out, err), err, "/dev")
    return out[0]


def mkdir_each(dirs: Sequence[tuple[str, int]]) -> None:
    """mkdir each (path, mode) in order, in one C call. OSError at the first that
    fails, with ``.made``: how many were made before it (the caller undoes them)."""
    b = _Builder()
    modes = ffi.new("int[]", [m for _p, m in dirs] or [0])
    made = ffi.new("int *", 0)
    err = _new_err()
    rc = lib.pycri_mkdir_each(b.strv([p for p, _m in dirs]), modes, len(dirs), made, err)
    if rc < 0:
        e = OSError(-rc, ffi.string(err.msg).decode(errors="replace"))
        e.made = made[0]  # type: ignore[attr-defined]
        raise e


def remove_tree(path: str) -> None:
    """rm -rf ``path`` without following symlinks, in C (one call: the GIL is free
    for the whole tree). A missing path is fine; OSError otherwise."""
    err = _new_err()
    _check(lib.pycri_remove_tree(os.fsencode(path), err), err, path)


def encode_spec(spec: SpawnSpec) -> bytes:
    """The flat buffer pycri_launch sends its launcher for ``spec`` (csrc/specbuf.c)."""
    c, _keep = _spec_struct(spec)
    err = _new_err()
    size = lib.pycri_spec_encode(c, ffi.NULL, 0, err)
    if size < 0:
        raise _spawn_error(err, 0)
    buf = ffi.new("unsigned char[]", size)
    lib.pycri_spec_encode(c, buf, size, err)
    return bytes(ffi.buffer(buf, size))


def decode_spec(data: bytes) -> SpawnSpec:
    """The spec in an encode_spec buffer; OSError(EPROTO) if it is malformed."""
    # an 8-byte aligned copy: decoding rewrites offsets into pointers in place
    buf = ffi.new("unsigned long long[]", max(1, (len(data) + 7) // 8))
    ffi.memmove(buf, data, len(data))
    c = ffi.new("struct pycri_spawn_spec *")
    err = _new_err()
    if lib.pycri_spec_decode(ffi.cast("unsigned char *", buf), len(data), c, err) < 0:
        raise _spawn_error(err, 0)
    return _spec_from_struct(c)


def _spec_from_struct(c) -> SpawnSpec:  # type: ignore[no-untyped-def]
    """The inverse of _spec_struct (what the launcher sees, as Python values)."""
    def s(p) -> str | None:  # type: ignore[no-untyped-def]
        return None if p == ffi.NULL else os.fsdecode(ffi.string(p))

    def strv(p) -> list[str]:  # type: ignore[no-untyped-def]
        out: list[str] = []
        if p == ffi.NULL:
            return out
        while p[len(out)] != ffi.NULL:
            out.append(os.fsdecode(ffi.string(p[len(out)])))
        return out

    inf = 0xFFFFFFFFFFFFFFFF
    namespaces: dict[str, str] = {}
    for k, kind in enumerate(NS_KINDS):
        if c.ns_mode[k] == lib.PYCRI_NS_NEW:
            namespaces[kind] = "new"
        elif c.ns_mode[k] == lib.PYCRI_NS_JOIN:
            namespaces[kind] = s(c.ns_path[k]) or "pidfd"
    prop = {v: k for k, v in PROPAGATION.items()}
    lower = s(c.overlay_lower)
    return SpawnSpec(
        argv=strv(c.argv), env=strv(c.envp), exec_path=s(c.exec_path), cwd=s(c.cwd),
        uid=c.uid, gid=c.gid, groups=[c.groups[i] for i in range(c.n_groups)],
        cap_bounding=c.cap_bounding, cap_effective=c.cap_effective,
        cap_permitted=c.cap_permitted, cap_inheritable=c.cap_inheritable,
        cap_ambient=c.cap_ambient, no_new_privs=bool(c.no_new_privs),
        seccomp_bpf=None if c.seccomp_bpf == ffi.NULL
        else bytes(ffi.buffer(c.seccomp_bpf, c.seccomp_len * 8)),
        rlimits=[(r.resource, -1 if r.soft == inf else r.soft, -1 if r.hard == inf else r.hard)
                 for r in (c.rlimits[i] for i in range(c.n_rlimits))],
        oom_score_adj=c.oom_score_adj if c.set_oom_score_adj else None,
        hostname=s(c.hostname),
        sysctls=dict(x.split("=", 1) for x in strv(c.sysctls)),
        parent_death_signal=c.parent_death_signal,
        stdin=c.stdio[0], stdout=c.stdio[1], stderr=c.stdio[2], tty_fd=c.tty_fd,
        tty_new=bool(c.tty_new),
        keep_fds=[c.keep_fds[i] for i in range(c.n_keep_fds)],
        namespaces=namespaces, join_pidfd=c.join_pidfd,
        uid_map=(c.uid_map_inside, c.uid_map_outside, c.uid_map_count)
        if c.uid_map_count else None,
        gid_map=(c.gid_map_inside, c.gid_map_outside, c.gid_map_count)
        if c.gid_map_count else None,
        cgroup_procs=strv(c.cgroup_procs), cgroup_late=c.cgroup_late, rootfs=s(c.rootfs),
        overlay_lower=lower.split(":") if lower else [],
        overlay_upper=s(c.overlay_upper), overlay_work=s(c.overlay_work),
        rootfs_mount_fd=c.rootfs_mount_fd if c.rootfs_premounted else -1,
        dev_mount_fd=c.dev_mount_fd if c.dev_premounted else -1,
        rootfs_readonly=bool(c.rootfs_readonly), root_propagation=prop[c.root_propagation],
        mount_proc=bool(c.mount_proc), mount_sys=bool(c.mount_sys),
        mount_dev=bool(c.mount_dev), sys_writable=bool(c.sys_writable),
        host_devices=bool(c.host_devices), shm_path=s(c.shm_path), shm_size=c.shm_size,
        etc_hostname=s(c.etc_hostname), etc_hosts=s(c.etc_hosts), etc_resolv=s(c.etc_resolv),
        binds=[BindMount(s(b.source) or "", s(b.target) or "", readonly=bool(b.readonly),
                         recursive_readonly=bool(b.recursive_readonly),
                         recursive=not b.nonrecursive, propagation=prop[b.propagation],
                         idmap={v: k for k, v in IDMAP.items()}.get(b.idmap, "none"))
               for b in (c.binds[i] for i in range(c.n_binds))],
        masked_paths=strv(c.masked_paths), readonly_paths=strv(c.readonly_paths),
        start_wait=bool(c.start_wait),
    )


def launch_start(start_sock: str, timeout: float = 30.0) -> None:
    """Release a launched container; raises OSError if its execve failed."""
    err = _new_err()
    if lib.pycri_launch_start(start_sock.encode(), int(timeout * 1000), err) < 0:
        raise _spawn_error(err, lib.PYCRI_STAGE_EXEC)


def pidfd_open(pid: int) -> int:
    """A pidfd for any process (readable when it exits), or -1 if it is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1


def ns_tmpfs(path: str, size: int) -> None:
    """Mount a tmpfs (mode 1777, nosuid/nodev/noexec) of ``size`` bytes at path."""
    err = _new_err()
    _check(lib.pycri_ns_tmpfs(path.encode(), size, err), err, path)


def ns_connect(netns_path: str, port: int, udp: bool = False) -> int:
    """An fd connected to localhost:port inside the pinned network namespace."""
    err = _new_err()
    return _check(lib.pycri_ns_connect(netns_path.encode(), port, int(udp), err), err)


# --- gRPC transport (csrc/h2srv.c) --------------------------------------------


class H2Request(NamedTuple):
    conn: int
    stream: int
    path: bytes
    timeout_us: int               # -1: the client set no deadline
    body: memoryview              # valid until the next H2Server.poll; copy to keep


class H2Server:
    """The C HTTP/2 + gRPC framing server. One thread calls poll(); answers may come
    from any thread. close() frees it: no call may run then or later."""

    def __init__(self, max_message: int, max_streams: int, max_header_bytes: int,
                 max_connections: int, batch: int = 64) -> None:
        self._err = _new_err()
        p = ffi.new("struct pycri_h2 **")
        _check(lib.pycri_h2_new(p, max_message, max_streams, max_header_bytes,
                                max_connections, self._err), self._err)
        self._srv = p[0]
        self._batch = batch
        self._reqs = ffi.new("struct pycri_h2_request[]", batch)

    def add_listener(self, fd: int) -> None:
        """Serve the listening socket fd; the server owns (and closes) it from now on."""
        err = _new_err()
        _check(lib.pycri_h2_add_listener(self._srv, fd, err), err)

    def poll(self, timeout_ms: int) -> list[H2Request]:
        """Wait up to timeout_ms for requests; run the protocol meanwhile."""
        n = _check(lib.pycri_h2_poll(self._srv, self._reqs, self._batch, timeout_ms,
                                     self._err), self._err)
        out = []
        for i in range(n):
            r = self._reqs[i]
            out.append(H2Request(r.conn, r.stream, ffi.string(r.path), r.timeout_us,
                                 memoryview(ffi.buffer(r.body, r.body_len))))
        return out

    def respond(self, conn: int, stream: int, message: bytes | None, status: int = 0,
                text: str = "") -> bool:
        """End the answer: the last message (if any), then the status. False if the
        stream is gone (client cancelled, connection closed)."""
        if message is None:
            rc = lib.pycri_h2_respond(self._srv, conn, stream, ffi.NULL, 0, 0, status,
                                      text.encode("utf-8", "replace"), ffi.NULL)
        else:
            rc = lib.pycri_h2_respond(self._srv, conn, stream, message, len(message), 1,
                                      status, text.encode("utf-8", "replace"), ffi.NULL)
        return rc == 0

    def send(self, conn: int, stream: int, message: bytes) -> int:
        """One more message of a server-streaming answer: 0 taken, 1 the stream is gone,
        2 not taken because the client is not reading what it was sent (wait, retry)."""
        return int(lib.pycri_h2_send(self._srv, conn, stream, message, len(message), ffi.NULL))

    def alive(self, conn: int, stream: int) -> bool:
        return bool(lib.pycri_h2_alive(self._srv, conn, stream))

    def _live(self) -> None:
        if self._srv == ffi.NULL:
            raise ValueError("H2Server is closed")

    def wake(self) -> None:
        self._live()
        err = _new_err()
        _check(lib.pycri_h2_wake(self._srv, err), err)

    def shutdown(self, hard: bool = False) -> None:
        """Stop accepting and send GOAWAY; with hard, close every connection too."""
        self._live()
        err = _new_err()
        _check(lib.pycri_h2_shutdown(self._srv, int(hard), err), err)

    def stats(self) -> dict[str, int]:
        self._live()
        s = ffi.new("struct pycri_h2_stats *")
        lib.pycri_h2_stats(self._srv, s)
        return {k: getattr(s, k) for k in ("connections", "streams", "accepted", "requests",
                                           "rejected", "buffered")}

    def close(self) -> None:
        if self._srv != ffi.NULL:
            lib.pycri_h2_free(self._srv)
            self._srv = ffi.NULL
