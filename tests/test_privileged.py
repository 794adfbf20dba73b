"""Privileged containers as the CRI defines them, probed from inside a real container:
all capabilities, no seccomp, no masked or read-only paths, /sys read-write, the
host's device nodes, a devices cgroup that allows everything; and refused in a
pod that is not privileged, before anything is made.
"""

from __future__ import annotations

import os
import time
import stat

import pytest

import pycri
from pycri.container import DEFAULT_CAPS, cap_mask
from pycri.errors import InvalidArgumentError
from test_container import env, probe, probe_image  # noqa: F401 - fixtures

SKIP_DIRS = {"pts", "shm", "mqueue"}


def host_device_nodes() -> dict[str, tuple[int, int]]:
    """What a privileged container should see: /dev's char and block nodes, not
    following symlinks, on /dev's own filesystem, console excepted."""
    top = os.stat("/dev").st_dev
    out = {}
    for dirpath, dirnames, filenames in os.walk("/dev"):
        dirnames[:] = [d for d in dirnames
                       if os.lstat(os.path.join(dirpath, d)).st_dev == top
                       and not (dirpath == "/dev" and d in SKIP_DIRS)]
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and p != "/dev/console":
                out[p] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return out


def container_device_nodes(sb, img, **config) -> dict[str, tuple[int, int]]:
    r = sb.run(img, ["sh", "-c", "find /dev -type c -o -type b | while read p; do "
                     "stat -c '%n %t %T' \"$p\"; done"], timeout=20, **config)
    assert r.exit_code == 0, r
    out = {}
    for line in r.stdout.decode().splitlines():
        name, major, minor = line.rsplit(" ", 2)
        out[name] = (int(major, 16), int(minor, 16))
    return out


def masked_file_size(sb, img, **config) -> int:
    """Bytes read from a default-masked /proc file that has content on this host."""
    path = next(f for f in ("/proc/timer_list", "/proc/keys", "/proc/sched_debug")
                if os.path.exists(f) and os.path.getsize(f) == 0 and open(f).read(1))
    r = sb.run(img, ["sh", "-c", f"cat {path} | wc -c"], timeout=10, **config)
    assert r.exit_code == 0, r
    return int(r.stdout)


def sys_mount_options(p: dict) -> set[str]:
    for line in p["mounts"]:
        fields = line.split()
        if fields[4] == "/sys":
            return set(fields[5].split(","))
    raise AssertionError("no /sys mount")


def own_capbnd() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise AssertionError


def test_privileged_sees_the_host(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="priv", privileged=True)) as sb:
        p = probe(sb, img, "w:/proc/sys/kernel/hostname", "r:/dev/kmsg",
                  "r:/dev/loop-control", "w:/sys/firmware/x", privileged=True)
        assert int(p["CapEff"], 16) == own_capbnd() == int(p["CapBnd"], 16)
        assert p["seccomp"] == 0 and p["Seccomp"] == "0"
        checks = p["checks"]
        assert masked_file_size(sb, img, privileged=True) > 0   # not masked
        assert checks["w:/proc/sys/kernel/hostname"] == 0   # /proc/sys not read-only
        if os.path.exists("/dev/kmsg"):
            assert checks["r:/dev/kmsg"] == 0               # host node, devices cgroup open
        if os.path.exists("/dev/loop-control"):
            assert checks["r:/dev/loop-control"] == 0
        assert checks["w:/sys/firmware/x"] != 30            # not EROFS: sysfs is writable
        assert "rw" in sys_mount_options(p)

        inside = container_device_nodes(sb, img, privileged=True)
        host = host_device_nodes()
        missing = {k: v for k, v in host.items() if inside.get(k) != v
                   and k not in ("/dev/ptmx",)}  # the container's ptmx is its devpts' one
        assert not missing, missing
        assert "/dev/console" not in inside or inside["/dev/console"] == (5, 1)

        c = sb.create_container(pycri.ContainerConfig(name="d", image=img.id, privileged=True,
                                                      command=("sleep", "30")))
        cg = rt.cgroups().container(sb.id, c.id)
        if "devices" in cg.dirs:
            with open(os.path.join(cg.dirs["devices"], "devices.list")) as f:
                assert f.read().split("\n")[0] == "a *:* rwm"
        c.remove()


def test_unprivileged_unchanged(env):  # noqa: F811
    rt, img = env
    # a privileged pod alone does not make its containers privileged
    with rt.run_sandbox(pycri.SandboxConfig(name="unpriv", privileged=True)) as sb:
        p = probe(sb, img, "w:/proc/sys/kernel/hostname", "r:/dev/kmsg")
        assert int(p["CapEff"], 16) == cap_mask(DEFAULT_CAPS) & own_capbnd()
        assert p["seccomp"] == 2
        assert masked_file_size(sb, img) == 0   # /dev/null over it
        assert p["checks"]["w:/proc/sys/kernel/hostname"] == 30  # EROFS
        assert p["checks"]["r:/dev/kmsg"] == 2                   # ENOENT: no host nodes
        assert "ro" in sys_mount_options(p)
        inside = container_device_nodes(sb, img)
        assert set(inside) == {"/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                               "/dev/urandom", "/dev/tty", "/dev/pts/ptmx"}
        c = sb.create_container(pycri.ContainerConfig(name="d", image=img.id,
                                                      command=("sleep", "30")))
        cg = rt.cgroups().container(sb.id, c.id)
        if "devices" in cg.dirs:
            with open(os.path.join(cg.dirs["devices"], "devices.list")) as f:
                assert "a *:* rwm" not in f.read()
        c.remove()


def test_privileged_host_network_sys_is_writable(env):  # noqa: F811
    rt, img = env
    cfg = pycri.SandboxConfig(name="privhost", privileged=True, network="node")
    with rt.run_sandbox(cfg) as sb:
        p = probe(sb, img, privileged=True)
        assert "rw" in sys_mount_options(p)
        p = probe(sb, img)
        assert "ro" in sys_mount_options(p)


def assert_nothing_left(rt, sb) -> None:
    """No container record, no container cgroup, no container mount."""
    assert sb.containers() == [] and rt.containers() == []
    assert os.listdir(os.path.join(rt.root, "containers")) == [] \
        if os.path.isdir(os.path.join(rt.root, "containers")) else True
    slots_dir = os.path.join(rt.root, "slots")      # (the pod's slot, made ahead, may be)
    deadline = time.monotonic() + 5     # (once the slot thread is done with it)
    while pycri.slots._slots._making or pycri.slots._slots._basing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    slot_ids = {n.split(".")[3] for n in os.listdir(slots_dir)} if os.path.isdir(slots_dir) \
        else set()
    for d in rt.cgroups().pod(sb.id).dirs.values():
        if os.path.isdir(d):
            assert not [x for x in os.listdir(d) if os.path.isdir(os.path.join(d, x))
                        and x not in slot_ids], d
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if rt.root in line and "/containers/" in line]


def test_privileged_container_needs_privileged_sandbox(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="notpriv")) as sb:
        with pytest.raises(InvalidArgumentError, match="privileged"):
            sb.create_container(pycri.ContainerConfig(name="p", image=img.id, privileged=True,
                                                      command=("true",)))
        assert_nothing_left(rt, sb)
        uns = pycri.config.UserNamespace(uids=(pycri.config.IDMapping(0, 100000, 65536),),
                                         gids=(pycri.config.IDMapping(0, 100000, 65536),))
    with rt.run_sandbox(pycri.SandboxConfig(name="privuserns", privileged=True,
                                            user_namespace=uns)) as sb:
        with pytest.raises(InvalidArgumentError, match="user namespace"):
            sb.create_container(pycri.ContainerConfig(name="p", image=img.id, privileged=True,
                                                      command=("true",)))
        assert_nothing_left(rt, sb)
