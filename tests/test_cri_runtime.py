"""The CRI RuntimeService end to end: a real gRPC client, the server in this process on
a unix socket, a busybox image from the test registry, real pods and containers.

Streaming (exec, port-forward) goes through the URLs the server hands out, with the
SPDY clients of test_streaming.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid

import grpc
import pytest

import imagebuild as ib
from pycri.cri._gen import api_pb2
from crihelpers import served_runtime
from test_streaming import SpdyClient, spdy_exec, spdy_forward

Code = grpc.StatusCode
T = 30  # seconds per call


@pytest.fixture(scope="module")
def busybox_ref(registry):
    ib.push(registry.host, "crirt/busybox", "v1", ib.busybox_image())
    return f"{registry.host}/crirt/busybox:v1"


@pytest.fixture(scope="module")
def cri(busybox_ref):
    """(runtime stub, image stub, server, log dir) with busybox pulled; no CNI (pods
    get their own network namespace with loopback only)."""
    with served_runtime("crirt", busybox_ref) as s:
        yield s.client.runtime, s.client.images, s.server, os.path.join(s.base, "logs")


def pod_config(name: str, logs: str = "", **labels: str) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, namespace="ns", uid=uuid.uuid4().hex,
                                            attempt=1),
        hostname=name, log_directory=logs, labels=labels, annotations={"note": name},
        linux=api_pb2.LinuxPodSandboxConfig(security_context=api_pb2.LinuxSandboxSecurityContext(
            namespace_options=api_pb2.NamespaceOption(pid=api_pb2.CONTAINER))))


def run_pod(r, name: str, logs: str = "", **labels: str) -> str:
    return r.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod_config(name, logs, **labels)),
                           timeout=T).pod_sandbox_id


def ctr_config(name: str, image: str, cmd: list[str], **kw) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name=name, attempt=2),
                                   image=api_pb2.ImageSpec(image=image), command=cmd, **kw)


def create(r, pod: str, cfg: api_pb2.ContainerConfig) -> str:
    pod_cfg = r.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=T)
    assert pod_cfg.status.id == pod
    return r.CreateContainer(api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=cfg),
                             timeout=T).container_id


def cstatus(r, cid: str, verbose: bool = False):
    return r.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=verbose),
                             timeout=T)


def code_of(call, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call(*args, timeout=T, **kw)
    return exc.value.code()


def test_pod_lifecycle_status_and_list(cri):
    r, _, _, _ = cri
    a = run_pod(r, "pod-a", tier="web")
    b = run_pod(r, "pod-b", tier="db")
    st = r.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=a, verbose=True),
                            timeout=T)
    s = st.status
    assert s.id == a and s.state == api_pb2.SANDBOX_READY
    assert (s.metadata.name, s.metadata.namespace, s.metadata.attempt) == ("pod-a", "ns", 1)
    assert dict(s.labels) == {"tier": "web"} and dict(s.annotations) == {"note": "pod-a"}
    assert s.created_at > 0
    assert s.linux.namespaces.options.pid == api_pb2.CONTAINER
    assert s.linux.namespaces.options.network == api_pb2.POD
    assert "info" in st.info
    # a unique prefix names the pod too
    assert r.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=a[:16]),
                              timeout=T).status.id == a

    def listed(**f) -> set[str]:
        flt = api_pb2.PodSandboxFilter(**f)
        return {p.id for p in r.ListPodSandbox(api_pb2.ListPodSandboxRequest(filter=flt),
                                               timeout=T).items}

    assert {a, b} <= listed()
    assert listed(id=a[:10]) == {a}
    assert listed(label_selector={"tier": "db"}) == {b}
    streamed = {p.id for m in r.StreamPodSandboxes(api_pb2.StreamPodSandboxesRequest(), timeout=T)
                for p in m.pod_sandboxes}
    assert {a, b} <= streamed

    for _ in range(2):  # idempotent
        r.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=a), timeout=T)
    ready = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
    notready = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_NOTREADY)
    assert a in listed(state=notready) and a not in listed(state=ready)
    assert b in listed(state=ready)
    for pod in (a, b):
        for _ in range(2):
            r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)
    assert code_of(r.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id=a)) \
        == Code.NOT_FOUND
    assert not ({a, b} & listed())


def test_bad_pod_configs_are_invalid(cri):
    r, _, _, _ = cri
    bad = pod_config("sysctl")
    bad.linux.sysctls["kernel.panic"] = "1"  # not namespaced: would change the host
    assert code_of(r.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=bad)) \
        == Code.INVALID_ARGUMENT
    bad = pod_config("plus")
    bad.linux.sysctls["kernel.shm_rmid_forced"] = "1+kernel.core_pattern=|/x"
    assert code_of(r.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=bad)) \
        == Code.INVALID_ARGUMENT
    bad = pod_config("parent")
    bad.linux.cgroup_parent = "../../escape"
    assert code_of(r.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=bad)) \
        == Code.INVALID_ARGUMENT
    assert code_of(r.RunPodSandbox, api_pb2.RunPodSandboxRequest(
        config=pod_config("handler"), runtime_handler="kata")) == Code.INVALID_ARGUMENT
    assert code_of(r.RunPodSandbox, api_pb2.RunPodSandboxRequest(
        config=api_pb2.PodSandboxConfig())) == Code.INVALID_ARGUMENT
    assert list(r.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=T).items) == []


def test_container_lifecycle(cri, busybox_ref):
    r, images, _, logs = cri
    pod = run_pod(r, "ctr-life", logs)
    image_id = images.ImageStatus(api_pb2.ImageStatusRequest(
        image=api_pb2.ImageSpec(image=busybox_ref)), timeout=T).image.id
    cfg = ctr_config("main", busybox_ref, ["sh", "-c", "echo hello; echo oops >&2; exec sleep 300"],
                     envs=[api_pb2.KeyValue(key="GREETING", value=b"hi")], working_dir="/tmp",
                     labels={"role": "main"}, annotations={"a": "b"}, log_path="main/0.log")
    cid = create(r, pod, cfg)
    s = cstatus(r, cid).status
    assert s.state == api_pb2.CONTAINER_CREATED and s.created_at > 0 and s.started_at == 0
    assert (s.metadata.name, s.metadata.attempt) == ("main", 2)
    assert s.image_ref == image_id and s.image.image == busybox_ref
    assert s.log_path == os.path.join(logs, "main/0.log")
    assert dict(s.labels) == {"role": "main"} and dict(s.annotations) == {"a": "b"}
    # the same name and attempt again in the same pod: refused
    assert code_of(r.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=cfg)) == Code.ALREADY_EXISTS

    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    st = cstatus(r, cid, verbose=True)
    assert st.status.state == api_pb2.CONTAINER_RUNNING and st.status.started_at > 0
    assert '"pid"' in st.info["info"]

    res = r.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c",
                                             "echo $GREETING; pwd; echo e >&2; exit 3"]), timeout=T)
    assert (res.stdout, res.stderr, res.exit_code) == (b"hi\n/tmp\n", b"e\n", 3)
    t0 = time.monotonic()
    assert code_of(r.ExecSync, api_pb2.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"],
                                                       timeout=1)) == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 15

    def listed(**f) -> set[str]:
        flt = api_pb2.ContainerFilter(**f)
        return {c.id for c in r.ListContainers(api_pb2.ListContainersRequest(filter=flt),
                                               timeout=T).containers}

    running = api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)
    exited = api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED)
    assert listed() >= {cid}
    assert listed(id=cid[:12]) == {cid}
    assert listed(pod_sandbox_id=pod) == {cid} == listed(pod_sandbox_id=pod[:12])
    assert listed(state=running, label_selector={"role": "main"}) == {cid}
    assert listed(label_selector={"role": "other"}) == set()
    assert listed(pod_sandbox_id="ff" * 32) == set()

    for _ in range(2):  # idempotent
        r.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2), timeout=T)
    s = cstatus(r, cid).status
    assert s.state == api_pb2.CONTAINER_EXITED and s.finished_at >= s.started_at
    assert s.exit_code == 137  # pid 1 ignores SIGTERM: killed after the grace period
    assert listed(state=exited) >= {cid}
    with open(s.log_path) as f:
        text = f.read()
    assert " stdout F hello\n" in text and " stderr F oops\n" in text
    for _ in range(2):
        r.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=T)
    assert code_of(r.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=cid)) \
        == Code.NOT_FOUND
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def test_exit_code_and_security_context(cri, busybox_ref):
    r, _, _, _ = cri
    pod = run_pod(r, "ctr-sec")
    sc = api_pb2.LinuxContainerSecurityContext(
        run_as_user=api_pb2.Int64Value(value=1000), run_as_group=api_pb2.Int64Value(value=2000),
        supplemental_groups=[3000], readonly_rootfs=True, no_new_privs=True,
        capabilities=api_pb2.Capability(drop_capabilities=["ALL"]),
        seccomp=api_pb2.SecurityProfile(profile_type=api_pb2.SecurityProfile.RuntimeDefault))
    cid = create(r, pod, ctr_config(
        "sec", busybox_ref, ["sh", "-c", "id -u; id -g; id -G; grep -E '^(CapEff|NoNewPrivs|Seccomp):' "
                              "/proc/self/status; touch /x 2>/dev/null || echo ro; exit 7"],
        linux=api_pb2.LinuxContainerConfig(security_context=sc)))
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    deadline = time.monotonic() + 20
    while (s := cstatus(r, cid).status).state != api_pb2.CONTAINER_EXITED:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert s.exit_code == 7 and s.reason == "Error"
    out = "".join(line.split(" ", 3)[3] for line in open(s.log_path).read().splitlines(True))
    lines = out.split()
    assert lines[:3] == ["1000", "2000", "2000"] and "3000" in lines
    assert "CapEff:\t0000000000000000" in out and "NoNewPrivs:\t1" in out
    assert "Seccomp:\t2" in out and out.rstrip().endswith("ro")

    # run_as_group without a user: refused before anything is made
    bad = api_pb2.LinuxContainerSecurityContext(run_as_group=api_pb2.Int64Value(value=5))
    assert code_of(r.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=ctr_config("bad", busybox_ref, ["true"],
                                              linux=api_pb2.LinuxContainerConfig(
                                                  security_context=bad)))) == Code.INVALID_ARGUMENT
    assert code_of(r.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=ctr_config("badlog", busybox_ref, ["true"],
                                              log_path="../../etc/x"))) == Code.INVALID_ARGUMENT
    assert code_of(r.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=ctr_config("noimage", "nosuch/image:v9", ["true"]))) \
        == Code.NOT_FOUND
    assert code_of(r.CreateContainer, api_pb2.CreateContainerRequest(
        pod_sandbox_id="ab" * 32, config=ctr_config("nopod", busybox_ref, ["true"]))) \
        == Code.NOT_FOUND
    assert code_of(r.StartContainer, api_pb2.StartContainerRequest(container_id=cid)) \
        == Code.FAILED_PRECONDITION  # exited, not created
    assert code_of(r.ExecSync, api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"])) \
        == Code.FAILED_PRECONDITION
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)
    assert code_of(r.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=cid)) \
        == Code.NOT_FOUND  # removing the pod removed its containers


def test_exec_and_port_forward_through_streaming_urls(cri, busybox_ref):
    r, _, server, _ = cri
    pod = run_pod(r, "streams")
    cid = create(r, pod, ctr_config("echo", busybox_ref, ["nc", "-ll", "-p", "8080", "-e", "cat"]))
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)

    req = api_pb2.ExecRequest(container_id=cid, cmd=["sh", "-c", "cat; echo err >&2; exit 4"],
                              stdin=True, stdout=True, stderr=True)
    url = r.Exec(req, timeout=T).url
    assert url.startswith("http://127.0.0.1:")
    out, err, status = spdy_exec(url, req, stdin_data=b"through the pipe\n")
    assert out == b"through the pipe\n" and err == b"err\n"
    assert b'"exitCode' in status or b"4" in status  # a v4 Status naming exit code 4

    req = api_pb2.ExecRequest(container_id=cid, cmd=["tty"], stdout=True, tty=True)
    out, _, _ = spdy_exec(r.Exec(req, timeout=T).url, req)
    assert out.startswith(b"/dev/pts/")

    url = r.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod, port=[8080]),
                        timeout=T).url
    c = SpdyClient(url, ["portforward.k8s.io"])
    try:
        deadline = time.monotonic() + 10
        while True:  # nc may not listen yet
            back, error = spdy_forward(c, 8080, str(time.monotonic_ns()), b"ping " * 1000)
            if back or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert back == b"ping " * 1000 and error == b""
    finally:
        c.close()
    # a closed port: the error stream says so
    c = SpdyClient(r.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod, port=[9]),
                                 timeout=T).url, ["portforward.k8s.io"])
    try:
        back, error = spdy_forward(c, 9, "1", b"x")
        assert back == b"" and b"9" in error
    finally:
        c.close()

    r.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=T)
    assert code_of(r.Exec, req) == Code.FAILED_PRECONDITION
    r.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=T)
    assert code_of(r.PortForward, api_pb2.PortForwardRequest(pod_sandbox_id=pod, port=[1])) \
        == Code.FAILED_PRECONDITION
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def test_stats(cri, busybox_ref):
    r, _, server, _ = cri
    pod = run_pod(r, "stats", app="stats")
    cid = create(r, pod, ctr_config("busy", busybox_ref, ["sh", "-c",
                                    "head -c 3000000 /dev/zero > /tmp/f; sleep 300"],
                                    labels={"k": "v"}))
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    deadline = time.monotonic() + 15
    while True:
        st = r.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid), timeout=T).stats
        if st.writable_layer.used_bytes.value >= 3_000_000 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st.attributes.id == cid and st.attributes.metadata.name == "busy"
    assert st.cpu.timestamp > 0 and st.cpu.usage_core_nano_seconds.value > 0
    assert st.memory.working_set_bytes.value > 0
    assert st.writable_layer.used_bytes.value >= 3_000_000
    assert st.writable_layer.inodes_used.value >= 1

    listed = r.ListContainerStats(api_pb2.ListContainerStatsRequest(
        filter=api_pb2.ContainerStatsFilter(label_selector={"k": "v"})), timeout=T).stats
    assert [s.attributes.id for s in listed] == [cid]
    assert r.ListContainerStats(api_pb2.ListContainerStatsRequest(
        filter=api_pb2.ContainerStatsFilter(pod_sandbox_id="ff" * 32)), timeout=T).stats == []

    ps = r.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=T).stats
    assert ps.attributes.id == pod and ps.attributes.metadata.name == "stats"
    assert ps.linux.cpu.usage_core_nano_seconds.value > 0
    assert ps.linux.process.process_count.value >= 1
    assert [c.attributes.id for c in ps.linux.containers] == [cid]
    listed = r.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(
        filter=api_pb2.PodSandboxStatsFilter(label_selector={"app": "stats"})), timeout=T).stats
    assert [s.attributes.id for s in listed] == [pod]
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def test_container_events(cri, busybox_ref):
    r, _, _, _ = cri
    got: list[api_pb2.ContainerEventResponse] = []
    stream = r.GetContainerEvents(api_pb2.GetEventsRequest())

    def read() -> None:
        try:
            for ev in stream:
                got.append(ev)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)  # let the subscription register
    pod = run_pod(r, "events")
    cid = create(r, pod, ctr_config("ev", busybox_ref, ["sleep", "300"]))
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    r.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=T)
    r.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=T)
    r.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=T)
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    stream.cancel()
    reader.join(5)
    kinds = [e.container_event_type for e in got if e.container_id == cid]
    assert kinds == [api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT,
                     api_pb2.CONTAINER_STOPPED_EVENT, api_pb2.CONTAINER_DELETED_EVENT]
    started = got[1]
    assert started.pod_sandbox_status.id == pod and started.created_at > 0
    assert started.containers_statuses[0].state == api_pb2.CONTAINER_RUNNING
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def test_attach_through_streaming_url(cri, busybox_ref):
    r, _, _, _ = cri
    pod = run_pod(r, "attach")
    cid = create(r, pod, ctr_config("cat", busybox_ref, ["cat"], stdin=True, stdin_once=True))
    assert code_of(r.Attach, api_pb2.AttachRequest(container_id=cid, stdout=True)) \
        == Code.FAILED_PRECONDITION  # not running yet
    r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
    req = api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
    out, err, _ = spdy_exec(r.Attach(req, timeout=T).url, req, stdin_data=b"attached input\n")
    assert out == b"attached input\n" and err == b""
    # stdin_once: closing the attached stdin ended cat, and with it the container
    deadline = time.monotonic() + 10
    while (s := cstatus(r, cid).status).state != api_pb2.CONTAINER_EXITED:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert s.exit_code == 0
    r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)


def test_bind_mount_propagation_and_status(cri, busybox_ref):
    r, _, _, _ = cri
    host = tempfile.mkdtemp(prefix="pycri-crirt-vol-")
    with open(os.path.join(host, "seen"), "w") as f:
        f.write("from host\n")
    pod = run_pod(r, "mounts")
    mounts = [api_pb2.Mount(container_path="/data", host_path=host, readonly=True,
                            propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)]
    cid = create(r, pod, ctr_config("m", busybox_ref, ["sleep", "300"], mounts=mounts))
    try:
        s = cstatus(r, cid).status
        [m] = s.mounts
        assert (m.container_path, m.host_path, m.readonly, m.propagation) == (
            "/data", host, True, api_pb2.PROPAGATION_HOST_TO_CONTAINER)
        r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
        res = r.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c",
                         "cat /data/seen; touch /data/x 2>/dev/null || echo ro"]), timeout=T)
        assert res.stdout == b"from host\nro\n"
        assert cstatus(r, cid).status.mounts[0].propagation == api_pb2.PROPAGATION_HOST_TO_CONTAINER
    finally:
        r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)
        shutil.rmtree(host, ignore_errors=True)


def test_update_resources_and_reopen_log(cri, busybox_ref):
    r, _, _, logs = cri
    pod = run_pod(r, "update", logs)
    cid = create(r, pod, ctr_config("u", busybox_ref, ["sh", "-c",
                                    "while true; do echo tick; sleep 0.2; done"],
                                    log_path="u.log"))
    try:
        r.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=T)
        r.UpdateContainerResources(api_pb2.UpdateContainerResourcesRequest(
            container_id=cid, linux=api_pb2.LinuxContainerResources(
                memory_limit_in_bytes=64 << 20, cpu_shares=512)), timeout=T)
        assert code_of(r.UpdateContainerResources, api_pb2.UpdateContainerResourcesRequest(
            container_id=cid, linux=api_pb2.LinuxContainerResources(cpu_quota=5))) \
            == Code.INVALID_ARGUMENT  # below 1000 microseconds
        path = cstatus(r, cid).status.log_path
        os.rename(path, path + ".1")
        r.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=T)
        assert os.path.exists(path)  # at once, not some time later
        deadline = time.monotonic() + 10
        while b"tick" not in open(path, "rb").read():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        r.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=T)
