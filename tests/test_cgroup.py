# ruff: noqa: PLW1509  (preexec_fn: these tests start no threads)
"""Cgroups on the real kernel (root): limits land in the files, kill-all, OOM,
pids.max, all-or-nothing updates, hostile names; v2 policy on a fake v2 tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pycri import _native
from pycri.cgroup import (
    Cgroup,
    CgroupManager,
    DeviceRule,
    Hierarchy,
    Resources,
    hugepage_sizes,
    shares_to_weight,
    validate_cgroup_parent,
)
from pycri.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    RuntimeFailure,
    UnsupportedError,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

HIER = Hierarchy.detect()
V1 = HIER.version == 1


def _procs_join(cg: Cgroup) -> None:
    """preexec for Popen: join every hierarchy of cg before exec."""
    pid = str(os.getpid()).encode()
    for f in cg.procs_files():
        fd = os.open(f, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


@pytest.fixture
def mgr():
    m = CgroupManager("pycri-test-" + uuid.uuid4().hex[:8])
    yield m
    # Clean up everything below the test parent, whatever the test left.
    for root in sorted(set(list(m.hierarchy.v1.values()) + [m.hierarchy.v2_root or ""])):
        if not root:
            continue
        top = os.path.join(root, *m.parent)
        if os.path.isdir(top):
            cg = Cgroup(m.hierarchy, "/".join(m.parent))
            cg.kill(5)
    Cgroup(m.hierarchy, "/".join(m.parent)).remove(5)
    m.remove_parent()
    for root in list(m.hierarchy.v1.values()) + [m.hierarchy.v2_root or "/nonexistent"]:
        assert not os.path.exists(os.path.join(root, *m.parent))


@pytest.fixture
def pod(mgr):
    return mgr.create_pod("pod-" + uuid.uuid4().hex[:6])


def _ctr(mgr, pod, res=None):
    pod_id = pod.relpath.rsplit("/", 1)[1]
    return mgr.create_container(pod_id, "ctr-" + uuid.uuid4().hex[:6], res)


def test_detect_matches_mounts():
    with open("/proc/self/mountinfo") as f:
        text = f.read()
    if _native.cgroup_fstype("/sys/fs/cgroup") == _native.CGROUP_V2:
        assert HIER.version == 2
    else:
        assert HIER.version == 1
        for mnt in HIER.v1.values():
            assert f" {mnt} " in text
            assert _native.cgroup_fstype(mnt) == _native.CGROUP_V1


def test_create_and_remove(mgr, pod):
    ctr = _ctr(mgr, pod)
    assert all(os.path.isdir(d) for d in ctr.paths())
    assert all(os.path.exists(f) for f in ctr.procs_files())
    assert all(f.endswith("/cgroup.procs") and os.path.isabs(f) for f in ctr.procs_files())
    pod_id, ctr_id = ctr.relpath.split("/")[-2:]
    with pytest.raises(AlreadyExistsError):
        mgr.create_container(pod_id, ctr_id)
    ctr.remove()
    assert not any(os.path.exists(d) for d in ctr.paths())
    pod.remove()
    assert not pod.exists()


def test_limits_are_written(mgr, pod):
    res = Resources(cpu_shares=256, cpu_quota=50000, cpu_period=100000, cpuset_cpus="0",
                    memory_limit_in_bytes=64 << 20, memory_swap_limit_in_bytes=64 << 20,
                    pids_limit=42)
    ctr = _ctr(mgr, pod, res)
    if V1:
        assert ctr.read("cpu", "cpu.shares").strip() == "256"
        assert ctr.read("cpu", "cpu.cfs_quota_us").strip() == "50000"
        assert ctr.read("cpu", "cpu.cfs_period_us").strip() == "100000"
        assert ctr.read("memory", "memory.limit_in_bytes").strip() == str(64 << 20)
        if os.path.exists(os.path.join(ctr.dirs["memory"], "memory.memsw.limit_in_bytes")):
            assert ctr.read("memory", "memory.memsw.limit_in_bytes").strip() == str(64 << 20)
        devs = ctr.read("devices", "devices.list").split("\n")
        assert "c 1:3 rwm" in devs and "c 136:* rwm" in devs and "a *:* rwm" not in devs
    else:
        assert ctr.read("cpu", "cpu.weight").strip() == str(shares_to_weight(256))
        assert ctr.read("cpu", "cpu.max").strip() == "50000 100000"
        assert ctr.read("memory", "memory.max").strip() == str(64 << 20)
    assert ctr.read("cpuset", "cpuset.cpus").strip() == "0"
    assert ctr.read("pids", "pids.max").strip() == "42"


def test_failed_create_leaves_nothing(mgr, pod):
    pod_id = pod.relpath.rsplit("/", 1)[1]
    with pytest.raises(InvalidArgumentError):
        # Refused by the kernel after the directories were made.
        mgr.create_container(pod_id, "bad", Resources(cpuset_cpus="999"))
    assert not mgr.container(pod_id, "bad").exists()


def test_device_rules_v1(mgr, pod):
    if not V1:
        pytest.skip("v1 device rules")
    ctr = _ctr(mgr, pod, Resources(devices=(DeviceRule(True, "c", 10, 200, "rw"),)))
    devs = ctr.read("devices", "devices.list").split("\n")
    assert "c 10:200 rw" in devs


def test_hugepages(mgr, pod):
    sizes = hugepage_sizes()
    if not sizes:
        pytest.skip("no huge pages on this host")
    size = "2MB" if "2MB" in sizes else sizes[0]
    n = int(size[:-2]) << (20 if size.endswith("MB") else 30 if size.endswith("GB") else 10)
    ctr = _ctr(mgr, pod, Resources(hugepage_limits={size: 2 * n}))
    if HIER.version == 2 or "hugetlb" in HIER.v2_only:
        assert ctr.read("hugetlb", f"hugetlb.{size}.max").strip() == str(2 * n)
        assert os.path.join(HIER.v2_root, ctr.relpath, "cgroup.procs") in ctr.procs_files()
    else:
        assert ctr.read("hugetlb", f"hugetlb.{size}.limit_in_bytes").strip() == str(2 * n)
    with pytest.raises(InvalidArgumentError):
        ctr.update(Resources(hugepage_limits={"3MB": 1 << 20}))
    with pytest.raises(InvalidArgumentError):
        Resources(hugepage_limits={"../x": 1})


def test_cpuset_parents_populated(mgr, pod):
    if not V1:
        pytest.skip("v1 cpuset inheritance")
    ctr = _ctr(mgr, pod)
    with open(os.path.join(HIER.v1["cpuset"], "cpuset.cpus")) as f:
        parent_cpus = f.read().strip()
    got = ctr.read("cpuset", "cpuset.cpus").strip()
    assert got
    if parent_cpus:
        assert got == parent_cpus
    assert ctr.read("cpuset", "cpuset.mems").strip()


def test_kill_all(mgr, pod):
    ctr = _ctr(mgr, pod)
    # A shell with a child of its own: both must die.
    p = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300; wait"],
                         preexec_fn=lambda: _procs_join(ctr))
    deadline = time.monotonic() + 5
    while len(ctr.pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(ctr.pids()) >= 2
    assert ctr.kill(5) >= 1
    assert p.wait(5) == -signal.SIGKILL
    assert ctr.pids() == []
    ctr.remove()
    assert not ctr.exists()


def test_oom_kill_detected(mgr, pod):
    ctr = _ctr(mgr, pod, Resources(memory_limit_in_bytes=32 << 20,
                                   memory_swap_limit_in_bytes=32 << 20))
    hog = "b=[]\nwhile True: b.append(bytearray(1 << 20))"
    p = subprocess.Popen([sys.executable, "-c", hog], preexec_fn=lambda: _procs_join(ctr),
                         stderr=subprocess.DEVNULL)
    assert p.wait(60) == -signal.SIGKILL
    st = ctr.stats()
    assert st.oom_kill_count >= 1
    ctr.remove()


def test_fork_bomb_stops_at_pids_max(mgr, pod):
    ctr = _ctr(mgr, pod, Resources(pids_limit=8))
    # A bounded fork loop: children sleep, the parent counts refused forks.
    code = ("import os, time\n"
            "ok = bad = 0\n"
            "for _ in range(40):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(30); os._exit(0)\n"
            "        ok += 1\n"
            "    except OSError:\n"
            "        bad += 1\n"
            "print(ok, bad, flush=True)\n"
            "time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: _procs_join(ctr),
                         stdout=subprocess.PIPE)
    line = p.stdout.readline().split()
    assert [int(x) for x in line] == [7, 33]
    assert ctr.stats().pids_current == 8
    assert len(ctr.pids()) == 8
    assert _kv_events(ctr.read("pids", "pids.events")).get("max", 0) >= 33
    ctr.kill(5)
    assert p.wait(10) == -signal.SIGKILL
    p.stdout.close()
    assert ctr.pids() == []
    ctr.remove()


def _kv_events(text):
    return {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.strip())}


def test_stats_cpu_and_memory(mgr, pod):
    ctr = _ctr(mgr, pod)
    code = "b=bytearray(8<<20)\nimport time\nwhile time.process_time()<0.3: pass\n" \
           "print('x', flush=True)\ntime.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: _procs_join(ctr),
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"x\n"
    st = ctr.stats()
    assert st.cpu_usage_ns > 100_000_000
    assert st.memory_usage_bytes >= 8 << 20
    assert 0 < st.memory_working_set_bytes <= st.memory_usage_bytes
    assert st.pids_current == 1
    ctr.kill(5)
    p.wait(5)
    p.stdout.close()


def test_update_all_or_nothing(mgr, pod):
    ctr = _ctr(mgr, pod, Resources(cpu_shares=300, pids_limit=50, memory_limit_in_bytes=64 << 20))
    # cpu goes first, then an impossible cpuset that the kernel refuses mid-way.
    bad = Resources(cpu_shares=700, cpuset_cpus="999", pids_limit=60,
                    memory_limit_in_bytes=128 << 20)
    with pytest.raises(InvalidArgumentError):
        ctr.update(bad)
    if V1:
        assert ctr.read("cpu", "cpu.shares").strip() == "300"
        assert ctr.read("memory", "memory.limit_in_bytes").strip() == str(64 << 20)
    assert ctr.read("pids", "pids.max").strip() == "50"
    assert ctr.read("cpuset", "cpuset.cpus").strip() != "999"
    ctr.update(Resources(cpu_shares=700, pids_limit=60, memory_limit_in_bytes=128 << 20,
                         memory_swap_limit_in_bytes=256 << 20))
    if V1:
        assert ctr.read("cpu", "cpu.shares").strip() == "700"
        assert ctr.read("memory", "memory.limit_in_bytes").strip() == str(128 << 20)
    assert ctr.read("pids", "pids.max").strip() == "60"
    # Lowering memory below the current memsw works too (ordering).
    ctr.update(Resources(memory_limit_in_bytes=32 << 20, memory_swap_limit_in_bytes=32 << 20))
    if V1:
        assert ctr.read("memory", "memory.limit_in_bytes").strip() == str(32 << 20)


@pytest.mark.parametrize("parent", ["..", "a/../b", "../etc", "a//b", "a/", "/", "", "a/./b",
                                    "a\nb", "a\0b", "a b", "x" * 256, "/../x"])
def test_hostile_cgroup_parent(parent):
    with pytest.raises(InvalidArgumentError):
        validate_cgroup_parent(parent)
    with pytest.raises(InvalidArgumentError):
        CgroupManager(parent, hierarchy=HIER)


def test_good_cgroup_parent():
    assert validate_cgroup_parent("/kubepods/burstable") == ("kubepods", "burstable")
    assert validate_cgroup_parent("pycri") == ("pycri",)


@pytest.mark.parametrize("pod_id", ["..", ".", "a/b", "", "a\n"])
def test_hostile_ids(mgr, pod_id):
    with pytest.raises(InvalidArgumentError):
        mgr.create_pod(pod_id)


@pytest.mark.parametrize("key", ["../cgroup.procs", "a/b", "..", "/etc/passwd", "cgroup.procs",
                                 "cgroup.kill", "", "memory.max\n", "cgroup.subtree_control"])
def test_hostile_unified_keys(key):
    with pytest.raises(InvalidArgumentError):
        Resources(unified={key: "1"})


def test_unified_values_and_v1_refusal(mgr, pod):
    with pytest.raises(InvalidArgumentError):
        Resources(unified={"memory.high": "1\n2"})
    if V1:
        ctr = _ctr(mgr, pod)
        with pytest.raises(InvalidArgumentError, match="v2"):
            ctr.update(Resources(unified={"memory.high": "100000000"}))


def test_c_write_cannot_escape(mgr, pod):
    ctr = _ctr(mgr, pod)
    d = ctr.paths()[0]
    fd = _native.cgroup_open(d)
    try:
        for name in ("../cgroup.procs", "/sys/fs/cgroup/cgroup.procs", "../../tasks"):
            with pytest.raises(OSError):
                _native.cgroup_write(fd, name, str(os.getpid()))
        with pytest.raises(OSError):
            _native.cgroup_read(fd, "../cgroup.procs")
    finally:
        os.close(fd)
    assert os.getpid() not in ctr.pids()


@pytest.mark.parametrize("kw", [{"cpu_shares": 1}, {"cpu_shares": 300000}, {"cpu_quota": 5},
                                {"cpuset_cpus": "0;1"}, {"memory_limit_in_bytes": -5},
                                {"pids_limit": "10"}, {"cpu_period": 10 ** 7}])
def test_resources_validation(kw):
    with pytest.raises(InvalidArgumentError):
        Resources(**kw)


# --- v2 policy on a temp dir laid out like a cgroup2 tree -----------------------


V2_FILES = {
    "cgroup.controllers": "cpuset cpu io memory hugetlb pids\n",
    "cgroup.subtree_control": "\n",
    "cgroup.procs": "",
    "cpu.weight": "100\n",
    "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
    "cpuset.cpus": "\n",
    "cpuset.mems": "\n",
    "memory.max": "max\n",
    "memory.swap.max": "max\n",
    "memory.high": "max\n",
    "memory.current": "10485760\n",
    "memory.stat": "anon 1000\ninactive_file 4194304\nactive_file 0\n",
    "memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
    "pids.max": "max\n",
    "pids.current": "3\n",
    "hugetlb.2MB.max": "max\n",
}


class FakeV2Manager(CgroupManager):
    """Files only: mkdir also lays down the files a cgroup2 dir would hold."""

    def _mkdir_leaves(self, items, created):  # type: ignore[no-untyped-def]
        return items    # (every dir through _mkdirs below, which lays the files down)

    def _mkdirs(self, key, leaf, created, devices=False):  # type: ignore[no-untyped-def]
        root = self.hierarchy.v2_root
        cur = root
        for part in os.path.relpath(leaf, root).split("/"):
            self._enable_v2(cur)
            cur = os.path.join(cur, part)
            if not os.path.isdir(cur):
                os.mkdir(cur)
                created.append(cur)
                _layout(cur)


def _layout(d):
    for name, text in V2_FILES.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


@pytest.fixture
def fake_v2(tmp_path):
    root = str(tmp_path / "cg")
    os.mkdir(root)
    _layout(root)
    h = Hierarchy(2, {}, root, frozenset())
    return FakeV2Manager("pycri", hierarchy=h), root


def test_v2_writes(fake_v2, monkeypatch):
    m, root = fake_v2
    monkeypatch.setattr("pycri.cgroup.hugepage_sizes", lambda: ["1GB", "2MB"])
    m.create_pod("p")
    res = Resources(cpu_shares=1024, cpu_quota=20000, cpu_period=50000, cpuset_cpus="0-1",
                    memory_limit_in_bytes=100 << 20, memory_swap_limit_in_bytes=150 << 20,
                    pids_limit=9, hugepage_limits={"2MB": 2 << 20},
                    unified={"memory.high": "90000000"})
    ctr = m.create_container("p", "c", res)
    d = os.path.join(root, "pycri", "p", "c")
    assert ctr.paths() == [d]
    assert ctr.procs_files() == [os.path.join(d, "cgroup.procs")]

    def rd(name):
        with open(os.path.join(d, name)) as f:
            return f.read()

    assert rd("cpu.weight") == str(shares_to_weight(1024)) == "39"
    assert rd("cpu.max") == "20000 50000"
    assert rd("cpuset.cpus") == "0-1"
    assert rd("memory.max") == str(100 << 20)
    assert rd("memory.swap.max") == str(50 << 20)
    assert rd("pids.max") == "9"
    assert rd("hugetlb.2MB.max") == str(2 << 20)
    assert rd("memory.high") == "90000000"
    # Controllers enabled down the path (root and each level above the leaf).
    with open(os.path.join(root, "cgroup.subtree_control")) as f:
        assert f.read() == "+cpu +cpuset +memory +pids +io +hugetlb"
    st = ctr.stats()
    assert st.cpu_usage_ns == 1_500_000
    assert st.memory_usage_bytes == 10485760
    assert st.memory_working_set_bytes == 10485760 - 4194304
    assert st.oom_kill_count == 2
    assert st.pids_current == 3


def test_v2_weight_formula():
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(1024) == 39


def test_v2_unified_key_must_exist(fake_v2):
    m, root = fake_v2
    m.create_pod("p")
    ctr = m.create_container("p", "c")
    with pytest.raises(InvalidArgumentError, match="not a file"):
        ctr.update(Resources(unified={"memory.nonexistent": "1"}))
    # A symlink planted in the dir is not followed by the C write either.
    os.symlink("/etc/passwd", os.path.join(root, "pycri", "p", "c", "memory.evil"))
    with pytest.raises((RuntimeFailure, InvalidArgumentError)):
        ctr.update(Resources(unified={"memory.evil": "x"}))
    with open("/etc/passwd") as f:
        assert "x" != f.read()


def test_v2_no_devices_and_unsupported(fake_v2):
    m, _root = fake_v2
    m.create_pod("p")
    # Device rules are a documented no-op on v2 (they need eBPF).
    ctr = m.create_container("p", "c", Resources(devices=(DeviceRule(True, "c", 1, 3, "r"),)))
    assert not os.path.exists(os.path.join(ctr.paths()[0], "devices.allow"))


def test_missing_controller_is_unsupported(tmp_path):
    h = Hierarchy(1, {"cpu": str(tmp_path)}, None, frozenset())
    cg = Cgroup(h, "x")
    os.mkdir(os.path.join(str(tmp_path), "x"))
    with pytest.raises(UnsupportedError):
        cg.update(Resources(pids_limit=5))


# --- v2 mechanics on the host's real cgroup2 mount (hybrid hosts have one) ------


def _unified_mount():
    if HIER.version == 2:
        return HIER.v2_root
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split()[0] == "cgroup2":
                return pre.split()[4]
    return None


@pytest.fixture
def real_v2():
    root = _unified_mount()
    if root is None:
        pytest.skip("no cgroup2 mount")
    m = CgroupManager("pycri-test-" + uuid.uuid4().hex[:8], hierarchy=Hierarchy(2, {}, root))
    yield m
    top = Cgroup(m.hierarchy, "/".join(m.parent))
    if top.exists():
        top.kill(5)
        top.remove(5)
    m.remove_parent()
    assert not os.path.exists(os.path.join(root, *m.parent))


def test_real_v2_kill_stats_remove(real_v2):
    m = real_v2
    m.create_pod("p")
    ctr = m.create_container("p", "c")
    assert ctr.procs_files() == [os.path.join(m.hierarchy.v2_root, *m.parent, "p", "c",
                                              "cgroup.procs")]
    code = "import time\nwhile time.process_time()<0.2: pass\nprint(1, flush=True)\n" \
           "import os\nos.fork(); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: _procs_join(ctr),
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"1\n"
    deadline = time.monotonic() + 5
    while len(ctr.pids()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert ctr.stats().cpu_usage_ns >= 100_000_000
    ctr.kill(5)  # cgroup.kill: parent and forked child both
    assert p.wait(5) == -signal.SIGKILL
    p.stdout.close()
    assert ctr.pids() == []
    ctr.remove()
    m.pod("p").remove()
    assert not m.pod("p").exists()


def test_real_v2_missing_controller_is_unsupported(real_v2):
    m = real_v2
    m.create_pod("p")
    with open(os.path.join(m.hierarchy.v2_root, "cgroup.controllers")) as f:
        avail = f.read().split()
    if "pids" in avail:
        pytest.skip("pids controller is available in this v2 mount")
    with pytest.raises(UnsupportedError, match="pids"):
        m.create_container("p", "c", Resources(pids_limit=5))
    assert not m.container("p", "c").exists()
