"""The CRI server: status table, listening socket, shutdown, and the RuntimeService
RPCs that do not need the runtime layer, all through a real gRPC client.

Image RPCs are in test_cri_images.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

import pycri
from pycri import errors as e
from pycri.cri import server as srv
from pycri.cri._gen import api_pb2, api_pb2_grpc
from pycri.cri.errors import STATUS_TABLE, rpc, status_for
from crihelpers import (
    CRICTL,
    Client,
    connect,
    short_tmpdir,
    spawn,
    start_in_process,
    stop_proc,
    wait_for_socket,
)

Code = grpc.StatusCode


# -- the status table ---------------------------------------------------------------------

@pytest.mark.parametrize("exc, code", [
    (e.NotFoundError("x"), Code.NOT_FOUND),
    (e.AlreadyExistsError("x"), Code.ALREADY_EXISTS),
    (e.InvalidArgumentError("x"), Code.INVALID_ARGUMENT),
    (e.InvalidImageError("x"), Code.INVALID_ARGUMENT),
    (e.InvalidStateError("x"), Code.FAILED_PRECONDITION),
    (e.AuthenticationError("x", 401), Code.UNAUTHENTICATED),
    (e.InsecureRegistryError("x"), Code.PERMISSION_DENIED),
    (e.RegistryError("x", 503), Code.UNAVAILABLE),
    (e.DigestMismatchError("x"), Code.DATA_LOSS),
    (e.InvalidLayerError("x"), Code.DATA_LOSS),
    (e.ResourceExhaustedError("x"), Code.RESOURCE_EXHAUSTED),
    (e.UnsupportedError("x"), Code.UNIMPLEMENTED),
    (TimeoutError("x"), Code.DEADLINE_EXCEEDED),
    (e.RuntimeFailure("x"), Code.UNKNOWN),
    (e.PycriError("x"), Code.UNKNOWN),
    (ValueError("x"), Code.INTERNAL),
    (KeyError("x"), Code.INTERNAL),
    (OSError(5, "x"), Code.INTERNAL),
])
def test_status_table(exc, code):
    assert status_for(exc) == code


def test_status_table_covers_every_library_error():
    # A new error type in pycri.errors must get a conscious row (or knowingly fall to
    # its base class's row): list here which types rely on their base.
    via_base = {"PycriError", "RuntimeFailure"}  # both UNKNOWN, on purpose
    listed = {cls.__name__ for cls, _ in STATUS_TABLE}
    assert set(e.__all__) - listed <= via_base, sorted(set(e.__all__) - listed - via_base)


def test_status_table_subclasses_come_first():
    classes = [cls for cls, _ in STATUS_TABLE]
    for i, cls in enumerate(classes):
        for later in classes[i + 1:]:
            assert not issubclass(later, cls), f"{later.__name__} is shadowed by {cls.__name__}"


class _Failing(api_pb2_grpc.RuntimeServiceServicer):
    """Raises whatever the request's version field names, to test the wrapper on the wire."""

    raises = {
        "notfound": e.NotFoundError("no such thing"),
        "auth": e.AuthenticationError("registry said 401", 401),
        "bug": ZeroDivisionError("division by zero"),
    }

    @rpc
    def Version(self, request, context):
        if request.version in self.raises:
            raise self.raises[request.version]
        return api_pb2.VersionResponse(version=request.version)

    @rpc
    def GetContainerEvents(self, request, context):
        yield api_pb2.ContainerEventResponse(container_id="one")
        raise e.InvalidStateError("stream broke")


def test_rpc_wrapper_over_grpc(caplog):
    d = short_tmpdir()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(_Failing(), server)
    server.add_insecure_port(f"unix://{d}/s.sock")
    server.start()
    try:
        c = connect(f"unix://{d}/s.sock")
        assert c.runtime.Version(api_pb2.VersionRequest(version="ok"), timeout=10).version == "ok"
        for what, code, text in [("notfound", Code.NOT_FOUND, "no such thing"),
                                 ("auth", Code.UNAUTHENTICATED, "registry said 401"),
                                 ("bug", Code.INTERNAL, "ZeroDivisionError: division by zero")]:
            with caplog.at_level("INFO", logger="pycri.cri"):
                with pytest.raises(grpc.RpcError) as exc:
                    c.runtime.Version(api_pb2.VersionRequest(version=what), timeout=10)
            assert exc.value.code() == code
            assert text in exc.value.details()
        # the unexpected one is logged with its traceback
        bug = [r for r in caplog.records if r.levelname == "ERROR"]
        assert bug and bug[-1].exc_info and bug[-1].exc_info[0] is ZeroDivisionError
        # a server-streaming method: items sent before the error arrive, then the status
        got = []
        with pytest.raises(grpc.RpcError) as exc:
            for item in c.runtime.GetContainerEvents(api_pb2.GetEventsRequest(), timeout=10):
                got.append(item.container_id)
        assert got == ["one"]
        assert exc.value.code() == Code.FAILED_PRECONDITION
        assert "stream broke" in exc.value.details()
        c.channel.close()
    finally:
        server.stop(None).wait(5)
        shutil.rmtree(d, ignore_errors=True)


# -- RuntimeService RPCs that work now ------------------------------------------------------

def test_version(cri):
    c, _, _ = cri
    v = c.runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=10)
    assert (v.version, v.runtime_name, v.runtime_version, v.runtime_api_version) == \
        ("0.1.0", "pycri", pycri.__version__, "v1")


def _conditions(resp):
    return {x.type: x for x in resp.status.conditions}


def _plugin(bin_dir: str, name: str) -> None:
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 1\n")
    os.chmod(path, 0o755)


def test_status_network_not_ready_without_plugins(cri):
    c, _, d = cri
    resp = c.runtime.Status(api_pb2.StatusRequest(), timeout=10)
    cond = _conditions(resp)
    assert cond["RuntimeReady"].status is True
    # no config: the library's built-in bridge network, whose plugins are missing here
    assert cond["NetworkReady"].status is False
    assert cond["NetworkReady"].reason == "NetworkPluginNotReady"
    assert "'bridge' not found" in cond["NetworkReady"].message
    assert d["cni_bin"] in cond["NetworkReady"].message
    assert dict(resp.info) == {}  # info only when verbose
    [handler] = resp.runtime_handlers
    assert handler.name == ""
    assert handler.HasField("features")
    assert handler.features.recursive_read_only_mounts is True  # mount_setattr(AT_RECURSIVE)
    assert handler.features.user_namespaces is True


def test_status_network_follows_config_and_plugins(cri):
    c, _, d = cri

    def network():  # type: ignore[no-untyped-def]
        return _conditions(c.runtime.Status(api_pb2.StatusRequest(), timeout=10))["NetworkReady"]

    conf = os.path.join(d["cni_conf"], "10-pods.conflist")
    with open(conf, "w") as f:
        f.write('{"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "ptp"}]}')
    assert network().status is False and "'ptp' not found" in network().message
    _plugin(d["cni_bin"], "ptp")
    assert network().status is True and network().reason == "" and network().message == ""
    # a config that is not valid: not ready, and the message says why
    with open(conf, "w") as f:
        f.write("{not json")
    assert network().status is False and "not JSON" in network().message
    os.unlink(conf)
    # back to the built-in bridge network
    _plugin(d["cni_bin"], "bridge")
    _plugin(d["cni_bin"], "portmap")
    assert network().status is True


def test_network_condition():
    from pycri.cri import convert

    ok = convert.network_condition(True, "")
    assert (ok.type, ok.status, ok.reason, ok.message) == ("NetworkReady", True, "", "")
    bad = convert.network_condition(False, "no plugin")
    assert (bad.status, bad.reason) == (False, "NetworkPluginNotReady")
    assert bad.message.endswith("no plugin")


def test_status_verbose_info_is_json(cri):
    import json

    c, _, d = cri
    resp = c.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    info = {k: json.loads(v) for k, v in resp.info.items()}
    assert info["config"]["cni_conf_dir"] == d["cni_conf"]
    assert info["config"]["sandbox_image"] == srv.DEFAULT_SANDBOX_IMAGE
    assert info["runtime"]["root"] == os.path.abspath(d["root"])


def test_runtime_config_and_update(cri, caplog):
    c, _, _ = cri
    resp = c.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=10)
    assert resp.linux.cgroup_driver == api_pb2.CGROUPFS
    with caplog.at_level("INFO", logger="pycri.cri"):
        c.runtime.UpdateRuntimeConfig(api_pb2.UpdateRuntimeConfigRequest(
            runtime_config=api_pb2.RuntimeConfig(
                network_config=api_pb2.NetworkConfig(pod_cidr="10.88.0.0/16"))), timeout=10)
    assert any("10.88.0.0/16" in r.getMessage() for r in caplog.records)


def test_image_fs_info(cri):
    c, server, _ = cri
    t0 = time.time_ns()
    resp = c.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    [fs] = resp.image_filesystems
    assert fs.fs_id.mountpoint == server.runtime.root
    assert fs.timestamp >= t0
    assert fs.HasField("used_bytes") and fs.HasField("inodes_used")
    assert list(resp.container_filesystems) == [fs]


UNIMPLEMENTED = ["CheckpointContainer"]


@pytest.mark.parametrize("name", UNIMPLEMENTED)
def test_unimplemented_rpcs_say_so(cri, name):
    c, _, _ = cri
    method = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name[name]
    request = getattr(api_pb2, method.input_type.name)()
    with pytest.raises(grpc.RpcError) as exc:
        reply = getattr(c.runtime, name)(request, timeout=10)
        if method.server_streaming:
            list(reply)
    assert exc.value.code() == Code.UNIMPLEMENTED
    assert name in exc.value.details()


@pytest.mark.parametrize("name", ["StopPodSandbox", "RemovePodSandbox", "StopContainer",
                                  "RemoveContainer"])
def test_stop_and_remove_of_nothing_is_ok(cri, name):
    c, _, _ = cri
    method = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name[name]
    request = getattr(api_pb2, method.input_type.name)()
    field = "container_id" if "Container" in name else "pod_sandbox_id"
    setattr(request, field, "ab" * 32)
    getattr(c.runtime, name)(request, timeout=10)


@pytest.mark.parametrize("name, field", [("PodSandboxStatus", "pod_sandbox_id"),
                                         ("ContainerStatus", "container_id"),
                                         ("StartContainer", "container_id"),
                                         ("ExecSync", "container_id"),
                                         ("Exec", "container_id"),
                                         ("PortForward", "pod_sandbox_id"),
                                         ("ContainerStats", "container_id"),
                                         ("PodSandboxStats", "pod_sandbox_id")])
def test_missing_objects_are_not_found(cri, name, field):
    c, _, _ = cri
    method = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name[name]
    request = getattr(api_pb2, method.input_type.name)()
    setattr(request, field, "ab" * 32)
    if name in ("ExecSync", "Exec"):
        request.cmd.append("true")
    with pytest.raises(grpc.RpcError) as exc:
        getattr(c.runtime, name)(request, timeout=10)
    assert exc.value.code() == Code.NOT_FOUND, exc.value.details()


def test_empty_lists(cri):
    c, _, _ = cri
    r = c.runtime
    assert list(r.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items) == []
    assert list(r.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers) == []
    assert list(r.StreamContainers(api_pb2.StreamContainersRequest(), timeout=10)) == []
    assert list(r.ListContainerStats(api_pb2.ListContainerStatsRequest(), timeout=10).stats) == []
    assert list(r.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=10).stats) == []


def test_tcp_loopback(dirs):
    server = start_in_process(dirs, listen="tcp://127.0.0.1:0")
    try:
        assert server.address.startswith("tcp://127.0.0.1:")
        assert not server.address.endswith(":0")
        c = connect(server.address[len("tcp://"):])
        assert c.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pycri"
        c.channel.close()
    finally:
        server.stop(grace=1)


# -- the listen address and the socket -----------------------------------------------------

@pytest.mark.parametrize("address, want", [
    ("unix:///run/pycri/pycri.sock", ("unix", "/run/pycri/pycri.sock")),
    ("/run/pycri/pycri.sock", ("unix", "/run/pycri/pycri.sock")),
    ("unix:///run/pycri/../pycri.sock", ("unix", "/run/pycri.sock")),
    ("tcp://127.0.0.1:1234", ("tcp", "127.0.0.1:1234")),
    ("tcp://[::1]:1234", ("tcp", "[::1]:1234")),
])
def test_parse_listen(address, want):
    assert srv.parse_listen(address) == want


@pytest.mark.parametrize("address", [
    "unix://relative.sock", "tcp://0.0.0.0:1234", "tcp://10.0.0.1:1234", "tcp://127.0.0.1",
    "tcp://127.0.0.1:99999", "http://127.0.0.1:1", "unix:///" + "x" * 200, "",
])
def test_parse_listen_refuses(address):
    with pytest.raises(srv.ServerError):
        srv.parse_listen(address)


def test_in_process_socket_modes_and_cleanup(dirs):
    server = start_in_process(dirs)
    sock = dirs["sock"]
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    # a second server on the same socket refuses and leaves the first one serving
    with pytest.raises(srv.ServerError, match="another pycri server"):
        start_in_process(dirs)
    c = connect("unix://" + sock)
    assert c.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pycri"
    c.channel.close()
    server.stop(grace=1)
    assert not os.path.exists(sock)
    # and the path is free again
    start_in_process(dirs).stop(grace=1)


def test_stale_socket_is_replaced(dirs):
    os.makedirs(os.path.dirname(dirs["sock"]), mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(dirs["sock"])
    stale.close()  # the file stays, nobody listens: what a crash leaves
    server = start_in_process(dirs)
    try:
        c = connect("unix://" + dirs["sock"])
        assert c.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "pycri"
        c.channel.close()
    finally:
        server.stop(grace=1)


def test_live_foreign_socket_is_not_stolen(dirs):
    os.makedirs(os.path.dirname(dirs["sock"]), mode=0o700)
    other = socket.socket(socket.AF_UNIX)
    other.bind(dirs["sock"])
    other.listen(1)  # another (non-pycri) server is live on the path
    try:
        with pytest.raises(srv.ServerError, match="in use"):
            start_in_process(dirs)
        assert stat.S_ISSOCK(os.lstat(dirs["sock"]).st_mode)
    finally:
        other.close()


def test_regular_file_at_socket_path_is_not_touched(dirs):
    os.makedirs(os.path.dirname(dirs["sock"]), mode=0o700)
    with open(dirs["sock"], "w") as f:
        f.write("precious")
    with pytest.raises(srv.ServerError, match="not a socket"):
        start_in_process(dirs)
    assert open(dirs["sock"]).read() == "precious"


# -- the process: python -m pycri.cri -------------------------------------------------------

def test_subprocess_modes_and_sigterm(dirs):
    proc = spawn(dirs)
    try:
        wait_for_socket(proc, dirs["sock"])
        st = os.lstat(dirs["sock"])
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(os.path.dirname(dirs["sock"])).st_mode) == 0o700
        c = connect("unix://" + dirs["sock"])
        v = c.runtime.Version(api_pb2.VersionRequest(), timeout=10)
        assert v.runtime_name == "pycri"
        c.channel.close()
        # a second server process refuses to take over, exit status 1
        second = spawn(dirs)
        _, err2 = second.communicate(timeout=30)
        assert second.returncode == 1, err2
        assert b"another pycri server" in err2
        assert proc.poll() is None
    finally:
        rc, err = stop_proc(proc)
    assert rc == 0, err
    assert "SIGTERM" in err and "stopped" in err
    assert not os.path.exists(dirs["sock"])


def test_subprocess_sigint_exits_zero(dirs):
    proc = spawn(dirs, "--log-level", "warn")
    try:
        wait_for_socket(proc, dirs["sock"])
    finally:
        rc, err = stop_proc(proc, signal.SIGINT)
    assert rc == 0, err
    assert "INFO" not in err  # --log-level warn is honoured


def test_subprocess_bad_listen_exits_one(dirs):
    proc = spawn(dirs, "--listen", "tcp://0.0.0.0:1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert b"loopback" in err


def test_main_is_importable_for_the_cli():
    # The lead wires `pycri serve` to this function.
    assert srv.main.__code__.co_argcount == 1
    with pytest.raises(SystemExit) as exc:
        srv.main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        srv.main(["--no-such-option"], prog="pycri serve")
    assert exc.value.code == 2


@pytest.mark.skipif(not os.access(CRICTL, os.X_OK),
                    reason=f"{CRICTL} is a locally built tool, absent in CI; the gRPC tests "
                           "above cover the same calls")
def test_crictl_version_and_info(dirs):
    import json

    proc = spawn(dirs)
    try:
        wait_for_socket(proc, dirs["sock"])
        ep = "unix://" + dirs["sock"]
        base = [CRICTL, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "20s"]
        out = subprocess.run(base + ["version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "RuntimeName:  pycri" in out.stdout
        assert "RuntimeApiVersion:  v1" in out.stdout
        out = subprocess.run(base + ["info"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        conds = {x["type"]: x for x in info["status"]["conditions"]}
        assert conds["RuntimeReady"]["status"] is True
        assert conds["NetworkReady"]["reason"] == "NetworkPluginNotReady"  # no plugins here
        assert info["config"]["root"] == dirs["root"]
        out = subprocess.run(base + ["imagefsinfo"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        fs = json.loads(out.stdout)["status"]["imageFilesystems"][0]
        assert fs["fsId"]["mountpoint"] == os.path.abspath(dirs["root"])
        out = subprocess.run(base + ["pods", "-q"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "", out.stderr
    finally:
        rc, err = stop_proc(proc)
    assert rc == 0, err


# -- shutdown with calls in flight ----------------------------------------------------------

def _slow_fs_info(server: srv.CriServer, seconds: float, started):  # type: ignore[no-untyped-def]
    real = server.runtime.images.fs_info

    def slow():  # type: ignore[no-untyped-def]
        started.set()
        time.sleep(seconds)
        return real()

    server.runtime.images.fs_info = slow  # type: ignore[method-assign]


def _call_in_thread(client: Client):  # type: ignore[no-untyped-def]
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["reply"] = client.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=30)
        except grpc.RpcError as exc:
            result["error"] = exc.code()

    t = threading.Thread(target=run)
    t.start()
    return t, result


def test_stop_lets_in_flight_calls_finish(dirs):
    server = start_in_process(dirs)
    started = threading.Event()
    _slow_fs_info(server, 1.0, started)
    c = connect(server.address)
    t, result = _call_in_thread(c)
    assert started.wait(10)
    t0 = time.monotonic()
    server.stop(grace=10)
    t.join(10)
    assert "reply" in result, result
    assert time.monotonic() - t0 < 5  # stop returned once the call was done
    # and no new calls are accepted
    with pytest.raises(grpc.RpcError) as exc:
        c.runtime.Version(api_pb2.VersionRequest(), timeout=2)
    assert exc.value.code() in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
    c.channel.close()


def test_stop_cancels_calls_past_the_grace_period(dirs):
    server = start_in_process(dirs)
    started = threading.Event()
    _slow_fs_info(server, 3.0, started)
    c = connect(server.address)
    t, result = _call_in_thread(c)
    assert started.wait(10)
    t0 = time.monotonic()
    server.stop(grace=0.3)
    assert time.monotonic() - t0 < 2.5
    t.join(10)
    assert result.get("error") in (Code.CANCELLED, Code.UNAVAILABLE), result
    c.channel.close()


def test_existing_socket_dir_is_left_alone_with_a_warning(dirs, caplog):
    parent = os.path.dirname(dirs["sock"])
    os.makedirs(parent)
    os.chmod(parent, 0o755)  # e.g. a shared dir the admin chose
    with caplog.at_level("WARNING", logger="pycri.cri"):
        server = start_in_process(dirs)
    try:
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(dirs["sock"]).st_mode) == 0o660
        assert any("has mode 755" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(grace=1)


def test_serve_raises_its_open_files_limit():
    """pycri serve lifts its soft RLIMIT_NOFILE to the hard limit (slots, pipes and
    connections are a few fds per pod; a soft 1024 would run out)."""
    import resource
    import subprocess
    import sys
    code = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "from pycri.cri import server; server._raise_fd_limit(); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = (1 << 20) if hard == resource.RLIM_INFINITY else hard
    assert int(out[0]) == want and int(out[0]) > 256

