"""Containers end to end: real images, namespaces, cgroups, the C monitor.

Every probe runs inside a real container; a tiny static probe (tests/probe.c)
reports what the process sees.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import imagebuild as ib
import pycri
from pycri.container import DEFAULT_CAPS, cap_mask
from pycri.errors import InvalidArgumentError, InvalidStateError, NotFoundError, RuntimeFailure

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def probe_image(registry):
    d = tempfile.mkdtemp(prefix="pycri-probe-")
    probe = os.path.join(d, "probe")
    subprocess.run(["gcc", "-static", "-O2", "-o", probe, os.path.join(HERE, "probe.c")],
                   check=True)
    with open(probe, "rb") as f:
        probe_layer = ib.layer_tar([ib.File("bin/probe", f.read(), mode=0o755)])
    shutil.rmtree(d)
    built = ib.build_image([ib.busybox_layer(), probe_layer],
                           config={"Cmd": ["sh"], "Env": ["PATH=/bin", "FROM_IMAGE=1"]})
    ib.push(registry.host, "test/probe", "v1", built)
    return f"{registry.host}/test/probe:v1"


@pytest.fixture
def env(probe_image):
    """A Runtime on short temp dirs (unix socket paths are limited), a cgroup parent
    of its own, the probe image pulled, and a checker that nothing is left behind."""
    base = tempfile.mkdtemp(prefix="pycri-", dir="/tmp")
    os.chmod(base, 0o711)  # as /var/lib is: user-namespaced containers' roots traverse it
    parent = "pycri-test-" + uuid.uuid4().hex[:8]
    rt = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    img = rt.images.pull(probe_image)
    yield rt, img
    for sb in rt.sandboxes():
        sb.remove()
    assert not [line for line in open("/proc/self/mountinfo") if base in line]
    assert not any(os.path.exists(f"/sys/fs/cgroup/{c}/{parent}/") and
                   os.listdir(f"/sys/fs/cgroup/{c}/{parent}/") != []
                   and any(os.path.isdir(os.path.join(f"/sys/fs/cgroup/{c}/{parent}", x))
                           for x in os.listdir(f"/sys/fs/cgroup/{c}/{parent}"))
                   for c in ("memory", "pids"))
    rt.cgroups().remove_parent()
    # the trash thread's work for this root first (it may make a spare dir), then
    # this process's spares of it (their overlays)
    assert pycri.store.Trash.drain(10)
    pycri.slots.drop_spares(rt.root)
    shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(base)


def probe(sb, img, *checks, **config):
    r = sb.run(img, ["probe", *checks], timeout=20, **config)
    assert r.exit_code == 0, r
    return json.loads(r.stdout)


def test_run_output_exit_code_and_timeout(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="run")) as sb:
        r = sb.run(img, ["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        assert not r.oom_killed and not r.timed_out
        r = sb.run(img, ["sleep", "100"], timeout=0.5)
        assert r.timed_out and r.exit_code == 137
        assert sb.containers() == []


def test_isolation_seen_from_inside(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="iso", hostname="isohost")) as sb:
        p = probe(sb, img, "r:/proc/kcore", "w:/proc/sys/kernel/hostname", "d:/newdir")
        assert p["pid"] == 1 and p["hostname"] == "isohost"
        assert p["uid"] == [0, 0, 0] and p["gid"] == [0, 0, 0]
        assert sorted(p["fds"]) == [0, 1, 2]  # nothing of the runtime leaks in
        assert int(p["CapEff"], 16) == cap_mask(DEFAULT_CAPS)
        assert int(p["CapBnd"], 16) == cap_mask(DEFAULT_CAPS)
        assert p["seccomp"] == 2  # RuntimeDefault is on by default
        assert p["checks"]["r:/proc/kcore"] != 0  # masked
        assert p["checks"]["w:/proc/sys/kernel/hostname"] != 0  # read-only
        assert p["checks"]["d:/newdir"] == 0  # the writable layer works
        host_ns = {k: os.stat(f"/proc/self/ns/{k}").st_ino for k in ("mnt", "pid", "net", "uts")}
        for k, v in host_ns.items():
            assert p["ns"][k] != v, k
        assert p["ns"]["net"] == os.stat(sb.ns_path("net")).st_ino  # the pod's network


def test_user_caps_nnp_and_groups(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="users")) as sb:
        p = probe(sb, img, run_as_user=1000, run_as_group=2000, supplemental_groups=(3000,),
                  cap_drop=("ALL",), no_new_privs=True)
        assert p["uid"] == [1000] * 3 and p["gid"] == [2000] * 3
        assert 3000 in p["groups"]
        assert int(p["CapEff"], 16) == 0 and int(p["CapBnd"], 16) == 0
        assert p["no_new_privs"] == 1
        p = probe(sb, img, run_as_username="app")
        assert p["uid"][0] == 1000
        with pytest.raises(InvalidArgumentError, match="nosuchuser"):
            sb.run(img, ["probe"], run_as_username="nosuchuser")
        p = probe(sb, img, cap_add=("SYS_ADMIN",), seccomp="Unconfined")
        assert int(p["CapEff"], 16) & (1 << 21) and p["seccomp"] == 0


def test_lifecycle_exec_stop_remove(env):
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="life"))
    c = sb.create_container(pycri.ContainerConfig(name="web", image=img.id,
                                                  command=("sh", "-c", "echo started; sleep 60"),
                                                  labels={"tier": "web"}))
    assert c.state == "created"
    with pytest.raises(InvalidStateError):
        c.exec_sync(["true"])
    with pytest.raises(pycri.AlreadyExistsError):
        sb.create_container(pycri.ContainerConfig(name="web", image=img.id, command=("true",)))
    c.start()
    with pytest.raises(InvalidStateError):
        c.start()
    st = c.status()
    assert st.state == "running" and st.pid > 0 and st.image_ref == img.id
    r = c.exec_sync(["sh", "-c", "cat /etc/hostname; echo $FROM_IMAGE; exit 4"])
    assert r.exit_code == 4 and r.stdout == b"life\n1\n"
    r = c.exec_sync(["sh", "-c", "yes | head -c 3000000"], output_limit=1000)
    assert len(r.stdout) == 1000
    r = c.exec_sync(["sleep", "30"], timeout=0.3)
    assert r.timed_out
    assert [x.id for x in rt.containers(labels={"tier": "web"})] == [c.id]
    assert rt.containers(state="exited") == []
    deadline = time.monotonic() + 5
    while not any(rec.content == b"started" for rec in c.logs()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.stop(timeout=1)
    st = c.status()
    assert st.state == "exited" and st.exit_code == 137 and st.finished_at_ns >= st.started_at_ns
    assert rt.cgroups().container(sb.id, c.id).pids() == []
    exit_file = os.path.join(c.record_dir, "exit.json")
    assert os.path.exists(exit_file)    # the monitor's account, in the persistent root
    c.remove()
    c.remove()  # idempotent
    with pytest.raises(NotFoundError):
        rt.container(c.id)
    assert not os.path.exists(c.record_dir) and not os.path.exists(c.state_dir)
    assert rt.trash.drain(10) and rt.state_trash.drain(10)
    assert os.listdir(rt.trash.dir) == [] and os.listdir(rt.state_trash.dir) == []
    sb.remove()


def test_container_survives_its_creator(env):
    """The Python process that started a container dies; the monitor keeps the
    container and records its end; a new Runtime reads it."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="survive"))
    script = f"""
import sys; sys.path.insert(0, {TREE!r})
import pycri, os, signal
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
sb = rt.sandbox({sb.id!r})
c = sb.create_container(pycri.ContainerConfig(name="bg", image={img.id!r},
    command=("sh", "-c", "sleep 1; echo finished; exit 7")))
c.start()
print(c.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    cid = out.stdout.strip()
    assert out.returncode == -9 and cid
    rt2 = pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    c = rt2.container(cid)
    assert c.wait(timeout=20) == 7
    assert c.status().reason == "Error"
    assert [r.content for r in c.logs()] == [b"finished"]


def test_running_container_found_by_new_runtime(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="restart")) as sb:
        c = sb.create_container(pycri.ContainerConfig(name="s", image=img.id,
                                                      command=("sleep", "60")))
        c.start()
        rt2 = pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
        c2 = rt2.container(c.id)
        assert c2.state == "running"
        assert c2.exec_sync(["echo", "again"]).stdout == b"again\n"
        c2.kill(signal.SIGKILL)
        assert c2.wait(10) == 137


def test_memory_limit_oom_killed(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="oom")) as sb:
        res = pycri.Resources(memory_limit_in_bytes=16 << 20, memory_swap_limit_in_bytes=16 << 20)
        # busybox sh grows a string until the cgroup's limit kills it
        r = sb.run(img, ["sh", "-c", "x=aaaaaaaaaaaaaaaa; while true; do x=$x$x; done"],
                   timeout=30, resources=res)
        assert r.oom_killed and r.exit_code == 137


def test_pids_limit(env):
    """A fork loop stops at the pids limit: the kernel refuses the 11th process."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pids")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="bomb", image=img.id, resources=pycri.Resources(pids_limit=10),
            command=("sh", "-c", "for i in $(seq 40); do sleep 30 & done; wait")))
        c.start()
        cg = rt.cgroups().container(sb.id, c.id)
        deadline = time.monotonic() + 10
        while "max 0" in cg.read("pids", "pids.events"):
            assert time.monotonic() < deadline, "no fork was ever refused"
            time.sleep(0.05)
        assert cg.read("pids", "pids.max").strip() == "10"
        assert len(cg.pids()) <= 10
        c.wait(10)
        assert any(r.stream == "stderr" and b"fork" in r.content for r in c.logs())
        c.remove()


def test_bind_mounts(env, tmp_path):
    rt, img = env
    host = tmp_path / "share"
    host.mkdir()
    (host / "hello").write_text("from host")
    with rt.run_sandbox(pycri.SandboxConfig(name="mounts")) as sb:
        r = sb.run(img, ["sh", "-c", "cat /data/hello; touch /data/x"], timeout=10,
                   mounts=(pycri.Mount("/data", str(host), readonly=True),))
        assert r.stdout == b"from host" and r.exit_code != 0 and b"Read-only" in r.stderr
        r = sb.run(img, ["sh", "-c", "echo hi > /data/x"], timeout=10,
                   mounts=(pycri.Mount("/data", str(host)),))
        assert r.exit_code == 0 and (host / "x").read_text() == "hi\n"
        with pytest.raises(RuntimeFailure):
            sb.run(img, ["true"], mounts=(pycri.Mount("/data", str(tmp_path / "missing")),))
        assert sb.containers() == []  # the failed create left nothing


def test_missing_executable_fails_create(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="noexec")) as sb:
        with pytest.raises(RuntimeFailure, match="/no/such/binary") as ei:
            sb.create_container(pycri.ContainerConfig(name="x", image=img.id,
                                                      command=("/no/such/binary",)))
        assert ei.value.stage == "exec"
        assert sb.containers() == []
        assert rt.cgroups().pod(sb.id).exists()
        # (a slot's cgroup, made ahead of need, may be there: nothing else)
        assert _container_cgroups(rt, sb) <= _slot_ids(rt)


def test_update_resources_and_stats(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="upd")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="s", image=img.id, command=("sh", "-c", "dd if=/dev/zero of=/f bs=1k count=64; sleep 60"),
            resources=pycri.Resources(memory_limit_in_bytes=64 << 20)))
        c.start()
        cg = rt.cgroups().container(sb.id, c.id)
        assert cg.read("memory", "memory.limit_in_bytes").strip() == str(64 << 20)
        c.update_resources(pycri.Resources(memory_limit_in_bytes=96 << 20))
        assert cg.read("memory", "memory.limit_in_bytes").strip() == str(96 << 20)
        deadline = time.monotonic() + 5
        while c.stats().writable_layer_bytes < 64 << 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = c.stats()
        assert st.pids >= 1 and st.memory_usage_bytes > 0
        pod = sb.stats()  # read after: CPU time only grows, and the pod's includes the container's
        assert pod.cpu_usage_ns >= st.cpu_usage_ns and pod.pids_current >= 1
        assert pod.memory_usage_bytes > 0
        c.stop(timeout=0)


def _read_all(fd, limit=1 << 20):
    out = b""
    while True:
        try:
            b = os.read(fd, 65536)
        except OSError:  # a pty master reports EIO once the other side is gone
            break
        if not b:
            break
        out += b
        if len(out) > limit:
            break
    return out


def test_exec_streams_stdin_and_tty(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="streams")) as sb:
        c = sb.create_container(pycri.ContainerConfig(name="s", image=img.id,
                                                      command=("sleep", "60")))
        c.start()
        p = c.exec(["cat"], stdin=True)
        os.write(p.stdin, b"hello through stdin\n")
        p.close_stdin()
        assert _read_all(p.stdout) == b"hello through stdin\n"
        assert p.wait() == 0
        p.close()
        p = c.exec(["sh", "-c", "sleep 0.3; stty size; tty"], tty=True)
        p.resize(33, 101)
        out = _read_all(p.pty)
        assert b"33 101" in out and b"/dev/pts/" in out
        assert p.wait() == 0
        p.close()
        c.stop(timeout=0)


def test_pod_shares_dev_shm(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="shm")) as sb:
        r = sb.run(img, ["sh", "-c", "echo shared > /dev/shm/x; grep -c ' /dev/shm ' /proc/mounts"],
                   timeout=10)
        assert r.exit_code == 0
        r = sb.run(img, ["cat", "/dev/shm/x"], timeout=10)
        assert r.stdout == b"shared\n"
    with rt.run_sandbox(pycri.SandboxConfig(name="shm2")) as other:
        r = other.run(img, ["ls", "/dev/shm"], timeout=10)
        assert r.stdout == b""  # another pod does not see it


def test_log_rotation_and_stop_kills_every_process(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="rot", pid="node")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="s", image=img.id, pid="node",
            command=("sh", "-c", "sleep 300 & i=0; while true; do echo line$i; i=$((i+1)); "
                                 "sleep 0.05; done")))
        c.start()
        time.sleep(0.3)
        os.rename(c.log_path, c.log_path + ".1")
        c.reopen_log()
        deadline = time.monotonic() + 5
        while not os.path.exists(c.log_path) or not c.logs():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.logs()[0].content.startswith(b"line")
        cg = rt.cgroups().container(sb.id, c.id)
        assert len(cg.pids()) >= 2
        c.stop(timeout=1)
        assert cg.pids() == []  # the background sleep went too


CRASH_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tree!r})
import pycri
from pycri import _native, container, store
phase = {phase!r}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(obj, name, before=False):
    real = getattr(obj, name)
    def hook(*a, **kw):
        if before:
            die()
        r = real(*a, **kw)
        die()
        return r
    setattr(obj, name, hook)

if phase == "create-before-launch":
    wrap(container.Container, "_launch", before=True)
elif phase == "create-after-launch":
    wrap(_native, "launch")
elif phase == "create-at-pid":   # the pids recorded, the process still setting up
    real_write = container.Container._write
    def write_then_die(self, rec):
        real_write(self, rec)
        if "pid" in rec:
            die()
    container.Container._write = write_then_die
elif phase == "start-after-release":
    wrap(_native, "launch_start")
elif phase == "remove-after-cgroup":
    wrap(store.Trash, "put", before=True)  # the cgroup is gone, the files not yet
rt = pycri.Runtime(root={root!r}, state={state!r}, cgroup_parent={parent!r})
sb = rt.sandbox({sb!r})
if phase.startswith("create"):
    sb.create_container(pycri.ContainerConfig(name="crash", image={img!r},
                                              command=("sleep", "300")))
else:
    c = rt.container({cid!r})
    if phase.startswith("start"):
        c.start()
    else:
        c.remove()
"""


@pytest.mark.parametrize("phase", ["create-before-launch", "create-at-pid",
                                   "create-after-launch",
                                   "start-after-release", "remove-after-cgroup"])
def test_kill9_during_operations_then_recover(env, phase):
    """SIGKILL the Python process in the middle of an operation; a new Runtime shows a
    consistent state, and remove leaves no process, cgroup, mount or file behind."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="crash-" + phase.split("-")[0]))
    cid = ""
    if not phase.startswith("create"):
        c = sb.create_container(pycri.ContainerConfig(name="crash", image=img.id,
                                                      command=("sleep", "300")))
        cid = c.id
        if phase.startswith("remove"):
            c.start()
    script = CRASH_SCRIPT.format(tree=TREE, phase=phase, root=rt.root, state=rt.state,
                                 parent=rt.cgroup_parent, sb=sb.id, img=img.id, cid=cid)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    rt2 = pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    cs = rt2.containers(sandbox_id=sb.id)
    if phase == "create-before-launch":
        assert cs == []  # nothing was made that needs keeping
    elif phase in ("create-at-pid", "create-after-launch"):
        # the record had the process's pids before the creator died: the container
        # is created, held before execve, and a new Runtime can start it
        assert [c.state for c in cs] == ["created"]
        cs[0].start()
        assert cs[0].exec_sync(["echo", "alive"]).stdout == b"alive\n"
    elif phase == "start-after-release":
        assert [c.state for c in cs] == ["running"]
        assert cs[0].exec_sync(["echo", "alive"]).stdout == b"alive\n"
    for c in cs:
        c.remove()
    assert rt2.containers(sandbox_id=sb.id) == []
    # the crashed process's slot went with it (rt2 deleted it); ours may be there;
    # an exited container's empty cgroup goes just after its remove returns
    assert pycri.store.Trash.drain(5)
    assert _container_cgroups(rt, sb) <= _slot_ids(rt)
    assert all(n.startswith(f"{os.getpid()}.") for n in _slot_names(rt))
    time.sleep(0.2)  # the launcher of a held process exits when that process dies
    out = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout
    ours = [p for p in out.split() if os.path.exists(f"/proc/{p}/root")
            and sb.id[:12] in open(f"/proc/{p}/cgroup").read()]
    assert ours == []
    launchers = [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/cmdline")
                 and rt.state.encode() in open(f"/proc/{p}/cmdline", "rb").read()]
    assert launchers == [], launchers
    sb.remove()


def test_pod_shared_pid_namespace(env):
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="podpid", pid="pod")) as sb:
        c = sb.create_container(pycri.ContainerConfig(name="a", image=img.id,
                                                      command=("sleep", "60")))
        c.start()
        r = sb.run(img, ["sh", "-c", "cat /proc/1/cmdline; echo; ps -o pid,args"], timeout=10)
        assert r.stdout.startswith(b"pycri-pause")
        assert b"sleep 60" in r.stdout  # sees its sibling container's process
        infra = sb.record()["infra_pid"]
    assert not os.path.exists(f"/proc/{infra}")
    with rt.run_sandbox(pycri.SandboxConfig(name="ownpid")) as sb:
        with pytest.raises(InvalidArgumentError, match="pid namespace"):
            sb.create_container(pycri.ContainerConfig(name="x", image=img.id, pid="pod",
                                                      command=("true",)))


@pytest.fixture(scope="module")
def group_image(registry):
    groups = b"root:x:0:\napp:x:1000:\nimagegroup:x:50000:app\n"
    built = ib.build_image([ib.busybox_layer(), ib.layer_tar([ib.File("etc/group", groups)])],
                           config={"Env": ["PATH=/bin"], "User": "app"})
    ib.push(registry.host, "test/groups", "v1", built)
    return f"{registry.host}/test/groups:v1"


@pytest.mark.parametrize("policy,expect", [("Merge", b"1000 1234 50000"), ("Strict", b"1000 1234")])
def test_supplemental_groups_policy(env, group_image, policy, expect):
    rt, _ = env
    img = rt.images.pull(group_image)
    with rt.run_sandbox(pycri.SandboxConfig(name="groups")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="g", image=img.id, command=("sh", "-c", "id -G; sleep 60"), run_as_user=1000,
            supplemental_groups=(1234,), supplemental_groups_policy=policy))
        c.start()
        st = c.status()
        assert (st.uid, st.gid) == (1000, 1000)
        assert sorted(st.groups) == sorted(int(x) for x in expect.split())
        assert c.exec_sync(["id", "-G"]).stdout.strip() == expect
        c.stop(timeout=0)


def test_image_volumes(env, group_image):
    rt, img = env
    vol = rt.images.pull(group_image)
    with rt.run_sandbox(pycri.SandboxConfig(name="imgvol")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="v", image=img.id, command=("sleep", "60"),
            mounts=(pycri.Mount("/vol", image=vol.id, readonly=True),
                    pycri.Mount("/etcvol", image=vol.id, readonly=True, sub_path="etc"))))
        c.start()
        assert c.status().image_volumes == {"/vol": vol.id, "/etcvol": vol.id}
        assert b"imagegroup" in c.exec_sync(["cat", "/vol/etc/group"]).stdout
        assert b"imagegroup" in c.exec_sync(["cat", "/etcvol/group"]).stdout
        r = c.exec_sync(["touch", "/vol/new"])
        assert r.exit_code != 0 and b"Read-only" in r.stderr
        # the image stays while a container uses it, even without a name
        rt.images.remove(vol.id)
        assert all(os.path.isdir(rt.images.layer_path(x)) for x in vol.chain_ids)
        c.remove()
        assert not [line for line in open("/proc/self/mountinfo") if c.id[:20] in line]
        with pytest.raises(InvalidArgumentError, match="sub_path"):
            sb.create_container(pycri.ContainerConfig(
                name="w", image=img.id, command=("true",),
                mounts=(pycri.Mount("/v", image=img.id, readonly=True, sub_path="no/such"),)))
        assert sb.containers() == []
    with pytest.raises(InvalidArgumentError, match="read-only"):
        pycri.Mount("/v", image=img.id)


def test_user_namespace_pod(env):
    rt, img = env
    m = pycri.IDMapping(0, 200000, 65536)
    # the host's root opens bind sources for the pod: a 0700 dir is fine
    share = tempfile.mkdtemp(prefix="pycri-share-", dir="/tmp")
    with open(os.path.join(share, "f"), "w") as f:
        f.write("host file")
    cfg = pycri.SandboxConfig(name="userns", user_namespace=pycri.UserNamespace((m,), (m,)))
    with rt.run_sandbox(cfg) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="u", image=img.id, command=("sh", "-c", "touch /made-here; sleep 60"),
            mounts=(pycri.Mount("/share", share, readonly=True),)))
        c.start()
        r = c.exec_sync(["sh", "-c", "cat /proc/self/uid_map; id -u; cat /share/f"])
        assert r.stdout.split() == [b"0", b"200000", b"65536", b"0", b"host", b"file"], r
        deadline = time.monotonic() + 5
        made = os.path.join(c.record_dir, "fs", "upper", "made-here")
        while not os.path.exists(made):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert os.stat(made).st_uid == 200000  # root inside is 200000 outside
        p = json.loads(c.exec_sync(["probe"]).stdout)
        assert p["ns"]["user"] != os.stat("/proc/self/ns/user").st_ino
        c.stop(timeout=0)
    shutil.rmtree(share)


def _slot_names(rt):
    d = f"{rt.root}/slots"
    return os.listdir(d) if os.path.isdir(d) else []


def _slot_ids(rt):
    """Container ids of the slots on rt's root (pycri/slots.py), any owner."""
    return {n.split(".")[3] for n in _slot_names(rt)}


def _container_cgroups(rt, sb):
    pod_dir = f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}"
    return {d for d in os.listdir(pod_dir) if os.path.isdir(os.path.join(pod_dir, d))}


def _wait_slot(rt, sb):
    """[the name of sb's slot] once this process has one ready (the next create's).
    (Listing the slots dir could also show one being deleted: a slot taken with
    another image's root goes to the trash thread.)"""
    deadline = time.monotonic() + 5
    while (slot := pycri.slots.peek(rt, sb.id)) is None:
        assert time.monotonic() < deadline, "no slot was made"
        time.sleep(0.01)
    name = os.path.basename(slot.dir)
    assert name in _slot_names(rt) and name.split(".")[2] == sb.id
    return [name]


def test_slots_are_used_and_go_with_the_pod(env):
    """A container's id, record dir and cgroup come from a slot made ahead of need
    (renamed into place); the slot's cgroup has the default device rules, and the
    pod's removal takes the slot along."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="slots"))
    pod_dir = f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}"
    made = []
    for i in range(3):
        c = sb.create_container(pycri.ContainerConfig(name=f"s{i}", image=img.id,
                                                      command=("cat", "/proc/self/cgroup")))
        if made:    # this container is the slot made after the previous create
            assert c.id == made[-1].split(".")[3]
            assert not os.path.exists(f"{rt.root}/slots/{made[-1]}")
        slot = _wait_slot(rt, sb)
        assert len(slot) == 1 and slot[0].startswith(f"{os.getpid()}.")
        made.append(slot[0])
        sid = slot[0].split(".")[3]
        assert sorted(os.listdir(f"{rt.root}/slots/{slot[0]}/fs")) == ["rootfs", "upper", "work"]
        assert os.path.isdir(os.path.join(pod_dir, sid))
        dev = f"/sys/fs/cgroup/devices/{rt.cgroup_parent}/{sb.id}/{c.id}/devices.list"
        rules = open(dev).read().split("\n")
        assert "a *:* rwm" not in rules and "c 1:3 rwm" in rules   # /dev/null, not all
        c.start()
        assert c.wait(10) == 0
        # in its own cgroup in every v1 hierarchy
        lines = [r.content.decode() for r in c.logs()]
        v1 = [x for x in lines if not x.startswith("0::") and "name=" not in x]
        assert len(v1) >= 5 and all(x.endswith(f"/{sb.id}/{c.id}") for x in v1), lines
        c.remove()
        # an exited container's empty cgroup is removed just after remove returns
        assert pycri.store.Trash.drain(5)
        assert not os.path.exists(os.path.join(pod_dir, c.id))
    # the ready slot's cgroup, and that of the one made ahead of it for a pod that
    # creates containers (slots._Slots._make_base), if any yet
    base = pycri.slots._slots._base.get((rt.root, sb.id))
    ahead = {base.id} if base else set()
    assert made[-1].split(".")[3] in _container_cgroups(rt, sb)
    assert _container_cgroups(rt, sb) - {made[-1].split(".")[3]} <= ahead
    sb.remove()
    assert pycri.store.Trash.drain(5)     # (the slot's mounts and dir go just after)
    assert not os.path.exists(f"{rt.root}/slots/{made[-1]}")
    assert not [n for n in _slot_names(rt) if sb.id in n]
    for ctl in ("memory", "devices", "cpu", "pids", "freezer"):
        assert not os.path.exists(f"/sys/fs/cgroup/{ctl}/{rt.cgroup_parent}/{sb.id}")


def test_premounted_rootfs_follows_the_image(env, registry):
    """A slot carries the overlay of the image the pod's last create used, mounted
    ahead with the mount points made in it; the next create of that image runs on
    it. A create of another image, or of the same image removed and pulled again
    (new layer dirs), does not use it and sees exactly its own image."""
    rt, img = env
    other = ib.build_image([ib.busybox_layer(), ib.layer_tar([ib.File("marker", b"other\n")])],
                           config={"Env": ["PATH=/bin"]})
    ib.push(registry.host, "test/other", "v1", other)
    img2 = rt.images.pull(f"{registry.host}/test/other:v1")
    # /dev as the container sees it: entries with type, mode, owner, device numbers
    # or link targets, and the mounts on and under it (options, fs type, source)
    show_dev = ["sh", "-c", "ls -lan /dev | tail -n +2 | grep -v ' \\.\\.\\?$' | "
                "awk '{print $1, $3, $4, $5, $6, $NF}'; "
                "grep ' /dev' /proc/self/mountinfo | awk '{print $5, $6, $(NF-2), $(NF)}'"]
    with rt.run_sandbox(pycri.SandboxConfig(name="premount", hostname="pm")) as sb:
        pycri.slots.forget(rt, sb.id)       # (the pod's first slot: dropped)
        first = sb.run(img, show_dev)       # no slot: /dev made by the container
        assert first.exit_code == 0 and b"null" in first.stdout, first
        slot = _wait_slot(rt, sb)[0]
        upper = f"{rt.root}/slots/{slot}/fs/upper"
        # the image has no /etc/hosts or /etc/hostname: the mount points layer under
        # the image's has them, so nothing is made in the writable layer
        assert not os.listdir(upper)
        assert os.path.isfile(f"{rt.mount_points}/etc/hosts")
        c = sb.create_container(pycri.ContainerConfig(
            name="on-slot", image=img.id,
            command=("sh", "-c", "cat /etc/hostname; ls /bin/probe; grep ' / / ' /proc/self/mountinfo")))
        assert c.id == slot.split(".")[3]
        c.start()
        assert c.wait(10) == 0
        out = b"".join(r.content + b"\n" for r in c.logs()).decode()
        assert out.startswith("pm\n/bin/probe\n") and " - overlay " in out, out
        c.remove()
        # the /dev of a container on a slot (made ahead) is the same as one made inside
        _wait_slot(rt, sb)
        again = sb.run(img, show_dev)
        assert again.stdout == first.stdout
        # another image: img's premounted slot is not used
        _wait_slot(rt, sb)
        r = sb.run(img2, ["sh", "-c", "cat /marker; ls /bin/probe"])
        assert r.stdout == b"other\n" and r.exit_code != 0      # no probe in img2
        # the slot now made is img2's; remove img2 and pull it again: new layer dirs
        _wait_slot(rt, sb)
        rt.images.remove(img2.id)
        img2 = rt.images.pull(f"{registry.host}/test/other:v1")
        r = sb.run(img2, ["cat", "/marker"])
        assert (r.exit_code, r.stdout) == (0, b"other\n")


def test_container_process_ignores_no_signal(env):
    """The caller (Python ignores SIGPIPE and SIGXFSZ; posix_spawn leaves glibc's
    internal signals 32 and 33 ignored) and the launcher (it ignores SIGPIPE and
    SIGHUP) pass no ignored signal on to the container's processes."""
    import signal as sig
    rt, img = env
    old = sig.signal(sig.SIGUSR2, sig.SIG_IGN)     # one more for a new launcher to inherit
    try:
        with rt.run_sandbox(pycri.SandboxConfig(name="sigign")) as sb:
            for _ in range(3):      # (a spare launcher made before, and ones made after)
                r = sb.run(img, ["cat", "/proc/self/status"])
                line = [x for x in r.stdout.decode().splitlines() if x.startswith("SigIgn:")]
                assert line == ["SigIgn:\t0000000000000000"], line
            c = sb.create_container(pycri.ContainerConfig(name="x", image=img.id,
                                                          command=("sleep", "30")))
            c.start()
            out = c.exec_sync(["cat", "/proc/self/status"]).stdout.decode()    # (an exec)
            assert [x for x in out.splitlines() if x.startswith("SigIgn:")] == \
                ["SigIgn:\t0000000000000000"]
            c.stop(0)
    finally:
        sig.signal(sig.SIGUSR2, old)


def test_creator_waits_on_the_monitors_pipe(env):
    """The creating process holds a pipe its container's monitor closes once the
    exit file is written; wait() wakes on it and lets it go. A monitor killed
    before that closes it too: wait() then falls back to watching the processes
    and reports the end as Unknown (255) once the container is gone."""
    from pycri.procinfo import _exits
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="donepipe")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="a", image=img.id, command=("sh", "-c", "sleep 0.2; exit 3")))
        held = _exits.take(c.id)
        assert held is not None and len(held) == 1
        assert _exits.put(c.id, *held)
        c.start()
        assert c.wait(10) == 3
        assert _exits.take(c.id) is None     # used and closed
        assert c.status().exit_code == 3
        c.remove()
        d = sb.create_container(pycri.ContainerConfig(
            name="b", image=img.id, command=("sh", "-c", "sleep 0.5")))
        d.start()
        os.kill(d._read()["monitor_pid"], signal.SIGKILL)
        assert d.wait(10) == 255
        assert d.status().reason == "Unknown"
        d.remove()


def test_readable_past_fd_1023():
    """wait() watches fds with select while they fit its 1024-bit set, and with poll
    past it (a server holding many fds)."""
    import resource
    from pycri.container import _readable
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        os.dup2(r, 2000)
        os.dup2(r2, 2001)
        assert _readable([2000, 2001], 0.01) == []
        os.write(w, b"x")
        assert _readable([2000, 2001], 1.0) == [2000]
        assert _readable([r, r2], 0.5) == [r]      # (select)
    finally:
        for fd in (r, w, r2, w2, 2000, 2001):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_premounted_slots_are_capped(env, monkeypatch):
    """A premounted slot holds two fds; past MAX_PREMOUNTED pods a process's slots
    come without (the create mounts its own root), and work the same."""
    rt, img = env
    monkeypatch.setattr(pycri.slots, "MAX_PREMOUNTED", 1)
    a = rt.run_sandbox(pycri.SandboxConfig(name="cap-a"))
    b = rt.run_sandbox(pycri.SandboxConfig(name="cap-b"))
    try:
        assert a.run(img, ["true"]).exit_code == 0
        _wait_slot(rt, a)
        assert pycri.slots.peek(rt, a.id).premounted
        assert b.run(img, ["true"]).exit_code == 0
        _wait_slot(rt, b)
        assert not pycri.slots.peek(rt, b.id).premounted
        r = b.run(img, ["cat", "/etc/hostname"])      # on the plain slot
        assert r.exit_code == 0 and r.stdout.strip()
    finally:
        a.remove()
        b.remove()


def test_a_pods_first_container_has_a_slot(env):
    """A new pod gets its first slot while it is being made, with a root of the
    image this process last ran premounted; its first container takes it."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="first-a")) as a:
        assert a.run(img, ["true"]).exit_code == 0
    with rt.run_sandbox(pycri.SandboxConfig(name="first-b")) as b:
        _wait_slot(rt, b)
        slot = pycri.slots.peek(rt, b.id)
        # its root and /dev premounted and held by its container process, set up
        # ahead (the two fds are that process's now)
        assert slot.image_id == img.id and slot.pre is not None and slot.pre.alive()
        assert slot.rootfs_fd == slot.dev_fd == -1
        c = b.create_container(pycri.ContainerConfig(name="c", image=img.id,
                                                     command=("cat", "/etc/hostname")))
        assert c.id == slot.id and c._read()["pid"] == slot.pre.pid
        c.start()
        assert c.wait(10) == 0 and [r.content for r in c.logs()] == [b"first-b"]


def test_masked_dirs_are_empty_and_read_only(env):
    """Every masked directory shows as an empty read-only tmpfs (one filesystem
    for them all, cloned: its mounts still each refuse writes), masked files as
    /dev/null; the host's content under them stays hidden."""
    rt, img = env
    dirs = [d for d in ("/sys/firmware", "/sys/power", "/proc/tty", "/proc/fs")
            if os.path.isdir(d) and os.listdir(d)]
    assert len(dirs) >= 3, dirs
    with rt.run_sandbox(pycri.SandboxConfig(name="masks")) as sb:
        script = "; ".join(f"ls -A {d} | wc -l; touch {d}/x 2>/dev/null; echo $?" for d in dirs)
        r = sb.run(img, ["sh", "-c", script + "; wc -c < /proc/keys"],
                   masked_paths=(*dirs, "/proc/keys"))
        assert r.exit_code == 0, r
        out = r.stdout.decode().split()
        assert out == ["0", "1"] * len(dirs) + ["0"], out


def test_start_time_is_an_xattr_of_the_record_dir(env, tmp_path):
    """start records its time on the record dir (no file made per container); a
    "started" file (older records, or a file system without user xattrs) still
    counts, one cut short by a crash by its mtime."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="started")) as sb:
        c = sb.create_container(pycri.ContainerConfig(name="s", image=img.id,
                                                      command=("sleep", "5")))
        assert c.status().state == "created"
        before = time.time_ns()
        c.start()
        at = int(os.getxattr(c.record_dir, "user.pycri.started"))
        assert before <= at <= time.time_ns()
        assert "started" not in os.listdir(c.record_dir)
        assert c.status().state == "running" and c.status().started_at_ns == at
        with pytest.raises(FileExistsError):
            pycri.procinfo.mark_started(c.record_dir)
        c.stop(timeout=0)
        c.remove()
    from pycri.procinfo import _started_at
    d = str(tmp_path)
    assert _started_at(d) is None
    with open(os.path.join(d, "started"), "w") as f:
        f.write("123")
    assert _started_at(d) == 123
    open(os.path.join(d, "started"), "w").close()
    assert _started_at(d) == os.stat(os.path.join(d, "started")).st_mtime_ns


def test_lock_files_go_with_their_objects(env):
    """A pod has a lock file while it exists and its removal removes it; a
    container locks its record dir (no file of its own: an inode made and deleted
    per container); a new Runtime sweeps the lock files left by a process killed
    in a remove (or by an older pycri), keeping live objects' files."""
    rt, img = env
    locks = f"{rt.root}/locks"
    sb = rt.run_sandbox(pycri.SandboxConfig(name="locks"))
    c = sb.create_container(pycri.ContainerConfig(name="l", image=img.id, command=("true",)))
    keep = sb.create_container(pycri.ContainerConfig(name="k", image=img.id, command=("true",)))
    assert f"sandbox-{sb.id}.lock" in os.listdir(locks)
    assert not [n for n in os.listdir(locks) if c.id in n or keep.id in n]
    # the lock is the record dir's flock: held, another holder waits
    script = f"""
import sys, time; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
ctr = rt.container({c.id!r})
print("ready", flush=True)
sys.stdin.readline()
t = time.monotonic(); ctr.kill(); print(time.monotonic() - t)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        fd = os.open(c.record_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            p.stdin.write(b"go\n")
            p.stdin.flush()
            time.sleep(0.5)
            assert p.poll() is None     # (waiting for the lock)
        finally:
            os.close(fd)
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0 and float(out) >= 0.5
    finally:
        p.kill()
        p.wait()
    c.remove()
    with pytest.raises(NotFoundError):
        with c._lock():
            pass
    c.remove()      # (idempotent)
    c.stop()
    stale = [f"container-{uuid.uuid4().hex * 2}.lock", f"sandbox-{uuid.uuid4().hex * 2}.lock"]
    for name in stale:
        open(os.path.join(locks, name), "w").close()
    pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    left = set(os.listdir(locks))
    assert not left & set(stale)
    assert f"sandbox-{sb.id}.lock" in left
    sb.remove()
    assert not [n for n in os.listdir(locks) if keep.id in n or sb.id in n]


def _spares(rt):
    return [p for p, _ov in pycri.slots._slots._spares.get(rt.root, [])]


def _spare_overlay(rt, path):
    return dict(pycri.slots._slots._spares.get(rt.root, [])).get(path)


def _ino(path):
    return os.stat(path).st_ino


def _root_dev(c):
    """The device number of the container's / (its overlay's), from its log."""
    lines = [r.content.decode() for r in c.logs()]
    return [x for x in lines if x.startswith("dev=")][0]


def test_removed_containers_dirs_make_a_next_slot(env):
    """An exited container that left its writable layer as made gives its record
    dir, emptied, to a later container (slots.retire): the same directory, holding
    nothing of the first (no file, no log), on the very same overlay (this process
    kept it: slots.Overlay), and the container on it sees exactly its image."""
    rt, img = env
    show_dev = "echo dev=$(stat -c %d /)"
    with rt.run_sandbox(pycri.SandboxConfig(name="spare")) as sb:
        # (a new pod's first slot premounts the image this process last ran: maybe none)
        assert sb.run(img, ["true"]).exit_code == 0
        c = sb.create_container(pycri.ContainerConfig(
            name="first", image=img.id, command=("sh", "-c", f"echo first-out; {show_dev}")))
        ino = _ino(c.record_dir)
        c.start()
        assert c.wait(10) == 0
        dev = _root_dev(c)
        upper = os.path.join(c.record_dir, "fs", "upper")
        assert "trusted.overlay.uuid" in os.listxattr(upper)     # (the overlay's own)
        c.remove()
        assert pycri.store.Trash.drain(5)
        spare = [p for p in _spares(rt) if _ino(p) == ino]
        assert len(spare) == 1 and ".spare." in os.path.basename(spare[0])
        assert os.path.dirname(spare[0]) == f"{rt.root}/slots"
        assert os.listdir(spare[0]) == ["fs"]
        assert not os.listxattr(os.path.join(spare[0], "fs", "upper"))
        assert _spare_overlay(rt, spare[0]).image_id == img.id
        # slots are made ahead: a few creates on, one is made on it
        for i in range(4):
            d = sb.create_container(pycri.ContainerConfig(
                name=f"next{i}", image=img.id,
                command=("sh", "-c", f"ls /; echo $0 > /mine; {show_dev}")))
            if _ino(d.record_dir) == ino:
                break
            d.remove()
        else:
            raise AssertionError("the spare record dir was not used")
        assert sorted(os.listdir(d.record_dir)) == sorted(["fs", "record.json", "container.log"])
        d.start()
        assert d.wait(10) == 0
        lines = [r.content.decode() for r in d.logs()]
        assert "first-out" not in lines and "bin" in lines and "mine" not in lines, lines
        assert os.listdir(os.path.join(d.record_dir, "fs", "upper")) == ["mine"]
        assert _root_dev(d) == dev      # (the same overlay file system)
        d.remove()
        # d wrote to its layer: its dirs and overlay go (no spare has that overlay)
        assert pycri.store.Trash.drain(5)
        assert not [p for p in _spares(rt) if _ino(p) == ino]


def test_spare_overlay_serves_a_create_that_sets_up_its_own_process(env, registry):
    """Every container made on a slot runs on the slot's kept overlay: one resumed
    from the held process, and one whose setup differs (here: a sysctl), set up
    anew on a clone of it (never a second overlay on the same upper dir); a slot
    of another image mounts its own overlay on the reused dirs."""
    rt, img = env
    other = ib.build_image([ib.busybox_layer(), ib.layer_tar([ib.File("marker", b"o\n")])],
                           config={"Env": ["PATH=/bin"]})
    ib.push(registry.host, "test/spare-other", "v1", other)
    img2 = rt.images.pull(f"{registry.host}/test/spare-other:v1")
    show = "echo dev=$(stat -c %d /); ls /marker 2>/dev/null; true"
    with rt.run_sandbox(pycri.SandboxConfig(name="spare-ov")) as sb:
        assert sb.run(img, ["true"]).exit_code == 0
        seen = set()
        for i, image in enumerate([img, img, img, img, img2, img2, img]):
            _wait_slot(rt, sb)
            slot = pycri.slots.peek(rt, sb.id)
            r = sb.create_container(pycri.ContainerConfig(
                name=f"a{i}", image=image.id, command=("sh", "-c", show),
                sysctls={"net.ipv4.ip_forward": "0"} if i % 2 else {}))
            r.start()
            assert r.wait(10) == 0
            lines = [x.content.decode() for x in r.logs()]
            assert ("/marker" in lines) == (image is img2), lines
            if slot.overlay is not None and slot.image_id == image.id:
                assert r.id == slot.id
                assert lines[0] == f"dev={os.fstat(slot.overlay.fd).st_dev}", lines
                seen.add(slot.overlay.fd)
            r.remove()
        assert len(seen) >= 3


@pytest.mark.parametrize("change", [
    "echo x > /new",            # a file in the writable layer
    "rm /bin/true",             # a whiteout
    "chmod 700 /",              # the upper dir's own mode
    "mkdir /d && rmdir /d && touch /f && rm /f && chown 1:1 /",   # its owner
])
def test_changed_writable_layer_is_deleted_not_reused(env, change):
    """A container that left anything in its writable layer (or changed the layer's
    root) does not give its dirs to another: they are deleted."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="nospare")) as sb:
        before = set(_spares(rt))
        c = sb.create_container(pycri.ContainerConfig(name="w", image=img.id,
                                                      command=("sh", "-c", change)))
        ino = _ino(c.record_dir)
        c.start()
        assert c.wait(10) == 0, [r.content for r in c.logs()]
        c.remove()
        assert pycri.store.Trash.drain(5)
        assert not [p for p in set(_spares(rt)) - before if _ino(p) == ino]
        assert not os.listdir(f"{rt.root}/trash")


def test_spare_overlay_lets_a_removed_image_go(env, registry, monkeypatch):
    """A spare's overlay holds its image's layers; once the image is removed and its
    layers collected, the overlay is closed (their disk space freed) and the
    spare's dirs stay a spare, without it."""
    rt, img = env
    gone = ib.build_image([ib.busybox_layer(), ib.layer_tar([ib.File("gone", b"g\n")])],
                          config={"Env": ["PATH=/bin"]})
    ib.push(registry.host, "test/spare-gone", "v1", gone)
    img2 = rt.images.pull(f"{registry.host}/test/spare-gone:v1")
    layers = rt.images.layer_dirs(img2)
    monkeypatch.setattr(pycri.slots, "MAX_SPARES", 100)     # (earlier tests' spares)
    # a spare as a removed container of img2 leaves it (made here: which removed
    # container's dirs are spares at a given moment depends on the slot thread)
    d = os.path.join(rt.root, "trash", "spare-gone")
    os.makedirs(os.path.join(rt.root, "slots"), exist_ok=True)     # (made by the first slot)
    pycri.slots.make_record_dir(d)
    fd = pycri._native.overlay_premount(layers + [rt.mount_points], f"{d}/fs/upper",
                                        f"{d}/fs/work")
    ov = pycri.slots.Overlay(fd, img2.id, pycri.slots._dir_ids(layers), tuple(layers))
    assert not ov.layers_gone()
    assert pycri.slots._slots.keep_spare(rt.root, d, ov)
    path = _spares(rt)[-1]
    assert _spare_overlay(rt, path) is ov
    assert os.path.exists(os.path.join(f"/proc/self/fd/{fd}", "gone"))
    rt.images.remove(img2.id)
    assert not all(os.path.isdir(x) for x in layers)
    assert path in _spares(rt) and _spare_overlay(rt, path) is None
    with pytest.raises(OSError):
        os.fstat(fd)    # (closed; nothing else opened meanwhile in this thread)


def test_kept_overlays_are_capped(env, monkeypatch):
    """Each container made on a slot leaves its overlay with this process (an fd)
    for reuse, up to MAX_KEPT_OVERLAYS; past that the container's own mount is
    all that holds it, and it still runs on it."""
    rt, img = env
    monkeypatch.setattr(pycri.slots, "MAX_KEPT_OVERLAYS", 1)
    kept = pycri.slots._slots._in_use
    with rt.run_sandbox(pycri.SandboxConfig(name="kept")) as sb:
        assert sb.run(img, ["true"]).exit_code == 0
        cs = []
        for i in range(3):
            _wait_slot(rt, sb)
            slot = pycri.slots.peek(rt, sb.id)
            assert slot.overlay is not None
            dev = os.fstat(slot.overlay.fd).st_dev
            c = sb.create_container(pycri.ContainerConfig(
                name=f"k{i}", image=img.id, command=("sh", "-c", "echo dev=$(stat -c %d /)")))
            assert c.id == slot.id
            cs.append((c, dev))
        assert [c.id for c, _ in cs if c.id in kept] == [cs[0][0].id]
        for c, dev in cs:
            c.start()
            assert c.wait(10) == 0
            assert _root_dev(c) == f"dev={dev}"
            c.remove()
        assert not [c.id for c, _ in cs if c.id in kept]
        # one kept for a container removed by another process is let go when the
        # cap is reached
        _wait_slot(rt, sb)
        c = sb.create_container(pycri.ContainerConfig(name="other", image=img.id,
                                                      command=("true",)))
        assert list(kept) == [c.id]
        fd = kept[c.id].fd
        r = subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
rt.container({c.id!r}).remove()
"""], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert os.path.exists(f"/proc/self/fd/{fd}") and list(kept) == [c.id]
        _wait_slot(rt, sb)
        d = sb.create_container(pycri.ContainerConfig(name="after", image=img.id,
                                                      command=("true",)))
        assert list(kept) == [d.id]
        d.remove()


def test_spares_are_capped_and_go_with_their_owner(env, monkeypatch):
    """At most MAX_SPARES spare dirs per root; those of a process that is gone are
    deleted by the next Runtime on the root, and a process's own at its exit."""
    rt, img = env
    monkeypatch.setattr(pycri.slots, "MAX_SPARES", 2)
    pycri.slots._slots._spares.pop(rt.root, None)
    with rt.run_sandbox(pycri.SandboxConfig(name="cap")) as sb:
        cs = [sb.create_container(pycri.ContainerConfig(name=f"c{i}", image=img.id,
                                                        command=("true",))) for i in range(4)]
        for c in cs:
            c.start()
            assert c.wait(10) == 0
            c.remove()
        assert pycri.store.Trash.drain(5)
        assert len(_spares(rt)) == 2
        assert sorted(_spares(rt)) == sorted(
            f"{rt.root}/slots/{n}" for n in os.listdir(f"{rt.root}/slots") if ".spare." in n)
    # a process that dies with spares: the next Runtime deletes them
    script = f"""
import sys, os, signal; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
# (a dir as a removed container's would be: which ones become spares is the
# tests above's; a spare can also be taken by a slot being made meanwhile)
d = os.path.join(rt.root, "trash", "dies")
os.makedirs(os.path.join(rt.root, "slots"), exist_ok=True)
pycri.slots.make_record_dir(d)
assert pycri.slots._slots.keep_spare(rt.root, d)
print(len(pycri.slots._slots._spares[rt.root]), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""
    def theirs():
        return [n for n in os.listdir(f"{rt.root}/slots")
                if ".spare." in n and not n.startswith(f"{os.getpid()}.")]
    r = subprocess.run([sys.executable, "-c", script, "exit"], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == b"1", r.stderr.decode()
    assert not theirs()     # (deleted at its exit)
    r = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL and r.stdout.strip() == b"1", r.stderr.decode()
    assert len(theirs()) == 1
    pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    assert pycri.store.Trash.drain(5)
    assert not theirs()
    assert len(_spares(rt)) == 2 and all(os.path.isdir(p) for p in _spares(rt))


def test_slot_of_a_dead_process_is_deleted(env):
    """A process that made a slot and died (SIGKILL) leaves a record dir and a
    cgroup nobody uses; the next Runtime on the root deletes both, and leaves the
    slots of live processes alone."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="deadslot"))
    script = f"""
import sys, os, signal, time; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
sb = rt.sandbox({sb.id!r})
c = sb.create_container(pycri.ContainerConfig(name="x", image={img.id!r}, command=("true",)))
c.remove()
deadline = time.monotonic() + 5
while pycri.slots.peek(rt, sb.id) is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    # (its ready slot, and maybe the one it made ahead of it)
    # (its spare dir, if its remove made one, is test_spares_are_capped_and_go_...'s)
    dead = [n for n in os.listdir(f"{rt.root}/slots")
            if not n.startswith(f"{os.getpid()}.") and ".spare." not in n]
    assert 1 <= len(dead) <= 2
    dead_ids = [d.split(".")[3] for d in dead]
    # (the one made ahead may have been killed half made: a dir without a cgroup)
    assert any(os.path.isdir(f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}/{dead_id}")
               for dead_id in dead_ids)
    # a slot of ours, alive
    sb.create_container(pycri.ContainerConfig(name="y", image=img.id, command=("true",)))
    ours = [n for n in _wait_slot(rt, sb) if n.startswith(f"{os.getpid()}.")]
    assert len(ours) == 1
    pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    for name, dead_id in zip(dead, dead_ids, strict=True):
        assert not os.path.exists(f"{rt.root}/slots/{name}")
        assert not os.path.exists(f"/sys/fs/cgroup/memory/{rt.cgroup_parent}/{sb.id}/{dead_id}")
    for n in ours:
        assert os.path.exists(f"{rt.root}/slots/{n}")
    assert rt.containers(sandbox_id=sb.id)[0].name == "y"
    sb.remove()


def test_reopen_log_right_after_start_keeps_the_monitor(env):
    """A start returns as soon as the process has exec'd, which may be before its
    launcher has turned into the monitor; a log reopen (SIGUSR1) sent then must wait
    for the monitor, not kill it (then the container's exit would be lost)."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="early-signal")) as sb:
        for i in range(5):
            c = sb.create_container(pycri.ContainerConfig(
                name=f"e{i}", image=img.id, command=("sh", "-c", "sleep 0.2; echo done; exit 5")))
            c.start()
            c.reopen_log()
            assert c.wait(10) == 5
            st = c.status()
            assert st.reason == "Error" and st.exit_code == 5, st
            assert any(r.content == b"done" for r in c.logs())
            c.remove()
