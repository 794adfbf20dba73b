"""Sandbox and container inputs: hostile values are refused on construction (SECURITY.md 12-16)."""

from __future__ import annotations

import json

import pytest

from pycri.config import (
    NODE,
    Auth,
    ContainerConfig,
    DNSConfig,
    IDMapping,
    Mount,
    PortMapping,
    Resources,
    SandboxConfig,
    UserNamespace,
    from_json,
    sysctl_namespace,
    to_json,
)
from pycri.errors import InvalidArgumentError


def test_sysctl_namespaces():
    assert sysctl_namespace("net.ipv4.ip_forward") == "net"
    assert sysctl_namespace("kernel.shmmax") == "ipc"
    assert sysctl_namespace("fs.mqueue.msg_max") == "ipc"
    assert sysctl_namespace("kernel.domainname") == "uts"


@pytest.mark.parametrize("sysctls,network,ipc", [
    ({"kernel.core_pattern": "|/evil"}, "pod", "pod"),          # host-wide
    ({"vm.swappiness": "1"}, "pod", "pod"),
    ({"kernel.shm_rmid_forced": "1+kernel.core_pattern=x"}, "pod", "pod"),  # CVE-2022-0811
    ({"kernel.shmmax": "1=2"}, "pod", "pod"),
    ({"net.ipv4.ip_forward": "1\nkernel.core_pattern=x"}, "pod", "pod"),
    ({"net.ipv4.ip_forward": "1"}, NODE, "pod"),                 # shared with the host
    ({"kernel.msgmax": "1"}, "pod", NODE),
    ({"net/../../kernel/core_pattern": "x"}, "pod", "pod"),
    ({"": "1"}, "pod", "pod"),
])
def test_hostile_sysctls(sysctls, network, ipc):
    with pytest.raises(InvalidArgumentError):
        SandboxConfig(name="p", sysctls=sysctls, network=network, ipc=ipc)


@pytest.mark.parametrize("parent", ["../escape", "a/../../b", "a//b", "./a", "a/\nb", "a/b c"])
def test_hostile_cgroup_parent(parent):
    with pytest.raises(InvalidArgumentError):
        SandboxConfig(name="p", cgroup_parent=parent)


def test_cgroup_parent_normalised():
    assert SandboxConfig(name="p", cgroup_parent="/kubepods/burstable").cgroup_parent == \
        "kubepods/burstable"


@pytest.mark.parametrize("unified", [
    {"../cgroup.procs": "1"}, {"cgroup.procs": "1"}, {"memory.max": "1\n2"},
    {"a/b": "1"}, {"": "1"},
])
def test_hostile_unified(unified):
    with pytest.raises(InvalidArgumentError):
        Resources(unified=unified)


@pytest.mark.parametrize("sizes", [{"2M": 1}, {"huge": 1}, {"2MB": -2}])
def test_bad_hugepages(sizes):
    with pytest.raises(InvalidArgumentError):
        Resources(hugepage_limits=sizes)


@pytest.mark.parametrize("kw", [
    {"container_path": "relative", "host_path": "/tmp"},
    {"container_path": "/a/../etc", "host_path": "/tmp"},
    {"container_path": "/proc/sys", "host_path": "/tmp"},
    {"container_path": "/sys/fs/cgroup", "host_path": "/tmp"},
    {"container_path": "/", "host_path": "/tmp"},
    {"container_path": "/data", "host_path": "tmp"},
    {"container_path": "/data", "host_path": "/tmp", "propagation": "shared"},
    {"container_path": "/data", "host_path": "/tmp", "recursive_readonly": True},
    {"container_path": "/data", "host_path": "/tmp", "readonly": True, "recursive_readonly": True,
     "propagation": "rslave"},
])
def test_hostile_mounts(kw):
    with pytest.raises(InvalidArgumentError):
        Mount(**kw)


def test_good_mount_normalised():
    assert Mount("/data/./x/", "/tmp").container_path == "/data/x"


def test_run_as_group_without_user():
    with pytest.raises(InvalidArgumentError, match="run_as_group"):
        ContainerConfig(name="c", image="i", run_as_group=5)
    assert ContainerConfig(name="c", image="i", run_as_user=1, run_as_group=5).run_as_group == 5


@pytest.mark.parametrize("uids,gids", [
    ((IDMapping(0, 100000, 65536), IDMapping(65536, 200000, 10)), (IDMapping(0, 100000, 65536),)),
    ((IDMapping(1, 100000, 65536),), (IDMapping(0, 100000, 65536),)),
    ((IDMapping(0, 100000, 65536),), ()),
    ((IDMapping(0, 2**32 - 2, 10),), (IDMapping(0, 100000, 65536),)),
])
def test_bad_user_namespaces(uids, gids):
    with pytest.raises(InvalidArgumentError):
        UserNamespace(uids, gids)


def test_userns_with_host_network_refused():
    userns = UserNamespace((IDMapping(0, 100000, 65536),), (IDMapping(0, 100000, 65536),))
    with pytest.raises(InvalidArgumentError):
        SandboxConfig(name="p", network=NODE, user_namespace=userns)


@pytest.mark.parametrize("kw", [
    {"name": "bad name"}, {"name": "../x"}, {"command": "sh -c x"},
    {"env": {"A=B": "1"}}, {"env": {"A": "x\0y"}}, {"working_dir": "rel"},
    {"cap_add": ("CAP_$(x)",)}, {"stdin_once": True}, {"pid": "weird"},
    {"resources": None},
])
def test_bad_container_configs(kw):
    args = {"name": "c", "image": "img", **kw}
    with pytest.raises(InvalidArgumentError):
        ContainerConfig(**args)


def test_other_inputs():
    with pytest.raises(InvalidArgumentError):
        DNSConfig(servers=("1.1.1.1\nnameserver 6.6.6.6",))
    with pytest.raises(InvalidArgumentError):
        PortMapping(container_port=70000)
    with pytest.raises(InvalidArgumentError):
        Auth(username="u\n", password="p")
    with pytest.raises(InvalidArgumentError):
        Resources(cpu_shares=1)
    with pytest.raises(InvalidArgumentError):
        Resources(cpuset_cpus="0-1;rm")


def test_json_round_trip_of_full_configs():
    """Records hold to_json output after a trip through the json module (tuples become
    lists); from_json must give back an equal, equally typed config."""
    ctr = ContainerConfig(
        name="c", image="sha256:" + "a" * 64, command=["sh", "-c", "x"], args=("a",),
        env={"A": "1", "B": "2"}, labels={"a": "b"}, annotations={"c": "d"},
        mounts=(Mount(container_path="/x", host_path="/tmp", readonly=True,
                      uid_mappings=(IDMapping(0, 1000, 10),),
                      gid_mappings=(IDMapping(0, 1000, 10),)),),
        resources=Resources(cpu_shares=100, hugepage_limits={"2MB": 1 << 21},
                            unified={"memory.high": "1"}),
        run_as_user=5, rlimits={"nofile": (10, 20)}, masked_paths=("/a",), readonly_paths=(),
        sysctls={"net.ipv4.ip_forward": "1"})
    pod = SandboxConfig(name="p", namespace="n", uid="u", dns=DNSConfig(servers=("1.1.1.1",)),
                        port_mappings=(PortMapping(container_port=80, host_port=8080),),
                        labels={"x": "y"},
                        user_namespace=UserNamespace(uids=(IDMapping(0, 100000, 65536),),
                                                     gids=(IDMapping(0, 100000, 65536),)))
    for cfg in (ctr, ContainerConfig(name="d", image="i"), pod, SandboxConfig(name="q")):
        doc = to_json(cfg)
        assert isinstance(doc, dict) and doc["name"] == cfg.name
        back = from_json(type(cfg), json.loads(json.dumps(doc)))
        assert back == cfg and repr(back) == repr(cfg)
        assert to_json(back) == doc
    assert to_json(ctr)["env"] == [["A", "1"], ["B", "2"]]
    assert to_json(ctr)["mounts"][0]["uid_mappings"] == [
        {"container_id": 0, "host_id": 1000, "length": 10}]
    assert from_json(ContainerConfig, to_json(ctr)).masked_paths == ("/a",)
