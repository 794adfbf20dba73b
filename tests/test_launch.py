"""pycri_launch: the spec's flat encoding, and the launcher (pycri-monitor --launch)
that creates a container, holds it until start and becomes its monitor.

Needs root (the launcher spawns real containers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import struct
import time

import pytest

from pycri import _native as n

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def every_field_spec() -> n.SpawnSpec:
    """A spec in which every field differs from its default."""
    return n.SpawnSpec(
        argv=["/bin/prog", "a b", ""], env=["PATH=/x", "EMPTY="], exec_path="/bin/real",
        cwd="/work dir", uid=1000, gid=1001, groups=[5, 6, 70000],
        cap_bounding=(1 << 40) | 5, cap_effective=3, cap_permitted=7, cap_inheritable=1 << 33,
        cap_ambient=1, no_new_privs=True, seccomp_bpf=bytes(range(24)),
        rlimits=[(7, 1024, 4096), (3, -1, -1)], oom_score_adj=500, hostname="box",
        sysctls={"net.ipv4.ip_forward": "1", "kernel.msgmax": "a=b"},
        parent_death_signal=9, stdin=10, stdout=11, stderr=12, tty_fd=13, tty_new=True, keep_fds=[14, 15],
        namespaces={"user": "new", "mnt": "new", "pid": "/proc/1/ns/pid", "uts": "pidfd",
                    "ipc": "new", "net": "/run/netns/x", "cgroup": "new"},
        join_pidfd=16, uid_map=(0, 100000, 65536), gid_map=(0, 200000, 1000),
        cgroup_procs=["/sys/fs/cgroup/pids/a/cgroup.procs", "/sys/fs/cgroup/x/cgroup.procs"],
        cgroup_late=1, rootfs="/run/r", overlay_lower=["/l/1", "/l/2"], overlay_upper="/u", overlay_work="/w",
        rootfs_mount_fd=17, dev_mount_fd=18,
        rootfs_readonly=True, root_propagation="rshared", mount_proc=False, mount_sys=False,
        mount_dev=False, sys_writable=True, host_devices=True, shm_path="/dev/shm/pod", shm_size=1 << 20, etc_hostname="/e/h",
        etc_hosts="/e/hosts", etc_resolv="/e/r",
        binds=[n.BindMount("/src", "/dst", readonly=True, recursive_readonly=True,
                           recursive=False, propagation="rslave"),
               n.BindMount("/s2", "/d2")],
        masked_paths=["/proc/kcore", "/sys/firmware"], readonly_paths=["/proc/sys"],
        start_wait=True,
    )


def test_spec_round_trip_carries_every_field():
    spec = every_field_spec()
    defaults = n.SpawnSpec(argv=["x"])
    for f in dataclasses.fields(n.SpawnSpec):
        assert getattr(spec, f.name) != getattr(defaults, f.name), \
            f"give {f.name} a non-default value in every_field_spec()"
    assert n.decode_spec(n.encode_spec(spec)) == spec


def test_spec_round_trip_of_empty_lists_and_nulls():
    spec = n.SpawnSpec(argv=["true"])
    back = n.decode_spec(n.encode_spec(spec))
    assert back == spec


def test_spec_decode_refuses_damaged_buffers():
    data = n.encode_spec(every_field_spec())
    with pytest.raises(OSError) as ei:
        n.decode_spec(data[:-1])  # the length in the header no longer matches
    assert ei.value.errno == errno.EPROTO
    # cut in half with the header patched to agree: offsets now point outside
    half = bytearray(data[: len(data) // 2])
    half[8:12] = struct.pack("=I", len(half))
    with pytest.raises(OSError) as ei:
        n.decode_spec(bytes(half))
    assert ei.value.errno == errno.EPROTO
    with pytest.raises(OSError):
        n.decode_spec(b"\0" * 8)


# --- the launcher ------------------------------------------------------------------

def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def gone_within(pred, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pred():
            return True
        time.sleep(0.01)
    return not pred()


def fd_identities(pid: int) -> set[tuple[int, int]]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def exit_record(paths: dict[str, str]) -> dict:
    """The monitor's exit file, once it is there (within 5 s)."""
    deadline = time.monotonic() + 5
    while not os.path.exists(paths["exit"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(paths["exit"]) as f:
        return json.load(f)


@pytest.fixture
def paths(tmp_path):
    d = tmp_path
    return {"sock": str(d / "s.start"), "exit": str(d / "exit.json"), "log": str(d / "log")}


def monitor_argv(paths: dict[str, str], **kw) -> list[str]:
    return n.monitor_command(paths["exit"], paths["log"], adopt=0, **kw)[:-2]


def test_failed_spawn_leaves_no_process(paths):
    spec = n.SpawnSpec(argv=["/nonexistent/prog"], start_wait=True)
    with pytest.raises(OSError) as ei:
        n.launch(spec, paths["sock"], monitor_argv(paths), [])
    assert ei.value.stage == "exec"
    assert ei.value.errno == errno.ENOENT
    assert gone_within(lambda: processes_mentioning(paths["sock"]))
    assert not os.path.exists(paths["sock"])


def test_bad_fd_in_spec_fails_before_any_process(paths):
    closed = 1000
    with pytest.raises(OSError):
        os.fstat(closed)
    spec = n.SpawnSpec(argv=["/bin/true"], stdout=closed, start_wait=True)
    with pytest.raises(OSError) as ei:
        n.launch(spec, paths["sock"], monitor_argv(paths), [])
    assert ei.value.errno == errno.EBADF
    assert not processes_mentioning(paths["sock"])


def test_launcher_holds_none_of_the_callers_fds(paths):
    # an inheritable fd and a CLOEXEC one the container must not get
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_w, True)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    res = None
    try:
        spec = n.SpawnSpec(argv=["/bin/sh", "-c", "echo hi; ls /proc/self/fd >&2"],
                           stdout=out_w, stderr=err_w, start_wait=True)
        res = n.launch(spec, paths["sock"], monitor_argv(paths, stdout_fd=out_r,
                                                         stderr_fd=err_r), [out_r, err_r])
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        for pid in (res.monitor_pid, res.pid):
            held = fd_identities(pid)
            assert ident(stray_r) not in held and ident(stray_w) not in held
        # the launcher has the monitor's read ends (what the container has after
        # execve is checked below, from inside)
        assert ident(out_r) in fd_identities(res.monitor_pid)
        null = os.stat("/dev/null")
        allowed = {ident(out_r), ident(err_r), (null.st_dev, null.st_ino)}
        for fd in os.listdir(f"/proc/{res.monitor_pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # the caller's socket, closing
                target = os.readlink(f"/proc/{res.monitor_pid}/fd/{fd}")
                st = os.stat(f"/proc/{res.monitor_pid}/fd/{fd}")
                # its own sockets and its pidfd of the held container are its own
                assert target.startswith("socket:") or target == "anon_inode:[pidfd]" \
                    or (st.st_dev, st.st_ino) in allowed, target
        n.launch_start(paths["sock"])
        assert exit_record(paths)["exit_code"] == 0
        with open(paths["log"]) as f:
            log = f.read()
        assert " stdout F hi\n" in log
        # sh saw 0, 1, 2 and the fd of its own ls only
        fds = sorted(int(line.split()[-1]) for line in log.splitlines() if " stderr " in line)
        assert fds[:3] == [0, 1, 2] and len(fds) <= 4
    finally:
        for fd in (stray_r, stray_w, out_r, err_r, out_w, err_w):
            if fd >= 0:
                os.close(fd)
        if res is not None:  # a failed check leaves no launcher or container behind
            for pid in (res.pid, res.monitor_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_launched_monitor_is_not_our_child_and_survives_start(paths):
    spec = n.SpawnSpec(argv=["/bin/sleep", "30"], start_wait=True)
    res = n.launch(spec, paths["sock"], monitor_argv(paths), [])
    try:
        with open(f"/proc/{res.monitor_pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()
        with open(f"/proc/{res.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == res.monitor_pid
        n.launch_start(paths["sock"])
        with open(f"/proc/{res.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == b"/bin/sleep"
        # the same process now runs the monitor's loop: it records the exit
        os.kill(res.pid, signal.SIGTERM)
        assert exit_record(paths)["signal"] == signal.SIGTERM
        assert gone_within(lambda: os.path.exists(f"/proc/{res.monitor_pid}"))
    finally:
        for pid in (res.pid, res.monitor_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the launcher factory -----------------------------------------------------------

def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_factory_forks_working_launchers_and_goes_with_its_socket(paths):
    """A launcher from the factory is a fork of it, detached like a spawned one (not
    the factory's child, nor ours), and launches a container as a spawned one does;
    the factory exits when its socket closes."""
    mon = n.monitor_path()
    factory, factory_pid = n.launcher_factory_new(mon)
    with open(f"/proc/{factory_pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[1:4] == [b"--launch", b"3", b"factory" + b" " * 101]
    try:
        sock = n.launcher_from_factory(factory)
        spec = n.SpawnSpec(argv=["/bin/sh", "-c", "exit 7"], start_wait=True)
        c, _b = n._spec_struct(spec)
        argv = _b.strv(monitor_argv(paths))
        fds = n.ffi.new("int[]", 1)
        res = n.ffi.new("struct pycri_launch_result *")
        err = n._new_err()
        assert n.lib.pycri_launch(sock, c, paths["sock"].encode(), argv, fds, 0, res, err) == 0, \
            n.ffi.string(err.text)
        os.close(sock)
        assert _ppid(res.monitor_pid) not in (os.getpid(), factory_pid)
        with open(f"/proc/{res.monitor_pid}/cmdline", "rb") as f:    # (a launcher's)
            assert f.read().split(b"\0")[1:4] == [b"--launch", b"3", paths["sock"].encode()]
        n.launch_start(paths["sock"])
        assert exit_record(paths)["exit_code"] == 7
    finally:
        os.close(factory)
    assert gone_within(lambda: os.path.exists(f"/proc/{factory_pid}"))


def test_spares_outlive_a_killed_factory(paths):
    """kill -9 of the spare-making factory: the next spare comes from a new one, and
    launches go on."""
    for _ in range(2):
        spec = n.SpawnSpec(argv=["/bin/true"], start_wait=True)
        res = n.launch(spec, paths["sock"], monitor_argv(paths), [])
        n.launch_start(paths["sock"])
        monitor = f"/proc/{res.monitor_pid}"
        assert gone_within(lambda m=monitor: os.path.exists(m), 5)
        os.unlink(paths["exit"])
        deadline = time.monotonic() + 5
        while n._spares._factory is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert n._spares._factory is not None
        os.kill(n._spares._factory[2], signal.SIGKILL)
