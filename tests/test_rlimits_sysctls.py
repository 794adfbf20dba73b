"""ContainerConfig.rlimits and ContainerConfig.sysctls, seen from inside real
containers; refused ones give typed errors before anything is made."""

from __future__ import annotations

import os
import resource

import pytest

import pycri
from pycri.config import ContainerConfig, IDMapping, UserNamespace, from_json, to_json
from pycri.errors import InvalidArgumentError
from pycri.process import DEFAULT_NOFILE, default_rlimits
from test_cli import busybox_ref, cli  # noqa: F401 - fixtures
from test_container import env, probe, probe_image  # noqa: F401 - fixtures
from test_privileged import assert_nothing_left

NOFILE = str(resource.RLIMIT_NOFILE)
CORE = str(resource.RLIMIT_CORE)


def limits_table(text: bytes) -> dict[str, tuple[str, str]]:
    """/proc/self/limits: {"Max open files": (soft, hard)}."""
    out = {}
    for line in text.decode().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        out[name] = (soft, hard)
    return out


def test_config_rlimits_validated():
    c = ContainerConfig(name="c", image="i", rlimits={"nofile": (10, 20), "RLIMIT_CORE": [0, -1],
                                                      "rlimit_stack": (-1, -1)})
    assert c.rlimits == {"RLIMIT_NOFILE": (10, 20), "RLIMIT_CORE": (0, -1),
                         "RLIMIT_STACK": (-1, -1)}
    assert from_json(ContainerConfig, to_json(c)) == c
    for bad, msg in (({"nofiles": (1, 1)}, "unknown rlimit"),
                     ({"nofile": (3, 2)}, "above the hard limit"),
                     ({"nofile": (-1, 2)}, "above the hard limit"),
                     ({"nofile": (1, -2)}, "integer"),
                     ({"nofile": (1.5, 2)}, "integer"),
                     ({"nofile": 5}, "soft, hard"),
                     ({"nofile": (1, 2), "NOFILE": (1, 2)}, "twice")):
        with pytest.raises(InvalidArgumentError, match=msg):
            ContainerConfig(name="c", image="i", rlimits=bad)


def test_config_sysctls_validated():
    ContainerConfig(name="c", image="i", sysctls={"net.ipv4.ip_forward": "1",
                                                  "kernel.shmmax": "1000", "fs.mqueue.msg_max": "9"})
    for bad in ({"kernel.panic": "1"}, {"vm.swappiness": "1"},
                {"kernel.shm_rmid_forced": "1+kernel.core_pattern=|/x"},
                {"net.ipv4.ip_forward": "1\n"}, {"../../etc/x": "1"}):
        with pytest.raises(InvalidArgumentError):
            ContainerConfig(name="c", image="i", sysctls=bad)


def test_default_and_given_rlimits_inside(env):  # noqa: F811
    rt, img = env
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = default_rlimits()["RLIMIT_NOFILE"]
    assert want[0] == want[1] <= DEFAULT_NOFILE
    with rt.run_sandbox(pycri.SandboxConfig(name="rl")) as sb:
        p = probe(sb, img)
        assert p["rlimits"][NOFILE] == list(want)
        p = probe(sb, img, rlimits={"nofile": (512, min(hard, 2048)), "core": (0, 0)})
        assert p["rlimits"][NOFILE] == [512, min(hard, 2048)]
        assert p["rlimits"][CORE] == [0, 0]
        r = sb.run(img, ["cat", "/proc/self/limits"], timeout=10,
                   rlimits={"RLIMIT_NOFILE": (100, 200)})
        assert limits_table(r.stdout)["Max open files"] == ("100", "200")
        # an exec'd process gets the container's limits too
        c = sb.create_container(pycri.ContainerConfig(name="x", image=img.id,
                                                      command=("sleep", "30"),
                                                      rlimits={"nofile": (64, 128)}))
        c.start()
        r = c.exec_sync(["cat", "/proc/self/limits"], timeout=10)
        assert limits_table(r.stdout)["Max open files"] == ("64", "128")
        c.stop(timeout=0)
        c.remove()


def test_rlimit_above_what_pycri_may_grant(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="rlhigh")) as sb:
        with pytest.raises(InvalidArgumentError, match="RLIMIT_NOFILE: hard limit"):
            sb.create_container(pycri.ContainerConfig(
                name="x", image=img.id, command=("true",), rlimits={"nofile": (1, 1 << 40)}))
        assert_nothing_left(rt, sb)


def test_sysctls_applied_in_the_pods_namespaces(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="sysctl")) as sb:
        r = sb.run(img, ["sh", "-c", "cat /proc/sys/kernel/shm_rmid_forced "
                         "/proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/msgmax"],
                   timeout=10, sysctls={"kernel.shm_rmid_forced": "1", "kernel.msgmax": "12345",
                                        "net.ipv4.ip_unprivileged_port_start": "81"})
        assert r.exit_code == 0, r
        assert r.stdout.split() == [b"1", b"81", b"12345"]
        # written into the pod's namespaces, not the host's
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            assert f.read().strip() != "81"
        with open("/proc/sys/kernel/msgmax") as f:
            assert f.read().strip() != "12345"


@pytest.mark.parametrize("pod,sysctls,match", [
    ({"network": "node"}, {"net.ipv4.ip_forward": "1"}, "host network"),
    ({"network": "node"}, {"kernel.domainname": "x"}, "host UTS"),
    ({"ipc": "node"}, {"kernel.shm_rmid_forced": "1"}, "host IPC"),
])
def test_sysctls_for_host_namespaces_refused(env, pod, sysctls, match):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="hostns", **pod)) as sb:
        with pytest.raises(InvalidArgumentError, match=match):
            sb.create_container(pycri.ContainerConfig(name="x", image=img.id,
                                                      command=("true",), sysctls=sysctls))
        assert_nothing_left(rt, sb)


def test_sysctls_in_user_namespace_pod_refused(env):  # noqa: F811
    rt, img = env
    uns = UserNamespace(uids=(IDMapping(0, 100000, 65536),), gids=(IDMapping(0, 100000, 65536),))
    with rt.run_sandbox(pycri.SandboxConfig(name="usersysctl", user_namespace=uns)) as sb:
        with pytest.raises(InvalidArgumentError, match="user namespace"):
            sb.create_container(pycri.ContainerConfig(name="x", image=img.id, command=("true",),
                                                      sysctls={"kernel.msgmax": "100"}))
        assert_nothing_left(rt, sb)


def test_pod_sysctl_for_host_uts_refused():
    with pytest.raises(InvalidArgumentError, match="host UTS"):
        pycri.SandboxConfig(name="p", network="node", sysctls={"kernel.domainname": "x"})


def test_cli_run_ulimit_sysctl_privileged(cli, busybox_ref):  # noqa: F811
    r = cli("run", "--rm", "-q", "--ulimit", "nofile=1024:2048", "--ulimit", "core=0",
            "--sysctl", "kernel.msgmax=4321", "--privileged", busybox_ref, "sh", "-c",
            "ulimit -n; ulimit -Hn; ulimit -c; cat /proc/sys/kernel/msgmax; "
            "grep CapEff /proc/self/status; ls /dev/kmsg")
    out = r.stdout.split("\n")
    assert out[:4] == ["1024", "2048", "0", "4321"]
    assert int(out[4].split()[1], 16) == int(
        [x for x in open("/proc/self/status") if x.startswith("CapBnd")][0].split()[1], 16)
    if os.path.exists("/dev/kmsg"):
        assert out[5] == "/dev/kmsg"
    for bad in (["--ulimit", "nofile=3:2"], ["--ulimit", "bogus=1"], ["--ulimit", "nofile"],
                ["--sysctl", "kernel.panic=1"], ["--sysctl", "novalue"]):
        r = cli("run", "-q", *bad, busybox_ref, "true", check=False)
        assert r.returncode == 2, (bad, r.stderr)
        assert cli("pods").stdout.strip().splitlines()[1:] == []
