"""pycri_spawn on a real kernel: namespaces, mounts, ids, caps, seccomp, fds, errors.

Each container runs a busybox-static rootfs with tests/probe.c (static) in it; the
probe prints what the process sees as JSON. Needs root.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

from pycri import _native as n

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

ALL_NEW = {k: "new" for k in ("mnt", "pid", "uts", "ipc", "net", "cgroup")}
# The CRI default capability set (containerd/CRI-O): chown dac_override fowner fsetid
# kill setgid setuid setpcap net_bind_service net_raw sys_chroot mknod audit_write setfcap.
DEFAULT_CAPS = sum(1 << c for c in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
APPLETS = ["sh", "ls", "cat", "mkdir", "echo", "true", "sleep", "id", "test", "touch", "tty",
           "mount", "wc"]


@pytest.fixture(scope="session")
def probe_bin():
    d = tempfile.mkdtemp(prefix="pycri-probe-")
    out = os.path.join(d, "probe")
    subprocess.run(["gcc", "-static", "-O2", "-o", out, os.path.join(HERE, "probe.c")],
                   check=True)
    yield out
    shutil.rmtree(d, ignore_errors=True)


def make_rootfs(path: str, probe: str) -> str:
    os.makedirs(os.path.join(path, "bin"))
    os.makedirs(os.path.join(path, "etc"))
    os.makedirs(os.path.join(path, "tmp"))
    shutil.copy2("/bin/busybox", os.path.join(path, "bin", "busybox"))
    shutil.copy2(probe, os.path.join(path, "bin", "probe"))
    for a in APPLETS:
        os.symlink("busybox", os.path.join(path, "bin", a))
    return path


@pytest.fixture
def rootfs(tmp_path, probe_bin):
    return make_rootfs(str(tmp_path / "rootfs"), probe_bin)


def children() -> set[int]:
    """Pids of this process's children, reaped or not (zombies included)."""
    kids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            kids.update(int(x) for x in f.read().split())
    return kids


def our_mounts(tag: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if tag in line]


@pytest.fixture(autouse=True)
def no_leaks(tmp_path):
    """Every test leaves no mount under its tmp dir and no unreaped child."""
    before = our_mounts(str(tmp_path))
    kids_before = children()
    yield
    assert our_mounts(str(tmp_path)) == before
    # every child this test made was reaped (other fixtures' servers may still run)
    assert children() <= kids_before


def spec_for(rootfs: str, argv: list[str], **kw) -> n.SpawnSpec:
    base = {"argv": argv, "env": ["PATH=/bin", "HOME=/"], "rootfs": rootfs,
            "namespaces": dict(ALL_NEW), "cap_bounding": DEFAULT_CAPS,
            "cap_effective": DEFAULT_CAPS, "cap_permitted": DEFAULT_CAPS}
    base.update(kw)
    return n.SpawnSpec(**base)


def run(spec: n.SpawnSpec) -> tuple[int, str]:
    """Spawn with stdout on a pipe; returns (wait status, output)."""
    r, w = os.pipe()
    spec.stdout = w
    try:
        res = n.spawn(spec)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(res.pid, 0)
    os.close(res.pidfd)
    return status, out.decode()


def probe(spec: n.SpawnSpec) -> dict:
    status, out = run(spec)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return json.loads(out)


def host_ns(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


# --- namespaces, identity ------------------------------------------------------


def test_new_namespaces_pid1_hostname(rootfs):
    d = probe(spec_for(rootfs, ["probe"], hostname="box1"))
    assert d["pid"] == 1
    assert d["hostname"] == "box1"
    for kind in ("mnt", "pid", "uts", "ipc", "net", "cgroup"):
        assert d["ns"][kind] != host_ns(kind), kind
    assert d["ns"]["user"] == host_ns("user")
    assert d["fds"] == [0, 1, 2]


def test_user_group_and_groups(rootfs):
    d = probe(spec_for(rootfs, ["probe"], uid=1000, gid=1001, groups=[10, 20],
                       cap_effective=0, cap_permitted=0))
    assert d["uid"] == [1000, 1000, 1000]
    assert d["gid"] == [1001, 1001, 1001]
    assert sorted(d["groups"]) == [10, 20]


def test_caps_default_set(rootfs):
    d = probe(spec_for(rootfs, ["probe"]))
    for f in ("CapEff", "CapPrm", "CapBnd"):
        assert int(d[f], 16) == DEFAULT_CAPS, f
    assert int(d["CapInh"], 16) == 0
    assert int(d["CapAmb"], 16) == 0


def test_caps_drop_all(rootfs):
    d = probe(spec_for(rootfs, ["probe"], cap_bounding=0, cap_effective=0, cap_permitted=0))
    for f in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(d[f], 16) == 0, f


def test_ambient_caps_for_non_root(rootfs):
    bind_service = 1 << 10
    d = probe(spec_for(rootfs, ["probe"], uid=1000, gid=1000, cap_effective=bind_service,
                       cap_permitted=bind_service, cap_ambient=bind_service))
    assert int(d["CapEff"], 16) == bind_service
    assert int(d["CapAmb"], 16) == bind_service


def test_no_new_privs_and_seccomp_filter(rootfs):
    # allow everything but mkdir/mkdirat (x86-64: 83, 258), which fail with EPERM
    def ins(code, jt, jf, k):
        return struct.pack("=HBBI", code, jt, jf, k)

    ld_arch, ld_nr, jeq, ret = 0x20, 0x20, 0x15, 0x06
    prog = b"".join([
        ins(ld_arch, 0, 0, 4),                 # A = arch
        ins(jeq, 1, 0, 0xC000003E),            # x86_64?
        ins(ret, 0, 0, 0x7FFF0000),            # other arch: allow (test only)
        ins(ld_nr, 0, 0, 0),                   # A = nr
        ins(jeq, 2, 0, 83),
        ins(jeq, 1, 0, 258),
        ins(ret, 0, 0, 0x7FFF0000),            # allow
        ins(ret, 0, 0, 0x00050000 | errno.EPERM),
    ])
    d = probe(spec_for(rootfs, ["probe", "d:/tmp/x"], no_new_privs=True, seccomp_bpf=prog))
    assert d["no_new_privs"] == 1
    assert d["seccomp"] == 2 and d["Seccomp"] == "2"
    assert d["checks"]["d:/tmp/x"] == errno.EPERM
    assert not os.path.exists(os.path.join(rootfs, "tmp", "x"))
    # the same filter without no_new_privs loads while CAP_SYS_ADMIN is still held
    d = probe(spec_for(rootfs, ["probe", "d:/tmp/y"], seccomp_bpf=prog))
    assert d["no_new_privs"] == 0 and d["seccomp"] == 2
    assert d["checks"]["d:/tmp/y"] == errno.EPERM


def test_rlimits_and_oom_score_adj(rootfs):
    d = probe(spec_for(rootfs, ["probe"], rlimits=[(7, 256, 512), (4, 0, 0)],
                       oom_score_adj=500))
    assert d["rlimits"]["7"] == [256, 512]
    assert d["rlimits"]["4"] == [0, 0]
    assert d["oom_score_adj"] == 500


def test_sysctl_in_new_net_ns(rootfs):
    status, out = run(spec_for(rootfs, ["cat", "/proc/sys/net/ipv4/ip_forward"],
                               sysctls={"net.ipv4.ip_forward": "1"},
                               readonly_paths=["/proc/sys"]))
    assert status == 0 and out.strip() == "1"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host_value = f.read().strip()
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"], sysctls={"../../etc/x": "1"}))
    assert ei.value.errno == errno.EINVAL and ei.value.stage == "prepare"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == host_value


# --- mounts ------------------------------------------------------------------


def test_standard_mounts(rootfs):
    d = probe(spec_for(rootfs, ["probe", "w:/dev/null", "r:/dev/urandom", "w:/proc/sysrq-trigger",
                                "w:/sys/kernel/x"]))
    points = {line.split()[4]: line for line in d["mounts"]}
    for p in ("/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue"):
        assert p in points, p
    assert " ro," in points["/sys"] or " ro " in points["/sys"]
    assert "ptmxmode=666" in points["/dev/pts"] and "gid=5" in points["/dev/pts"]
    assert d["checks"]["w:/dev/null"] == 0
    assert d["checks"]["r:/dev/urandom"] == 0
    assert d["checks"]["w:/sys/kernel/x"] in (errno.EROFS, errno.EACCES, errno.ENOENT)
    status, out = run(spec_for(rootfs, ["ls", "-l", "/dev/ptmx", "/dev/fd", "/dev/stdin"]))
    assert status == 0
    assert "pts/ptmx" in out and "/proc/self/fd" in out


def test_masked_and_readonly_paths(rootfs):
    os.makedirs(os.path.join(rootfs, "secret"))
    with open(os.path.join(rootfs, "secret", "key"), "w") as f:
        f.write("hush")
    with open(os.path.join(rootfs, "etc", "shadowy"), "w") as f:
        f.write("hush")
    os.makedirs(os.path.join(rootfs, "data"))
    status, out = run(spec_for(
        rootfs, ["sh", "-c", ("cat /etc/shadowy; echo :; ls /secret; echo :; cat /proc/kcore | "
                              "wc -c; touch /data/f 2>&1; echo :; touch /proc/sys/x 2>&1; echo end")],
        masked_paths=["/secret", "/etc/shadowy", "/proc/kcore", "/does/not/exist"],
        readonly_paths=["/data", "/proc/sys", "/missing"]))
    assert status == 0, out
    parts = out.split(":")
    assert "hush" not in out
    assert parts[0].strip() == ""
    assert "key" not in parts[1]
    assert "Read-only file system" in out
    assert out.strip().endswith("end")
    assert not os.path.exists(os.path.join(rootfs, "data", "f"))


def test_masked_path_symlink_stays_in_root(rootfs, tmp_path):
    # an image symlink pointing at the host's /etc/passwd is resolved in-root
    os.symlink("/etc/passwd", os.path.join(rootfs, "etc", "link"))
    with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
        f.write("image passwd\n")
    status, out = run(spec_for(rootfs, ["sh", "-c", "cat /etc/passwd; echo end"],
                               masked_paths=["/etc/link"]))
    assert status == 0 and out.strip() == "end"  # the image's file got masked
    with open("/etc/passwd") as f:
        assert "root" in f.read()


def test_bind_mounts_ro_rw_and_created_targets(rootfs, tmp_path):
    src_rw = tmp_path / "rw"
    src_ro = tmp_path / "ro"
    src_rw.mkdir()
    src_ro.mkdir()
    (src_ro / "hello").write_text("hi")
    hostfile = tmp_path / "file.txt"
    hostfile.write_text("file content")
    d = probe(spec_for(rootfs, ["probe", "w:/mnt/rw/new", "w:/mnt/ro/new", "r:/mnt/ro/hello",
                                "r:/opt/deep/file.txt"],
                       binds=[n.BindMount(str(src_rw), "/mnt/rw"),
                              n.BindMount(str(src_ro), "/mnt/ro", readonly=True),
                              n.BindMount(str(hostfile), "/opt/deep/file.txt", readonly=True)]))
    assert d["checks"]["w:/mnt/rw/new"] == 0
    assert (src_rw / "new").exists()
    assert d["checks"]["w:/mnt/ro/new"] == errno.EROFS
    assert d["checks"]["r:/mnt/ro/hello"] == 0
    assert d["checks"]["r:/opt/deep/file.txt"] == 0
    assert os.path.isfile(os.path.join(rootfs, "opt", "deep", "file.txt"))


def test_recursive_readonly_bind(rootfs, tmp_path):
    outer = tmp_path / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        binds = [n.BindMount(str(outer), "/rro", recursive_readonly=True),
                 n.BindMount(str(outer), "/ro", readonly=True)]
        d = probe(spec_for(rootfs, ["probe", "w:/rro/inner/x", "w:/ro/inner/y", "w:/ro/z"],
                           binds=binds))
        assert d["checks"]["w:/rro/inner/x"] == errno.EROFS
        assert d["checks"]["w:/ro/z"] == errno.EROFS
        assert d["checks"]["w:/ro/inner/y"] == 0  # plain readonly covers the top mount only
    finally:
        subprocess.run(["umount", str(inner)], check=True)


def test_bind_missing_source_is_an_error(rootfs, tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        n.spawn(spec_for(rootfs, ["true"], binds=[n.BindMount(str(tmp_path / "nope"), "/x")]))
    assert ei.value.stage == "mount"
    assert "nope" in str(ei.value)


def test_bind_target_symlink_to_host_etc_stays_in_rootfs(rootfs, tmp_path):
    # the image has /evil -> /etc ; a bind onto /evil/pwned must land in <rootfs>/etc
    os.symlink("/etc", os.path.join(rootfs, "evil"))
    src = tmp_path / "payload"
    src.write_text("payload")
    status, out = run(spec_for(rootfs, ["cat", "/etc/pwned"],
                               binds=[n.BindMount(str(src), "/evil/pwned")]))
    assert status == 0 and out == "payload"
    assert not os.path.exists("/etc/pwned")
    assert os.path.exists(os.path.join(rootfs, "etc", "pwned"))
    # relative escapes are clamped too
    os.symlink("../../../../../../etc", os.path.join(rootfs, "rel"))
    status, out = run(spec_for(rootfs, ["cat", "/etc/pwned2"],
                               binds=[n.BindMount(str(src), "/rel/pwned2")]))
    assert status == 0 and out == "payload"
    assert not os.path.exists("/etc/pwned2")


def test_etc_files(rootfs, tmp_path):
    files = {}
    for name in ("hostname", "hosts", "resolv"):
        p = tmp_path / name
        p.write_text(f"{name}-content\n")
        files[name] = str(p)
    status, out = run(spec_for(rootfs, ["cat", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"],
                               etc_hostname=files["hostname"], etc_hosts=files["hosts"],
                               etc_resolv=files["resolv"]))
    assert status == 0
    assert out.split() == ["hostname-content", "hosts-content", "resolv-content"]


def test_symlinked_proc_in_image_is_refused(rootfs):
    os.symlink("/etc", os.path.join(rootfs, "proc"))
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"]))
    assert ei.value.errno == errno.ELOOP and ei.value.stage == "mount"


@pytest.mark.parametrize("name", ["dev", "sys"])
def test_symlinked_dev_or_sys_in_image_is_refused(rootfs, name):
    os.symlink("/etc", os.path.join(rootfs, name))
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"]))
    assert ei.value.errno == errno.ELOOP and ei.value.stage == "mount"


def test_image_dev_null_symlink_does_not_redirect_masks(rootfs):
    # without a /dev tmpfs the image's /dev stays; masks still use the host's /dev/null
    os.makedirs(os.path.join(rootfs, "dev"))
    os.symlink("/etc/victim", os.path.join(rootfs, "dev", "null"))
    with open(os.path.join(rootfs, "etc", "victim"), "w") as f:
        f.write("victim")
    with open(os.path.join(rootfs, "etc", "masked"), "w") as f:
        f.write("secret")
    status, out = run(spec_for(rootfs, ["sh", "-c", "cat /etc/masked; echo end"],
                               mount_dev=False, masked_paths=["/etc/masked"]))
    assert status == 0 and out.strip() == "end"


def test_tty_with_all_stdio_given(rootfs):
    master, slave = pty.openpty()
    r, w = os.pipe()
    try:
        res = n.spawn(spec_for(rootfs, ["sh", "-c", "test -t 0 || echo not-a-tty-on-0; echo done"],
                               tty_fd=slave, stdin=r, stdout=w, stderr=w))
        os.close(w)
        w = -1
        out = b""
        while chunk := os.read(r, 4096):
            out += chunk
        os.waitpid(res.pid, 0)
        os.close(res.pidfd)
        assert b"not-a-tty-on-0" in out and b"done" in out
    finally:
        for fd in (master, slave, r, w):
            if fd >= 0:
                os.close(fd)


def test_readonly_rootfs_and_working_dir(rootfs):
    d = probe(spec_for(rootfs, ["probe", "w:/newfile", "w:/dev/shm/ok"], cwd="/work/dir",
                       rootfs_readonly=True))
    assert d["cwd"] == "/work/dir"
    assert os.path.isdir(os.path.join(rootfs, "work", "dir"))
    assert d["checks"]["w:/newfile"] == errno.EROFS
    assert d["checks"]["w:/dev/shm/ok"] == 0


def test_working_dir_symlink_stays_in_root(rootfs):
    os.symlink("/tmp/../../..", os.path.join(rootfs, "up"))
    d = probe(spec_for(rootfs, ["probe"], cwd="/up/wd"))
    assert d["cwd"] == "/wd"
    assert os.path.isdir(os.path.join(rootfs, "wd"))


def test_overlay_rootfs_writes_land_in_upper(rootfs, tmp_path):
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for p in (upper, work, target):
        p.mkdir()
    status, out = run(spec_for(str(target), ["sh", "-c", "echo hi > /newfile; ls /bin/probe"],
                               overlay_lower=[rootfs], overlay_upper=str(upper),
                               overlay_work=str(work)))
    assert status == 0, out
    assert (upper / "newfile").read_text() == "hi\n"
    assert not os.path.exists(os.path.join(rootfs, "newfile"))
    assert os.listdir(target) == []


# --- fds, tty, dumpable ----------------------------------------------------------


def test_only_stdio_and_kept_fds(rootfs, tmp_path):
    leak = os.open(str(tmp_path), os.O_RDONLY)  # inheritable on purpose
    os.set_inheritable(leak, True)
    keep = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        d = probe(spec_for(rootfs, ["probe"], keep_fds=[keep]))
        assert d["fds"] == [0, 1, 2, 3]
        d = probe(spec_for(rootfs, ["probe"]))
        assert d["fds"] == [0, 1, 2]
    finally:
        os.close(leak)
        os.close(keep)


def test_tty_is_controlling_terminal(rootfs):
    master, slave = pty.openpty()
    try:
        res = n.spawn(spec_for(rootfs, ["sh", "-c", "test -t 0 && test -t 1 && echo tty-ok"],
                               tty_fd=slave))
        os.close(slave)
        slave = -1
        buf = b""
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        os.waitpid(res.pid, 0)
        os.close(res.pidfd)
        assert b"tty-ok" in buf
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_two_phase_start_and_not_dumpable_before_exec(rootfs):
    r, w = os.pipe()
    spec = spec_for(rootfs, ["probe"], uid=1000, gid=1000, cap_effective=0, cap_permitted=0,
                    start_wait=True, stdout=w)
    res = n.spawn(spec)
    os.close(w)
    started = False
    try:
        # created, not started: non-dumpable, so /proc/<pid>/* belongs to root
        assert os.stat(f"/proc/{res.pid}/environ").st_uid == 0
        with open(f"/proc/{res.pid}/status") as f:
            assert "\nUid:\t1000\t" in f.read()
        n.spawn_start(res)
        started = True
        with os.fdopen(r, "rb") as f:
            d = json.loads(f.read())
    finally:
        if not started:
            os.close(res.start_fd)
            os.close(res.report_fd)
        os.waitpid(res.pid, 0)
        os.close(res.pidfd)
    assert d["dumpable"] == 1 and d["pid"] == 1
    assert res.start_time > 0


def test_create_without_start_then_kill(rootfs):
    res = n.spawn(spec_for(rootfs, ["true"], start_wait=True))
    os.close(res.start_fd)  # the caller gives up: the child must exit without exec
    os.close(res.report_fd)
    _, status = os.waitpid(res.pid, 0)
    os.close(res.pidfd)
    assert os.waitstatus_to_exitcode(status) == 0


# --- errors leave nothing behind ---------------------------------------------------


def test_missing_executable(rootfs):
    with pytest.raises(FileNotFoundError) as ei:
        n.spawn(spec_for(rootfs, ["foo"]))
    assert 'exec "foo": executable file not found in $PATH' in str(ei.value)
    assert ei.value.stage == "exec"
    with pytest.raises(FileNotFoundError) as ei:
        n.spawn(spec_for(rootfs, ["/bin/nope"]))
    assert ei.value.stage == "exec"


def test_missing_executable_with_start_wait_fails_at_create(rootfs):
    with pytest.raises(FileNotFoundError):
        n.spawn(spec_for(rootfs, ["foo"], start_wait=True))


def test_failure_after_overlay_leaves_no_mounts(rootfs, tmp_path):
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for p in (upper, work, target):
        p.mkdir()
    before = our_mounts(str(tmp_path))
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(str(target), ["true"], overlay_lower=[rootfs], overlay_upper=str(upper),
                         overlay_work=str(work),
                         binds=[n.BindMount(str(tmp_path / "missing"), "/x")]))
    assert ei.value.stage == "mount"
    assert our_mounts(str(tmp_path)) == before


def test_bad_cgroup_path_kills_child(rootfs, tmp_path):
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"], cgroup_procs=[str(tmp_path / "nope" / "cgroup.procs")]))
    assert ei.value.stage == "cgroup"


# --- cgroups, joining, user namespaces ------------------------------------------------


def test_joins_cgroup_before_exec(rootfs):
    base = "/sys/fs/cgroup/pids"
    if not os.path.isdir(base):
        pytest.skip("no v1 pids hierarchy")
    cg = tempfile.mkdtemp(prefix="pycri-spawn-test-", dir=base)
    try:
        procs = [os.path.join(cg, "cgroup.procs")]
        host_cgns = dict(ALL_NEW, cgroup="host")
        status, out = run(spec_for(rootfs, ["cat", "/proc/self/cgroup"], namespaces=host_cgns,
                                   cgroup_procs=procs))
        assert status == 0
        assert f":pids:/{os.path.basename(cg)}\n" in out
        # with a new cgroup namespace the container's own cgroup is its root
        status, out = run(spec_for(rootfs, ["cat", "/proc/self/cgroup"], cgroup_procs=procs))
        assert status == 0
        assert ":pids:/\n" in out and os.path.basename(cg) not in out
    finally:
        os.rmdir(cg)


def _v2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.startswith("cgroup2 "):
                return left.split()[4]
    return None


@pytest.mark.parametrize("join", ["new", "pid", "userns"])
def test_joins_v1_and_v2_cgroups_without_cgroup_procs(rootfs, tmp_path, join):
    """v1 by the child writing 0 to tasks, v2 by CLONE_INTO_CGROUP (also through the
    intermediate of a joined namespace): the process ends up in every cgroup, and
    the v1 one sees it in cgroup.procs like any other member."""
    v1, v2 = "/sys/fs/cgroup/pids", _v2_mount()
    if not os.path.isdir(v1) or not v2:
        pytest.skip("needs a v1 pids hierarchy and a cgroup2 mount")
    cg1 = tempfile.mkdtemp(prefix="pycri-spawn-test-", dir=v1)
    cg2 = tempfile.mkdtemp(prefix="pycri-spawn-test-", dir=v2)
    holder = None
    try:
        procs = [os.path.join(cg1, "cgroup.procs"), os.path.join(cg2, "cgroup.procs")]
        namespaces = dict(ALL_NEW, cgroup="host")
        kw = {}
        if join == "pid":
            holder, hw = _holder(rootfs)
            namespaces["net"] = f"/proc/{holder.pid}/ns/net"
        elif join == "userns":
            # the namespace's root must reach the rootfs and find the mount points
            p = str(tmp_path)
            while p != "/":
                os.chmod(p, os.stat(p).st_mode | 0o111)
                p = os.path.dirname(p)
            for d in ("proc", "sys", "dev"):
                os.makedirs(os.path.join(rootfs, d))
            namespaces["user"] = "new"
            kw = {"uid_map": (0, 200000, 65536), "gid_map": (0, 200000, 65536)}
        res = n.spawn(spec_for(rootfs, ["sleep", "10"], namespaces=namespaces,
                               cgroup_procs=procs, **kw))
        try:
            with open(f"/proc/{res.pid}/cgroup") as f:
                got = f.read()
            assert f":pids:/{os.path.basename(cg1)}\n" in got
            assert f"0::/{os.path.basename(cg2)}\n" in got
            with open(procs[0]) as f:
                assert f.read().split() == [str(res.pid)]
        finally:
            os.kill(res.pid, 9)
            os.waitpid(res.pid, 0)
            os.close(res.pidfd)
    finally:
        if holder is not None:
            _release(holder, hw)
        os.rmdir(cg1)
        os.rmdir(cg2)


def test_join_namespaces_of_a_running_container(rootfs):
    r, w = os.pipe()
    holder = n.spawn(spec_for(rootfs, ["sh", "-c", "read x"], hostname="pod", stdin=r))
    os.close(r)
    try:
        ns = {k: f"/proc/{holder.pid}/ns/{k}" for k in ("net", "uts", "ipc", "pid")}
        ns["mnt"] = "new"
        d = probe(spec_for(rootfs, ["probe"], namespaces=ns))
        for k in ("net", "uts", "ipc", "pid"):
            assert d["ns"][k] == os.stat(ns[k]).st_ino, k
        assert d["hostname"] == "pod"
        assert d["pid"] != 1 and d["ppid"] == 0
        # exec into it: every namespace joined, no rootfs setup
        ns = {k: f"/proc/{holder.pid}/ns/{k}" for k in ("mnt", "net", "uts", "ipc", "pid",
                                                         "cgroup")}
        d = probe(n.SpawnSpec(argv=["probe"], env=["PATH=/bin"], namespaces=ns, cwd="/tmp",
                              cap_bounding=DEFAULT_CAPS, cap_effective=DEFAULT_CAPS,
                              cap_permitted=DEFAULT_CAPS))
        assert d["ns"]["mnt"] == os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino
        assert d["cwd"] == "/tmp"
        assert any(line.split()[4] == "/proc" for line in d["mounts"])
    finally:
        os.close(w)
        os.waitpid(holder.pid, 0)
        os.close(holder.pidfd)


def test_user_namespace_with_one_mapping(rootfs, tmp_path):
    # the namespace's root (uid 200000 outside) must be able to walk to the rootfs
    p = str(tmp_path)
    while p != "/":
        os.chmod(p, os.stat(p).st_mode | 0o111)
        p = os.path.dirname(p)
    # mount points must exist: the namespace's root cannot create them in a
    # rootfs owned by the host's root
    for d in ("proc", "sys", "dev"):
        os.makedirs(os.path.join(rootfs, d))
    ns = dict(ALL_NEW, user="new")
    d = probe(spec_for(rootfs, ["probe"], namespaces=ns, uid_map=(0, 200000, 65536),
                       gid_map=(0, 200000, 65536)))
    assert d["ns"]["user"] != host_ns("user")
    assert d["uid"] == [0, 0, 0]
    assert d["pid"] == 1
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"], namespaces=ns))
    assert ei.value.stage == "prepare"
    with pytest.raises(OSError) as ei:
        n.spawn(spec_for(rootfs, ["true"], namespaces=ns, uid_map=(1, 200000, 65536),
                         gid_map=(0, 200000, 65536)))
    assert ei.value.stage == "prepare" and ei.value.errno == errno.EINVAL


def test_pidfd_and_start_time(rootfs):
    r, w = os.pipe()
    res = n.spawn(spec_for(rootfs, ["sh", "-c", "read x"], stdin=r))
    os.close(r)
    with open(f"/proc/{res.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[19]) == res.start_time
    os.close(w)
    os.waitid(os.P_PIDFD, res.pidfd, os.WEXITED)
    os.close(res.pidfd)


# --- propagation (needs a mount namespace whose "/" is shared) ------------------------

PROPAGATION_SCRIPT = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from pycri import _native as n
import test_spawn as t

rootfs, tmp = sys.argv[2], sys.argv[3]
out = {}

def start(root_prop, prop, script, rootfs=rootfs):
    src = os.path.join(tmp, "src-" + prop)
    os.makedirs(src, exist_ok=True)
    inr, inw = os.pipe()
    outr, outw = os.pipe()
    spec = t.spec_for(rootfs, ["sh", "-c", script], root_propagation=root_prop,
                      binds=[n.BindMount(src, "/m", propagation=prop)],
                      cap_bounding=(1 << 41) - 1 & ~(1 << 24), cap_effective=(1 << 41) - 1 & ~(1 << 24),
                      cap_permitted=(1 << 41) - 1 & ~(1 << 24), stdin=inr, stdout=outw)
    res = n.spawn(spec)
    os.close(inr); os.close(outw)
    return src, res, os.fdopen(inw, "w"), os.fdopen(outr)

def finish(res, inw, outr):
    inw.write("go\n"); inw.close()
    text = outr.read(); outr.close()
    os.waitpid(res.pid, 0); os.close(res.pidfd)
    return text

for root_prop, prop in (("rslave", "rslave"), ("private", "private")):
    src, res, inw, outr = start(root_prop, prop, "read x; ls /m/sub")
    os.makedirs(os.path.join(src, "sub"), exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.path.join(src, "sub")], check=True)
    open(os.path.join(src, "sub", "seen"), "w").close()
    out[prop] = "seen" in finish(res, inw, outr)
    subprocess.run(["umount", os.path.join(src, "sub")], check=True)

# with an rshared root the mount holding the rootfs dir turns private in the
# container (pivot_root needs it, and the rootfs must not propagate out), so the
# rootfs lives on its own mount here, apart from the shared source
holder = os.path.join(tmp, "holder")
os.makedirs(holder)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", holder], check=True)
import shutil
shutil.copytree(rootfs, os.path.join(holder, "rootfs"), symlinks=True)
src, res, inw, outr = start("rshared", "rshared",
                            "mkdir -p /m/x && mount -t tmpfs tmpfs /m/x && touch /m/x/fromc && echo ready; read x",
                            rootfs=os.path.join(holder, "rootfs"))
ready = outr.readline().strip()
out["rshared"] = ready == "ready" and os.path.exists(os.path.join(src, "x", "fromc"))
finish(res, inw, outr)
subprocess.run(["umount", os.path.join(src, "x")], check=False)
out["rootfs_leaked"] = any(holder + "/rootfs" in line for line in open("/proc/self/mountinfo"))
print(json.dumps(out))
"""


def test_bind_propagation_rslave_private_rshared(rootfs, tmp_path):
    cmd = ["unshare", "-m", "--propagation", "unchanged", "sh", "-c",
           'mount --make-rshared / && exec "$@"', "sh", sys.executable, "-c",
           PROPAGATION_SCRIPT, os.path.dirname(HERE), rootfs, str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"rslave": True, "private": False, "rshared": True, "rootfs_leaked": False}


# --- exec into a running container, concurrency -----------------------------------------


def _holder(rootfs, **kw):
    r, w = os.pipe()
    res = n.spawn(spec_for(rootfs, ["sh", "-c", "read x"], stdin=r, **kw))
    os.close(r)
    return res, w


def _release(res, w):
    os.close(w)
    os.waitpid(res.pid, 0)
    os.close(res.pidfd)


def test_runtime_exe_unreachable_from_container_during_exec(rootfs):
    holder, hw = _holder(rootfs)
    ex = None
    try:
        ex = n.spawn(n.SpawnSpec(argv=["true"], env=["PATH=/bin"],
                                 namespaces=n.namespaces_of(holder.pid), start_wait=True))
        with open(f"/proc/{ex.pid}/status") as f:
            nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[-1]
        # container root with the default caps looks at the waiting exec process
        status, out = run(n.SpawnSpec(
            argv=["sh", "-c", (f"ls -d /proc/{nspid} && readlink /proc/{nspid}/exe; "
                               f"cat /proc/{nspid}/environ; echo end")],
            env=["PATH=/bin"], namespaces=n.namespaces_of(holder.pid), stderr=-1,
            cap_bounding=DEFAULT_CAPS, cap_effective=DEFAULT_CAPS, cap_permitted=DEFAULT_CAPS))
        assert status == 0
        assert f"/proc/{nspid}" in out
        assert "python" not in out and "PATH" not in out
        assert out.strip().endswith("end")
        n.spawn_start(ex)
    finally:
        if ex is not None:
            if ex.start_fd >= 0:
                os.close(ex.start_fd)
                os.close(ex.report_fd)
            os.waitpid(ex.pid, 0)
            os.close(ex.pidfd)
        _release(holder, hw)


def test_exec_joins_cgroup_through_the_intermediate(rootfs):
    base = "/sys/fs/cgroup/pids"
    if not os.path.isdir(base):
        pytest.skip("no v1 pids hierarchy")
    cg = tempfile.mkdtemp(prefix="pycri-spawn-test-", dir=base)
    holder, hw = _holder(rootfs, cgroup_procs=[os.path.join(cg, "cgroup.procs")])
    try:
        procs = n.cgroup_procs_of(holder.pid)
        assert os.path.join(cg, "cgroup.procs") in procs
        status, out = run(n.SpawnSpec(argv=["cat", "/proc/self/cgroup"], env=["PATH=/bin"],
                                      namespaces=n.namespaces_of(holder.pid),
                                      cgroup_procs=procs))
        assert status == 0
        # at the root of the holder's cgroup namespace, i.e. in the holder's cgroup
        # (from any other cgroup the path would start with "/..")
        assert ":pids:/\n" in out and "/.." not in out
    finally:
        _release(holder, hw)
        os.rmdir(cg)


def test_concurrent_spawn_not_blocked_by_a_waiting_one(rootfs):
    import threading

    waiting = n.spawn(spec_for(rootfs, ["true"], start_wait=True))
    try:
        results = []

        def worker():
            results.append(run(spec_for(rootfs, ["echo", "ok"])))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert [out for _, out in results] == ["ok\n"] * 4
    finally:
        n.spawn_start(waiting)
        os.waitpid(waiting.pid, 0)
        os.close(waiting.pidfd)


def test_join_net_only_keeps_host_pid_namespace(rootfs):
    holder, hw = _holder(rootfs)
    try:
        ns = {"net": f"/proc/{holder.pid}/ns/net", "mnt": "new", "uts": "new"}
        r, w = os.pipe()
        res = n.spawn(spec_for(rootfs, ["probe"], namespaces=ns, hostname="joined", stdout=w))
        os.close(w)
        with os.fdopen(r) as f:
            d = json.loads(f.read())
        assert os.waitid(os.P_PIDFD, res.pidfd, os.WEXITED).si_pid == res.pid
        os.close(res.pidfd)
        assert d["ns"]["net"] == os.stat(ns["net"]).st_ino
        assert d["ns"]["pid"] == host_ns("pid")
        assert d["pid"] == res.pid and d["hostname"] == "joined"
    finally:
        _release(holder, hw)


def test_seccomp_profile_compiled_with_libseccomp(rootfs):
    from pycri import seccomp

    prog = seccomp.compile_profile({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": errno.EACCES},
            # open(2)/openat(2) with O_CREAT refused by an argument rule
            {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
             "args": [{"index": 2, "value": os.O_CREAT, "valueTwo": os.O_CREAT,
                       "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
    })
    assert len(prog) % 8 == 0
    d = probe(spec_for(rootfs, ["probe", "d:/tmp/a", "w:/tmp/b", "r:/bin/busybox"],
                       no_new_privs=True, seccomp_bpf=prog))
    assert d["seccomp"] == 2
    assert d["checks"] == {"d:/tmp/a": errno.EACCES, "w:/tmp/b": errno.EROFS,
                           "r:/bin/busybox": 0}
    with pytest.raises(ValueError):
        seccomp.compile_profile({"defaultAction": "SCMP_ACT_NOPE"})


def test_user_namespace_with_overlay_rootfs(rootfs, tmp_path):
    p = str(tmp_path)
    while p != "/":
        os.chmod(p, os.stat(p).st_mode | 0o111)
        p = os.path.dirname(p)
    for d in ("proc", "sys", "dev"):
        os.makedirs(os.path.join(rootfs, d))
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, target):
        d.mkdir()
        os.chown(d, 200000, 200000)
    status, out = run(spec_for(str(target), ["sh", "-c", "echo hi > /x; id -u"],
                               overlay_lower=[rootfs], overlay_upper=str(upper),
                               overlay_work=str(work), namespaces=dict(ALL_NEW, user="new"),
                               uid_map=(0, 200000, 65536), gid_map=(0, 200000, 65536)))
    assert status == 0 and out.strip() == "0"
    assert os.stat(upper / "x").st_uid == 200000  # written as the mapped root


def test_join_pinned_namespace_file(rootfs, tmp_path):
    holder, hw = _holder(rootfs)
    pin = tmp_path / "netns"
    pin.touch()
    subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/ns/net", str(pin)], check=True)
    try:
        _release(holder, hw)  # the pinned file keeps the namespace alive
        d = probe(spec_for(rootfs, ["probe"], namespaces=dict(ALL_NEW, net=str(pin))))
        assert d["ns"]["net"] == os.stat(pin).st_ino
    finally:
        subprocess.run(["umount", str(pin)], check=True)


def test_sys_is_host_sysfs_read_only_with_host_network(rootfs):
    ns = {k: v for k, v in ALL_NEW.items() if k != "net"}
    d = probe(spec_for(rootfs, ["probe", "w:/sys/kernel/uevent_helper", "r:/sys/class/net/lo"],
                       namespaces=ns))
    sys_line = next(ln for ln in d["mounts"] if ln.split()[4] == "/sys")
    assert sys_line.split()[5].startswith("ro")
    assert d["checks"]["w:/sys/kernel/uevent_helper"] == errno.EROFS
    assert d["checks"]["r:/sys/class/net/lo"] == 0
    assert d["ns"]["net"] == host_ns("net")


def test_pod_shm_path_bound_at_dev_shm(rootfs, tmp_path):
    shm = tmp_path / "podshm"
    shm.mkdir()
    status, out = run(spec_for(rootfs, ["sh", "-c", "echo x > /dev/shm/seg && echo ok"],
                               shm_path=str(shm)))
    assert status == 0 and out.strip() == "ok"
    assert (shm / "seg").read_text() == "x\n"


def test_bind_target_symlinked_into_proc_is_refused(rootfs, tmp_path):
    os.symlink("/proc/sys/kernel", os.path.join(rootfs, "etc", "kern"))
    src = tmp_path / "f"
    src.write_text("x")
    with pytest.raises(PermissionError) as ei:
        n.spawn(spec_for(rootfs, ["true"], binds=[n.BindMount(str(src), "/etc/kern/core_pattern")]))
    assert ei.value.stage == "mount" and "/proc or /sys" in str(ei.value)


def test_no_fd_leak_in_the_caller(rootfs, tmp_path):
    def count():
        return len(os.listdir("/proc/self/fd"))

    run(spec_for(rootfs, ["true"]))  # warm up
    before = count()
    for _ in range(10):
        run(spec_for(rootfs, ["true"]))
        with pytest.raises(OSError):
            n.spawn(spec_for(rootfs, ["nope"]))
        with pytest.raises(OSError):
            n.spawn(spec_for(rootfs, ["true"], binds=[n.BindMount(str(tmp_path / "x"), "/x")]))
        res = n.spawn(spec_for(rootfs, ["true"], start_wait=True))
        n.spawn_start(res)
        os.waitpid(res.pid, 0)
        os.close(res.pidfd)
    assert count() == before


def test_exec_by_pidfd(rootfs):
    holder, hw = _holder(rootfs, hostname="viapidfd")
    try:
        every = {k: "pidfd" for k in n.NS_KINDS}
        d = probe(n.SpawnSpec(argv=["probe"], env=["PATH=/bin"], namespaces=every,
                              join_pidfd=holder.pidfd))
        assert d["hostname"] == "viapidfd"
        assert d["ns"]["mnt"] == os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino
    finally:
        _release(holder, hw)
    # the process is gone (and reaped): joining by its pidfd must fail, not guess
    dead = n.spawn(spec_for(rootfs, ["true"]))
    os.waitpid(dead.pid, 0)
    try:
        with pytest.raises(OSError) as ei:
            n.spawn(n.SpawnSpec(argv=["true"], namespaces={"net": "pidfd"},
                                join_pidfd=dead.pidfd))
        assert ei.value.stage == "prepare"
    finally:
        os.close(dead.pidfd)
