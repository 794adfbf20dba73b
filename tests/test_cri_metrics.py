"""CRI metrics, stats and pod resizing end to end: a real gRPC client on a unix socket,
the server in this process, real pods and containers from the test registry's busybox.

What is checked is what kubelet and critest read: ListMetricDescriptors and
ListPodSandboxMetrics agree on names and labels; the values follow the workload (a
container that burns CPU or holds memory moves them); ContainerStats and
PodSandboxStats fill the fields kubelet's summary API uses; UpdatePodSandboxResources
changes the pod's cgroup all or nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import grpc
import pytest

import imagebuild as ib
from pycri.cri import metrics as m
from pycri.cri._gen import api_pb2
from crihelpers import served_runtime

Code = grpc.StatusCode
T = 30  # seconds per call

# What critest (cri-tools, pkg/validate/pod.go) wants a value for, on a host with
# cgroup v1 memsw accounting and a pod network: every name of its expected set except
# those it lists as unimplemented or optional.
CRITEST_REQUIRED = {
    "container_cpu_cfs_periods_total", "container_cpu_cfs_throttled_periods_total",
    "container_cpu_cfs_throttled_seconds_total", "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total", "container_cpu_user_seconds_total",
    "container_file_descriptors", "container_fs_inodes_free", "container_fs_inodes_total",
    "container_fs_limit_bytes", "container_fs_usage_bytes", "container_last_seen",
    "container_memory_cache", "container_memory_failcnt", "container_memory_failures_total",
    "container_memory_kernel_usage", "container_memory_mapped_file",
    "container_memory_max_usage_bytes", "container_memory_rss", "container_memory_swap",
    "container_memory_usage_bytes", "container_memory_working_set_bytes",
    "container_oom_events_total", "container_processes", "container_sockets",
    "container_spec_cpu_period", "container_spec_cpu_shares",
    "container_spec_memory_limit_bytes", "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds", "container_threads", "container_threads_max",
}
NETWORK = {d.name for d in m.DESCRIPTORS if d.name.startswith("container_network_")}


@pytest.fixture(scope="module")
def busybox_ref(registry):
    ib.push(registry.host, "crimetrics/busybox", "v1", ib.busybox_image())
    return f"{registry.host}/crimetrics/busybox:v1"


@pytest.fixture(scope="module")
def cri(busybox_ref):
    """(runtime stub, server, Runtime); no CNI: pods have loopback only."""
    with served_runtime("crimet", busybox_ref) as s:
        yield s.client.runtime, s.server, s.runtime


def run_pod(r, name: str) -> str:
    cfg = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="metrics-ns",
                                            uid=uuid.uuid4().hex, attempt=1),
        hostname=name,
        linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(pid=api_pb2.CONTAINER))))
    return r.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=T).pod_sandbox_id


def run_container(r, pod: str, image: str, name: str, script: str,
                  resources: api_pb2.LinuxContainerResources | None = None) -> str:
    cfg = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=image),
        command=["sh", "-c", script],
        linux=api_pb2.LinuxContainerConfig(resources=resources) if resources else None)
    cid = r.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=cfg),
                            timeout=T).container_id
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    return cid


def remove_pod(r, pod: str) -> None:
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def pod_metrics(r, pod: str) -> api_pb2.PodSandboxMetrics:
    got = [p for p in r.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest(),
                                              timeout=T).pod_metrics if p.pod_sandbox_id == pod]
    assert len(got) == 1, f"pod {pod} appears {len(got)} times"
    return got[0]


def series(ms, name: str, **labels: str) -> list[api_pb2.Metric]:
    """Metrics called ``name`` whose labels include ``labels``."""
    keys = m._BY_NAME[name].label_keys
    return [x for x in ms if x.name == name
            and all(x.label_values[keys.index(k)] == v for k, v in labels.items())]


def value(ms, name: str, **labels: str) -> int:
    found = series(ms, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value.value


def ctr_metrics(pm: api_pb2.PodSandboxMetrics, cid: str) -> list[api_pb2.Metric]:
    [c] = [c for c in pm.container_metrics if c.container_id == cid]
    return list(c.metrics)


def wait_for(what, check, timeout: float = 20.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last value {got!r}")
        time.sleep(step)


def netns_of(r, pod: str) -> str:
    st = r.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True),
                            timeout=T)
    import json
    return json.loads(st.info["info"])["netns"]


# -- descriptors ----------------------------------------------------------------------


def test_descriptors(cri):
    r, _, _ = cri
    descs = r.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest(), timeout=T).descriptors
    names = [d.name for d in descs]
    assert len(names) == len(set(names)), "a name is described twice"
    for d in descs:
        assert d.help and d.name.startswith("container_")
        assert tuple(d.label_keys[:len(m.BASE_LABELS)]) == m.BASE_LABELS, d.name
        assert len(set(d.label_keys)) == len(d.label_keys), d.name
    assert CRITEST_REQUIRED | NETWORK <= set(names)
    # the optional ones critest asks descriptors for
    assert {"container_blkio_device_usage_total", "container_fs_reads_bytes_total",
            "container_fs_writes_total"} <= set(names)


# -- metrics ---------------------------------------------------------------------------


def test_pod_metrics_agree_with_descriptors(cri, busybox_ref):
    r, _, rt = cri
    pod = run_pod(r, "met-agree")
    cid = run_container(r, pod, busybox_ref, "app", "sleep 300",
                        api_pb2.LinuxContainerResources(cpu_period=100000, cpu_quota=20000,
                                                        cpu_shares=1024,
                                                        memory_limit_in_bytes=64 << 20,
                                                        memory_swap_limit_in_bytes=64 << 20))
    try:
        r.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=[
            "sh", "-c", "mkdir -p /var/lib/t && for i in 1 2 3; do echo hi > /var/lib/t/f$i; done"]),
            timeout=T)
        descs = {d.name: list(d.label_keys) for d in r.ListMetricDescriptors(
            api_pb2.ListMetricDescriptorsRequest(), timeout=T).descriptors}
        pm = pod_metrics(r, pod)
        cm = ctr_metrics(pm, cid)
        seen = set()
        for x in list(pm.metrics) + cm:
            assert x.name in descs, x.name
            assert len(x.label_values) == len(descs[x.name]), x.name
            key = (x.name, tuple(x.label_values))
            assert key not in seen, f"series {key} twice: kubelet's registry would refuse it"
            seen.add(key)
            assert x.timestamp == 0  # read live
        want_type = {d.name: d.type for d in m.DESCRIPTORS}
        assert all(x.metric_type == want_type[x.name] for x in cm)

        # base labels: the container's and the pod's series tell themselves apart
        st = rt.container(cid).status()
        base = dict(zip(m.BASE_LABELS, cm[0].label_values[:6], strict=True))
        assert base["container"] == "app" and base["name"] == cid
        assert base["pod"] == "met-agree" and base["namespace"] == "metrics-ns"
        assert base["image"] == st.image and base["id"].endswith("/" + pod + "/" + cid)
        pod_base = dict(zip(m.BASE_LABELS, pm.metrics[0].label_values[:6], strict=True))
        assert pod_base["container"] == "" and pod_base["name"] == pod
        assert pod_base["id"].endswith("/" + pod)

        names = {x.name for x in cm}
        assert CRITEST_REQUIRED <= names, CRITEST_REQUIRED - names
        # what the container asked for is what the spec series say
        assert value(cm, "container_spec_cpu_quota") == 20000
        assert value(cm, "container_spec_cpu_period") == 100000
        assert value(cm, "container_spec_cpu_shares") == 1024
        assert value(cm, "container_spec_memory_limit_bytes") == 64 << 20
        assert value(cm, "container_processes") == 1  # sleep; the exec has finished
        assert value(cm, "container_threads_max") == 0  # no pids limit
        assert value(cm, "container_start_time_seconds") == st.started_at_ns // 10**9
        assert abs(value(cm, "container_last_seen") - time.time()) < 30
        assert value(cm, "container_ulimits_soft", ulimit="max_open_files") > 0
        # fs: the writable layer holds the three files and /var/lib/t
        fs = series(cm, "container_fs_usage_bytes")[0]
        device = fs.label_values[-1]
        assert device and fs.value.value >= 3 * 4096 // 2
        assert value(cm, "container_fs_inodes_total", device=device) \
            >= value(cm, "container_fs_inodes_free", device=device) > 0
        assert value(cm, "container_fs_limit_bytes", device=device) > fs.value.value
        # page faults: hierarchy includes the container's own
        assert value(cm, "container_memory_failures_total", failure_type="pgfault",
                     scope="hierarchy") >= value(cm, "container_memory_failures_total",
                                                 failure_type="pgfault", scope="container") > 0
        # the pod's series cover the container: at least its processes and memory
        assert value(pm.metrics, "container_processes") >= 1
        assert value(pm.metrics, "container_memory_usage_bytes") \
            >= value(cm, "container_memory_usage_bytes") // 2

        streamed = [p.pod_sandbox_id for chunk in r.StreamPodSandboxMetrics(
            api_pb2.StreamPodSandboxMetricsRequest(), timeout=T) for p in chunk.pod_sandbox_metrics]
        assert pod in streamed
    finally:
        remove_pod(r, pod)
    ids = [p.pod_sandbox_id for p in r.ListPodSandboxMetrics(
        api_pb2.ListPodSandboxMetricsRequest(), timeout=T).pod_metrics]
    assert pod not in ids


def test_metrics_follow_cpu_and_memory(cri, busybox_ref):
    r, _, _ = cri
    pod = run_pod(r, "met-burn")
    # one container spins; the other, once told to, holds ~24 MB of anonymous memory in
    # a shell variable (the echo after sleep keeps the shell from exec'ing sleep)
    cid = run_container(r, pod, busybox_ref, "burn", "while :; do :; done")
    hog = run_container(r, pod, busybox_ref, "hog",
                        "while [ ! -e /go ]; do sleep 1; done; "
                        "x=$(head -c 24000000 /dev/zero | tr '\\0' a); sleep 300; echo ${#x}")
    try:
        def cpu_s():
            return value(ctr_metrics(pod_metrics(r, pod), cid), "container_cpu_usage_seconds_total",
                         cpu="total")
        first = cpu_s()
        assert wait_for(cpu_s, lambda v: v >= first + 1, timeout=30) >= first + 1
        cm = ctr_metrics(pod_metrics(r, pod), cid)
        assert value(cm, "container_cpu_user_seconds_total") >= 1  # a shell loop is user time

        def rss():
            return value(ctr_metrics(pod_metrics(r, pod), hog), "container_memory_rss")
        before = rss()
        assert before < 10_000_000
        r.ExecSync(api_pb2.ExecSyncRequest(container_id=hog, cmd=["touch", "/go"]),
                   timeout=T)
        assert wait_for(rss, lambda v: v >= before + 20_000_000, timeout=20) \
            >= before + 20_000_000
        cm = ctr_metrics(pod_metrics(r, pod), hog)
        assert value(cm, "container_memory_working_set_bytes") >= 20_000_000
        assert value(cm, "container_memory_max_usage_bytes") >= 20_000_000
        # the pod's own series count both containers
        assert value(pod_metrics(r, pod).metrics, "container_memory_rss") >= 20_000_000
    finally:
        remove_pod(r, pod)


def test_pod_network_metrics(cri, busybox_ref):
    r, _, _ = cri
    pod = run_pod(r, "met-net")
    cid = run_container(r, pod, busybox_ref, "app", "sleep 300")
    netns = netns_of(r, pod)
    try:
        # no CNI here: give the pod a veth pair of its own (both ends inside), with a
        # static neighbour so that datagrams leave vm0 and arrive on vm1
        for cmd in (["ip", "link", "add", "vm0", "type", "veth", "peer", "name", "vm1"],
                    ["ip", "link", "set", "vm0", "up"], ["ip", "link", "set", "vm1", "up"],
                    ["ip", "addr", "add", "10.77.0.1/24", "dev", "vm0"],
                    ["ip", "neigh", "add", "10.77.0.2", "lladdr", "02:00:00:00:00:02",
                     "dev", "vm0"]):
            subprocess.run(["nsenter", f"--net={netns}", *cmd], check=True, timeout=10)

        def tx() -> int:
            return value(pod_metrics(r, pod).metrics, "container_network_transmit_bytes_total",
                         interface="vm0")
        before = tx()
        payload = 1000
        subprocess.run(["nsenter", f"--net={netns}", "python3", "-c",
                        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                        f"for _ in range(50): s.sendto(b'x' * {payload}, ('10.77.0.2', 9))"],
                       check=True, timeout=10)
        after = tx()
        assert after >= before + 50 * payload
        pm = pod_metrics(r, pod)
        assert value(pm.metrics, "container_network_transmit_packets_total",
                     interface="vm0") >= 50
        assert value(pm.metrics, "container_network_receive_bytes_total",
                     interface="vm1") >= 50 * payload
        assert not series(pm.metrics, "container_network_receive_bytes_total", interface="lo")
        # network is the pod's: no container series carries it
        assert not any(x.name in NETWORK for x in ctr_metrics(pm, cid))

        ps = r.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod),
                               timeout=T).stats
        net = ps.linux.network
        assert net.timestamp > 0 and net.default_interface.name == "vm0"
        assert net.default_interface.tx_bytes.value >= after
        assert [(i.name, i.rx_bytes.value >= 50 * payload) for i in net.interfaces] \
            == [("vm1", True)]
    finally:
        remove_pod(r, pod)


# -- stats ------------------------------------------------------------------------------


def test_stats_fill_what_kubelet_reads(cri, busybox_ref):
    r, _, rt = cri
    pod = run_pod(r, "met-stats")
    cid = run_container(r, pod, busybox_ref, "burn", "while :; do :; done",
                        api_pb2.LinuxContainerResources(memory_limit_in_bytes=64 << 20))
    try:
        def cstats():
            return r.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid),
                                    timeout=T).stats
        first = cstats()
        assert first.cpu.usage_core_nano_seconds.value > 0
        # a rate needs two samples a window apart
        time.sleep(m.CPU_WINDOW + 0.3)
        st = cstats()
        assert st.cpu.HasField("usage_nano_cores")
        # the busy loop gets a good share of a core even on a loaded machine
        assert st.cpu.usage_nano_cores.value > 20_000_000
        assert st.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value
        # asked again within the window: the same rate, from the same samples
        assert cstats().cpu.usage_nano_cores.value == st.cpu.usage_nano_cores.value
        mem = st.memory
        # the kernel flushes a memory cgroup's per-CPU counters (memory.stat) lazily,
        # every 2 s or so: a young container's rss and page faults may still read 0
        deadline = time.monotonic() + 6
        while not (mem.rss_bytes.value and mem.page_faults.value) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
            mem = cstats().memory
        assert mem.timestamp > 0 and mem.usage_bytes.value >= mem.working_set_bytes.value > 0
        assert mem.available_bytes.value == (64 << 20) - mem.working_set_bytes.value
        assert mem.HasField("rss_bytes") and mem.rss_bytes.value > 0
        assert mem.page_faults.value > 0 and mem.HasField("major_page_faults")
        assert st.writable_layer.fs_id.mountpoint == rt.root
        assert st.swap.timestamp > 0 and st.swap.HasField("swap_usage_bytes")
        unified = rt.cgroups().hierarchy.v2_root
        if unified and os.path.exists(os.path.join(unified, "cpu.pressure")):
            # pressure files in the unified mount: the stats carry them
            assert st.cpu.HasField("psi") and st.memory.HasField("psi")
            assert st.io.timestamp > 0 and st.io.HasField("psi")

        ps = r.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod),
                               timeout=T).stats
        linux = ps.linux
        assert linux.cpu.usage_core_nano_seconds.value >= st.cpu.usage_core_nano_seconds.value
        assert linux.memory.working_set_bytes.value > 0 and linux.memory.rss_bytes.value > 0
        assert linux.process.process_count.value == 1
        assert not linux.HasField("network")  # loopback only: nothing to report
        assert [c.attributes.id for c in linux.containers] == [cid]
        time.sleep(m.CPU_WINDOW + 0.3)
        ps = r.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod),
                               timeout=T).stats
        assert ps.linux.cpu.usage_nano_cores.value > 200_000_000
        listed = r.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
            filter=api_pb2.PodSandboxStatsFilter(id=pod)), timeout=T).stats
        assert [s.attributes.id for s in listed] == [pod]
    finally:
        remove_pod(r, pod)


def test_stats_of_a_created_container(cri, busybox_ref):
    r, _, _ = cri
    pod = run_pod(r, "met-created")
    cfg = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="idle"),
                                  image=api_pb2.ImageSpec(image=busybox_ref), command=["true"])
    cid = r.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=cfg),
                            timeout=T).container_id
    try:
        st = r.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=T).stats
        assert st.attributes.id == cid and st.cpu.timestamp > 0 and st.memory.timestamp > 0
        listed = r.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=T).stats
        assert cid in [s.attributes.id for s in listed]
        cm = ctr_metrics(pod_metrics(r, pod), cid)
        # created, not started: its process exists already, held before execve
        assert value(cm, "container_processes") == 1
        assert "container_ulimits_soft" not in {x.name for x in cm}  # no pid recorded yet
    finally:
        remove_pod(r, pod)


def test_unknown_objects(cri):
    r, _, _ = cri
    missing = "ab" * 32

    def code(call, req) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as exc:
            call(req, timeout=T)
        return exc.value.code()

    assert code(r.PodSandboxStats, api_pb2.PodSandboxStatsRequest(pod_sandbox_id=missing)) \
        == Code.NOT_FOUND
    assert code(r.ContainerStats, api_pb2.ContainerStatsRequest(container_id=missing)) \
        == Code.NOT_FOUND
    assert code(r.UpdatePodSandboxResources, api_pb2.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=missing, resources=api_pb2.LinuxContainerResources(cpu_shares=512))) \
        == Code.NOT_FOUND
    assert code(r.UpdatePodSandboxResources, api_pb2.UpdatePodSandboxResourcesRequest()) \
        == Code.INVALID_ARGUMENT
    assert code(r.PodSandboxStats, api_pb2.PodSandboxStatsRequest()) == Code.INVALID_ARGUMENT
    assert r.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(id=missing)), timeout=T).stats == []


# -- UpdatePodSandboxResources -----------------------------------------------------------


def test_update_pod_sandbox_resources(cri, busybox_ref):
    r, _, rt = cri
    pod = run_pod(r, "met-resize")
    cid = run_container(r, pod, busybox_ref, "app", "sleep 300")
    cg = rt.cgroups().pod(rt.sandbox(pod).id)

    def spec() -> dict[str, int]:
        ms = pod_metrics(r, pod).metrics
        return {n: value(ms, "container_spec_" + n) for n in
                ("cpu_shares", "cpu_period", "cpu_quota", "memory_limit_bytes")
                if series(ms, "container_spec_" + n)}

    def update(**kw):
        return r.UpdatePodSandboxResources(api_pb2.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod, **kw), timeout=T)

    try:
        # containers' sum plus the pod's overhead
        update(resources=api_pb2.LinuxContainerResources(
                   cpu_shares=512, cpu_period=100000, cpu_quota=50000,
                   memory_limit_in_bytes=200 << 20),
               overhead=api_pb2.LinuxContainerResources(
                   cpu_shares=100, cpu_period=100000, cpu_quota=10000,
                   memory_limit_in_bytes=50 << 20))
        assert spec() == {"cpu_shares": 612, "cpu_period": 100000, "cpu_quota": 60000,
                          "memory_limit_bytes": 250 << 20}
        if not cg.v2:  # the files themselves, where this host keeps them
            assert cg.read("cpu", "cpu.shares").strip() == "612"
            assert cg.read("memory", "memory.limit_in_bytes").strip() == str(250 << 20)
        assert rt.sandbox(pod).record()["resources"]["cpu_shares"] == 612

        # bad input: typed errors, and nothing changes
        with pytest.raises(grpc.RpcError) as exc:
            update(resources=api_pb2.LinuxContainerResources(cpu_shares=1))
        assert exc.value.code() == Code.INVALID_ARGUMENT and "cpu_shares" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            update(resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=100 << 20,
                                                             memory_swap_limit_in_bytes=50 << 20))
        assert exc.value.code() == Code.INVALID_ARGUMENT
        # all or nothing: shares are written first, then the kernel refuses a cpu set
        # this machine does not have, and the shares go back
        with pytest.raises(grpc.RpcError) as exc:
            update(resources=api_pb2.LinuxContainerResources(cpu_shares=300,
                                                             cpuset_cpus="1000"))
        assert exc.value.code() == Code.INVALID_ARGUMENT
        assert spec()["cpu_shares"] == 612
        assert rt.sandbox(pod).record()["resources"]["cpu_shares"] == 612

        update()  # nothing asked: nothing changes
        assert spec()["memory_limit_bytes"] == 250 << 20
        # the container keeps running under the pod's new limits
        assert r.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid),
                                 timeout=T).status.state == api_pb2.CONTAINER_RUNNING
    finally:
        remove_pod(r, pod)


# -- the pieces on their own ---------------------------------------------------------------


def test_cpu_rates_need_a_window():
    rates = m.CpuRates(window=1.0, ttl=10.0)
    s = 10**9
    assert rates.rate("a", 0, 0) is None            # first sample: baseline only
    assert rates.rate("a", s // 2, 10**8) is None   # inside the window, nothing yet
    assert rates.rate("a", 2 * s, 10**9) == 5 * 10**8   # 1e9 ns of CPU over 2 s
    assert rates.rate("a", 2 * s + 1, 5 * 10**9) == 5 * 10**8  # inside the new window
    assert rates.rate("a", 3 * s, 2 * 10**9) == 10**9
    assert rates.rate("a", 4 * s, 10) is None       # counter went back: a new baseline
    assert rates.rate("b", 4 * s, 0) is None and len(rates) == 2
    assert rates.rate("c", 30 * s, 0) is None and len(rates) == 1  # a and b expired


def test_parse_net_dev():
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
        "errs drop fifo colls carrier compressed\n"
        "    lo:     100       2    0    0    0     0          0         0      100       2"
        "    0    0    0     0       0          0\n"
        "  eth0: 1500 10 1 2 0 0 0 0 3000 20 3 4 0 0 0 0\n"
        "  bad: 1 2 3\n")
    [eth] = m.parse_net_dev(text)
    assert eth == m.NetDev("eth0", 1500, 10, 1, 2, 3000, 20, 3, 4)


def test_pod_net_dev_refuses_a_process_elsewhere(tmp_path):
    # this process is in the host's namespace, not in a pinned pod namespace
    p = tmp_path / "netns"
    p.write_text("")
    assert m.pod_net_dev(str(p), [os.getpid()]) is None
    assert m.pod_net_dev("", [os.getpid()]) is None


def test_fd_counts_sees_sockets():
    a, b = socket.socketpair()
    try:
        fds, socks = m.fd_counts([os.getpid()])
        assert fds >= 3 and socks >= 2
    finally:
        a.close()
        b.close()


def _files(d, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_read_cgroup_v2_files(tmp_path):
    """The v2 reader on a directory laid out like a v2 container cgroup."""
    from pycri.cgroup import Cgroup, Hierarchy, shares_to_weight

    _files(tmp_path / "pod" / "ctr", {
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                    "nr_periods 40\nnr_throttled 3\nthrottled_usec 1500000\n",
        "cpu.max": "20000 100000\n", "cpu.weight": "39\n",
        "memory.current": "50000000\n", "memory.peak": "60000000\n",
        "memory.events": "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n",
        "memory.max": "67108864\n", "memory.swap.max": "max\n", "memory.low": "0\n",
        "memory.swap.current": "4096\n",
        "memory.stat": "anon 30000000\nfile 15000000\nfile_mapped 1000000\nkernel 2000000\n"
                       "inactive_file 10000000\npgfault 900\npgmajfault 9\n",
        "pids.max": "max\n", "cgroup.procs": "11\n12\n", "cgroup.threads": "11\n12\n13\n",
        "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
        "cpu.pressure": "some avg10=1.50 avg60=0.50 avg300=0.10 total=3000000\n"
                        "full avg10=0.00 avg60=0.00 avg300=0.00 total=1000\n",
    })
    s = m.read_cgroup(Cgroup(Hierarchy(2, {}, str(tmp_path)), "pod/ctr"))
    assert s is not None
    assert (s.cpu_ns, s.cpu_user_ns, s.cpu_system_ns) == (2_500_000_000, 2 * 10**9, 5 * 10**8)
    assert (s.cfs_periods, s.cfs_throttled_periods, s.cfs_throttled_ns) == (40, 3, 1_500_000_000)
    assert (s.cpu_quota_us, s.cpu_period_us) == (20000, 100000)
    # weight 39 is what 1024 shares became; shares that map to it again come back
    assert shares_to_weight(s.cpu_shares) == 39 and 990 <= s.cpu_shares <= 1024
    assert s.memory_working_set == 40_000_000 and s.memory_max_usage == 60_000_000
    assert (s.memory_rss, s.memory_cache, s.memory_mapped_file, s.memory_kernel) == (
        30_000_000, 15_000_000, 1_000_000, 2_000_000)
    assert (s.memory_failcnt, s.oom_kills, s.memory_swap) == (7, 1, 4096)
    assert (s.memory_limit, s.memory_swap_limit, s.memory_reservation) == (64 << 20, 0, 0)
    assert s.memory_available == (64 << 20) - 40_000_000
    assert (s.pgfault, s.pgmajfault, s.threads_max) == (900, 9, 0)
    assert s.pids == [11, 12] and s.threads == 3
    assert s.io == [m.IoDevice(8, 0, 4096, 8192, 1, 2)]
    assert s.psi["cpu"] == m.Psi(3_000_000, 1000, (1.5, 0.5, 0.1), (0.0, 0.0, 0.0))
    assert "memory" not in s.psi  # no such file: left out, not zero

    out = m._Series(("c", "/pod/ctr", "img", "id", "ns", "pod"))
    m._cgroup_series(out, s)
    got = {(x.name, tuple(x.label_values[6:])): x.value.value for x in out.metrics}
    assert got[("container_cpu_usage_seconds_total", ("total",))] == 2
    assert got[("container_cpu_cfs_throttled_seconds_total", ())] == 1
    assert got[("container_pressure_cpu_waiting_seconds_total", ())] == 3
    assert got[("container_spec_cpu_quota", ())] == 20000
    assert ("container_pressure_memory_waiting_seconds_total", ()) not in got
    assert got[("container_memory_failures_total", ("pgmajfault", "hierarchy"))] == 9


def test_read_cgroup_v1_files(tmp_path):
    """The v1 reader: one directory per controller, "unlimited" as a huge number."""
    from pycri.cgroup import Cgroup, Hierarchy

    roots = {c: str(tmp_path / c) for c in ("cpu", "cpuacct", "memory", "pids", "blkio")}
    _files(tmp_path / "cpuacct" / "p" / "c", {"cpuacct.usage": "3000000000\n",
                                               "cpuacct.stat": "user 150\nsystem 50\n"})
    _files(tmp_path / "cpu" / "p" / "c", {"cpu.stat": "nr_periods 5\nnr_throttled 0\n"
                                                      "throttled_time 0\n",
                                          "cpu.cfs_period_us": "100000\n",
                                          "cpu.cfs_quota_us": "-1\n", "cpu.shares": "512\n"})
    _files(tmp_path / "memory" / "p" / "c", {
        "memory.usage_in_bytes": "8000000\n", "memory.max_usage_in_bytes": "9000000\n",
        "memory.failcnt": "0\n", "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.soft_limit_in_bytes": "9223372036854771712\n",
        "memory.stat": "pgfault 10\npgmajfault 1\ntotal_rss 5000000\ntotal_cache 3000000\n"
                       "total_mapped_file 0\ntotal_swap 0\ntotal_inactive_file 2000000\n"
                       "total_pgfault 10\ntotal_pgmajfault 1\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"})
    _files(tmp_path / "pids" / "p" / "c", {"pids.max": "100\n", "cgroup.procs": "5\n",
                                           "tasks": "5\n6\n"})
    _files(tmp_path / "blkio" / "p" / "c", {
        "blkio.throttle.io_service_bytes_recursive": "8:0 Read 100\n8:0 Write 200\n"
                                                     "Total 300\n",
        "blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 2\nTotal 3\n"})
    s = m.read_cgroup(Cgroup(Hierarchy(1, roots), "p/c"))
    assert s is not None
    # no cpuacct.usage_user/_sys here: the tick counts stand in
    assert (s.cpu_ns, s.cpu_user_ns, s.cpu_system_ns) == (3 * 10**9, 150 * 10**9 // m._CLK_TCK,
                                                          50 * 10**9 // m._CLK_TCK)
    assert (s.cpu_quota_us, s.cpu_shares) == (0, 512)
    assert (s.memory_limit, s.memory_swap_limit, s.memory_reservation) == (0, 0, 0)
    assert s.memory_available is None  # no limit, nothing to count down to
    assert (s.memory_working_set, s.oom_kills, s.threads_max) == (6_000_000, 2, 100)
    assert s.pids == [5] and s.threads == 2
    assert s.io == [m.IoDevice(8, 0, 100, 200, 1, 2)]
    assert s.psi == {} and s.memory_kernel is None
    assert m.read_cgroup(Cgroup(Hierarchy(1, roots), "p/gone")) is None
