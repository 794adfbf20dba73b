"""Pods with a user namespace, end to end: real containers, real id-mapped mounts.

The pod's user namespace is pinned with its other namespaces and owns them; the
pid-namespace holder (pycri-pause) and every container join it. Image layers are
id-mapped to it, the writable layer stores the mapped ids, bind mounts are
id-mapped where the filesystem allows. The runtime's dirs are 0700 here: nothing
has to be reachable by the mapped root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

import pytest

import imagebuild as ib
import pycri
from pycri import _native
from pycri.config import POD
from pycri.errors import InvalidArgumentError

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
HOST_ID = 300000
LENGTH = 65536


def mapping(host_id: int = HOST_ID, length: int = LENGTH) -> pycri.UserNamespace:
    m = pycri.IDMapping(0, host_id, length)
    return pycri.UserNamespace((m,), (m,))


@pytest.fixture(scope="module")
def image_ref(registry):
    extra = ib.layer_tar([
        ib.Dir("data"),
        ib.File("data/root-file", b"from the image\n", 0o644),
        ib.File("data/app-file", b"app's\n", 0o600, uid=1000, gid=1000),
    ])
    built = ib.build_image([ib.busybox_layer(), extra], config={"Cmd": ["sh"], "Env": ["PATH=/bin"]})
    ib.push(registry.host, "test/userns", "v1", built)
    return f"{registry.host}/test/userns:v1"


def mounts_with(text: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if text in line]


@pytest.fixture
def env(image_ref):
    base = tempfile.mkdtemp(prefix="pycri-userns-", dir="/tmp")  # 0700: unreachable inside
    parent = "pycri-test-" + uuid.uuid4().hex[:8]
    rt = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    img = rt.images.pull(image_ref)
    yield rt, img, base
    for sb in rt.sandboxes():
        sb.remove()
    assert not mounts_with(base)
    rt.cgroups().remove_parent()
    assert pycri.store.Trash.drain(10)     # (its work for this root, then its spares)
    pycri.slots.drop_spares(rt.root)
    shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(base)


def start(sb, img, name, cmd=("sleep", "60"), **kw):
    c = sb.create_container(pycri.ContainerConfig(name=name, image=img.id, command=tuple(cmd), **kw))
    c.start()
    return c


def sh(c, script):
    r = c.exec_sync(["sh", "-c", script], timeout=20)
    assert r.exit_code == 0, r
    return r.stdout.decode()


def ns_ino(pid, kind):
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def test_containers_share_the_pod_user_namespace_and_pid_namespace(env):
    rt, img, _ = env
    cfg = pycri.SandboxConfig(name="shared", user_namespace=mapping(), pid=POD)
    with rt.run_sandbox(cfg) as sb:
        pinned = _native.ns_inode(sb.ns_path("user"))
        assert pinned != ns_ino("self", "user")
        a, b = start(sb, img, "a"), start(sb, img, "b")
        pa, pb = a.status().pid, b.status().pid
        assert ns_ino(pa, "user") == ns_ino(pb, "user") == pinned
        assert ns_ino(pa, "pid") == ns_ino(pb, "pid")
        # the pod's namespaces are owned by its user namespace (NS_GET_USERNS)
        import fcntl

        for kind in ("net", "ipc", "uts", "pid"):
            fd = os.open(f"/proc/{pa}/ns/{kind}", os.O_RDONLY)
            try:
                owner = fcntl.ioctl(fd, 0xB701)
                assert os.fstat(owner).st_ino == pinned, kind
                os.close(owner)
            finally:
                os.close(fd)
        assert sh(a, "cat /proc/self/uid_map").split() == ["0", str(HOST_ID), str(LENGTH)]
        assert sh(a, "cat /proc/self/gid_map").split() == ["0", str(HOST_ID), str(LENGTH)]
        # /proc is this pid namespace's: pid 1 is the pod's pycri-pause, b's sleep is seen
        assert sh(a, "cat /proc/1/comm").strip() == "pycri-pause"
        assert sh(a, "ps -o comm | grep -c sleep").strip() == "2"
        assert sh(a, "readlink /proc/self/ns/user") == sh(b, "readlink /proc/self/ns/user")
        # mqueue and a fresh sysfs need namespaces the pod's root owns
        assert "mqueue" in sh(a, "grep -w /dev/mqueue /proc/mounts")
        assert sh(a, "grep ' /sys ' /proc/mounts").startswith("sysfs ")
        assert sh(a, "ls /sys/class/net").split() == ["lo"]
        assert sh(a, "id -u; id -g").split() == ["0", "0"]


def test_image_files_show_root_owned_and_writes_store_mapped_ids(env):
    rt, img, _ = env
    with rt.run_sandbox(pycri.SandboxConfig(name="fs", user_namespace=mapping())) as sb:
        c = start(sb, img, "w")
        owners = {}
        for line in sh(c, "ls -ln /").splitlines()[1:]:
            cols = line.split()
            owners[cols[-1]] = (cols[2], cols[3])
        for name in ("bin", "etc", "data", "tmp", "root", "usr", "dev", "home"):
            assert owners[name] == ("0", "0"), (name, owners)
        # procfs's root belongs to the host's root in any pid namespace: unmapped here
        assert owners["proc"] == ("65534", "65534")
        assert sh(c, "stat -c '%u:%g %a' /data/app-file /home/app").split() == \
            ["1000:1000", "600", "1000:1000", "755"]
        assert sh(c, "cat /data/root-file") == "from the image\n"
        # new file, copied-up image file, and a file made by uid 1000 inside
        sh(c, "echo new > /new-file; echo more >> /data/root-file; "
              "su -s /bin/sh app -c 'echo mine > /home/app/app-made'")
        assert sh(c, "stat -c '%u:%g' /new-file /data/root-file /home/app/app-made").split() == \
            ["0:0", "0:0", "1000:1000"]
        upper = os.path.join(c.record_dir, "fs", "upper")
        st = {p: os.stat(os.path.join(upper, p)) for p in ("new-file", "data/root-file",
                                                           "home/app/app-made")}
        assert (st["new-file"].st_uid, st["new-file"].st_gid) == (HOST_ID, HOST_ID)
        assert (st["data/root-file"].st_uid, st["data/root-file"].st_gid) == (HOST_ID, HOST_ID)
        assert st["home/app/app-made"].st_uid == HOST_ID + 1000
        # the image's layer itself is untouched and still owned by host root
        for d in rt.images.layer_dirs(img):
            p = os.path.join(d, "data", "root-file")
            if os.path.exists(p):
                assert os.stat(p).st_uid == 0
                with open(p) as f:
                    assert f.read() == "from the image\n"


def test_bind_mounts_are_id_mapped_and_need_no_path_for_the_mapped_root(env):
    rt, img, base = env
    src = os.path.join(base, "private", "share")  # base is 0700: unreachable from the pod
    os.makedirs(src)
    with open(os.path.join(src, "secret"), "w") as f:
        f.write("root only\n")
    os.chmod(os.path.join(src, "secret"), 0o600)
    os.chown(os.path.join(src, "secret"), 0, 0)
    m = pycri.IDMapping(0, HOST_ID, LENGTH)
    with rt.run_sandbox(pycri.SandboxConfig(name="bind", user_namespace=mapping())) as sb:
        c = start(sb, img, "b", mounts=(
            pycri.Mount("/share", src),
            pycri.Mount("/mapped", src, readonly=True, uid_mappings=(m,), gid_mappings=(m,)),
            pycri.Mount("/procs", "/proc", readonly=True),  # procfs cannot be id-mapped
            pycri.Mount("/iv", image=img.id, readonly=True)))
        # an image volume's layers are id-mapped like the rootfs's
        assert sh(c, "stat -c '%u:%g' /iv/data/root-file /iv/data/app-file").split() == \
            ["0:0", "1000:1000"]
        assert sh(c, "stat -c '%u:%g' /share/secret; cat /share/secret /mapped/secret") == \
            "0:0\nroot only\nroot only\n"
        sh(c, "echo written > /share/from-pod")
        st = os.stat(os.path.join(src, "from-pod"))
        assert (st.st_uid, st.st_gid) == (0, 0)  # container root is host root through the map
        assert "Read-only" in c.exec_sync(["sh", "-c", "echo x > /mapped/y"]).stderr.decode()
        # a filesystem that refuses id-mapping is bound as it is: host ids show unmapped
        assert sh(c, "stat -c %u /procs/1") == "65534\n"
        # the pod's /etc files and /dev/shm belong to the mapped root: root inside edits them
        assert sh(c, "stat -c '%u:%g' /etc/hosts /etc/hostname /etc/resolv.conf /dev/shm").split() \
            == ["0:0"] * 4
        sh(c, "echo '10.9.9.9 extra' >> /etc/hosts; touch /dev/shm/seg")
        with open(sb.etc_file("hosts")) as f:
            assert "extra" in f.read()


def test_mount_mappings_must_be_the_pods(env):
    rt, img, base = env
    other = pycri.IDMapping(0, HOST_ID + LENGTH, LENGTH)
    with rt.run_sandbox(pycri.SandboxConfig(name="bad", user_namespace=mapping())) as sb:
        with pytest.raises(InvalidArgumentError, match="differs from the pod"):
            sb.create_container(pycri.ContainerConfig(
                name="x", image=img.id, command=("true",),
                mounts=(pycri.Mount("/m", base, uid_mappings=(other,), gid_mappings=(other,)),)))
        with pytest.raises(InvalidArgumentError, match="outside the pod's user namespace"):
            sb.create_container(pycri.ContainerConfig(name="y", image=img.id, command=("true",),
                                                      run_as_user=LENGTH))
        with pytest.raises(InvalidArgumentError, match="rshared"):
            sb.create_container(pycri.ContainerConfig(
                name="z", image=img.id, command=("true",),
                mounts=(pycri.Mount("/m", base, propagation="rshared"),)))
        assert sb.containers() == []
    with rt.run_sandbox(pycri.SandboxConfig(name="plain")) as sb:
        m = pycri.IDMapping(0, HOST_ID, LENGTH)
        with pytest.raises(InvalidArgumentError, match="needs a pod with a user namespace"):
            sb.create_container(pycri.ContainerConfig(
                name="x", image=img.id, command=("true",),
                mounts=(pycri.Mount("/m", base, uid_mappings=(m,), gid_mappings=(m,)),)))
    with pytest.raises(InvalidArgumentError, match="exactly one gid mapping"):
        pycri.Mount("/m", base, uid_mappings=(other,))


def test_pod_sysctls_are_set_by_the_pods_root(env):
    rt, img, _ = env
    cfg = pycri.SandboxConfig(name="sysctl", user_namespace=mapping(), sysctls={
        "net.ipv4.ip_unprivileged_port_start": "99", "kernel.shmmni": "2345",
        "kernel.domainname": "pod.example"})
    with rt.run_sandbox(cfg) as sb:
        c = start(sb, img, "s")
        assert sh(c, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shmmni; "
                     "cat /proc/sys/kernel/domainname").split() == ["99", "2345", "pod.example"]
    with open("/proc/sys/kernel/shmmni") as f:
        assert f.read().strip() != "2345"


def test_remove_leaves_nothing(env):
    rt, img, base = env
    cfg = pycri.SandboxConfig(name="gone", user_namespace=mapping(), pid=POD)
    sb = rt.run_sandbox(cfg)
    c = start(sb, img, "c")
    pause = sb.record()["infra_pid"]
    pins = [sb.ns_path(k) for k in ("user", "net", "ipc", "uts")]
    assert all(os.path.exists(p) for p in pins)
    assert len([m for m in mounts_with(sb.state_dir)]) >= 5  # 4 pins + shm
    c.stop(timeout=0)
    sb.remove()
    assert not any(os.path.exists(p) for p in pins)
    assert not mounts_with(base)
    assert not os.path.exists(f"/proc/{pause}") or \
        open(f"/proc/{pause}/stat").read().split(") ")[1][0] == "Z"


RECOVERY_SCRIPT = """
import os, sys
sys.path.insert(0, {tree!r})
import pycri
rt = pycri.Runtime(root={root!r}, state={state!r}, cgroup_parent={parent!r})
m = pycri.IDMapping(0, {host_id}, {length})
sb = rt.run_sandbox(pycri.SandboxConfig(name="survivor", user_namespace=pycri.UserNamespace((m,), (m,)),
                                        pid="pod"))
c = sb.create_container(pycri.ContainerConfig(name="first", image={image!r}, command=("sleep", "60")))
c.start()
print(sb.id, flush=True)
os.kill(os.getpid(), 9)
"""


def test_a_new_runtime_finds_the_pinned_user_namespace_after_kill_9(env):
    rt, img, base = env
    script = RECOVERY_SCRIPT.format(tree=TREE, root=rt.root, state=rt.state,
                                    parent=rt.cgroup_parent, host_id=HOST_ID, length=LENGTH,
                                    image=img.id)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    sb_id = p.stdout.strip()
    rt2 = pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    sb = rt2.sandbox(sb_id)
    assert sb.state == "ready"
    first = sb.containers()[0]
    pinned = _native.ns_inode(sb.ns_path("user"))
    second = start(sb, img, "second")
    assert ns_ino(second.status().pid, "user") == ns_ino(first.status().pid, "user") == pinned
    assert ns_ino(second.status().pid, "pid") == ns_ino(first.status().pid, "pid")
    assert sh(second, "cat /proc/self/uid_map").split() == ["0", str(HOST_ID), str(LENGTH)]
    assert sh(second, "ps -o comm | grep -c sleep").strip() == "2"
    sb.remove()
    assert not os.path.exists(sb.ns_path("user"))
    assert not mounts_with(base)


def test_run_to_completion_reports_the_mapping_like_critest(env):
    """What critest's NamespaceMode_POD spec does: the default pid mode is POD."""
    rt, img, _ = env
    cfg = pycri.SandboxConfig(name="critest", user_namespace=mapping(1000, 100000), pid=POD)
    with rt.run_sandbox(cfg) as sb:
        r = sb.run(img, ["cat", "/proc/self/uid_map"], timeout=20)
        assert r.exit_code == 0, r
        assert r.stdout.split() == [b"0", b"1000", b"100000"]
        out = json.dumps(sb.status().config.user_namespace.uids[0].__dict__)
        assert '"host_id": 1000' in out


def test_cri_mount_mappings_convert_both_ways():
    from pycri.cri import convert
    from pycri.cri._gen import api_pb2

    maps = [api_pb2.IDMapping(container_id=0, host_id=HOST_ID, length=LENGTH)]
    m = convert.mount(api_pb2.Mount(container_path="/v", host_path="/srv", uidMappings=maps,
                                    gidMappings=maps))
    assert m.uid_mappings == m.gid_mappings == (pycri.IDMapping(0, HOST_ID, LENGTH),)
    back = convert._mount_to_proto(m)
    assert list(back.uidMappings) == list(back.gidMappings) == maps
    with pytest.raises(InvalidArgumentError):
        convert.mount(api_pb2.Mount(container_path="/v", host_path="/srv", uidMappings=maps))
    two = maps + [api_pb2.IDMapping(container_id=LENGTH, host_id=1, length=1)]
    with pytest.raises(InvalidArgumentError):
        convert.mount(api_pb2.Mount(container_path="/v", host_path="/srv", uidMappings=two,
                                    gidMappings=two))
