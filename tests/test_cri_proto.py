"""The vendored CRI v1 proto and its generated stubs.

Guards three things a CRI server depends on without noticing: the stubs are what
proto/regen.sh makes from proto/api.proto (nobody hand-edited them), the proto is
the upstream file (same services, same field numbers, so kubelet and crictl
understand us), and the stubs actually carry a call over gRPC on a unix socket.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from concurrent import futures

import grpc
import pytest

from pycri.cri._gen import api_pb2, api_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(REPO, "proto")
GEN_DIR = os.path.join(REPO, "pycri", "cri", "_gen")
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")

# sha256 of pkg/apis/runtime/v1/api.proto at k8s.io/cri-api v0.36.3.
UPSTREAM_SHA256 = "6d130c2651d335bfc755d25efc63072a1cd1eba3591ead6422dc0a27f20167f3"
HEADER_END = b"// " + b"-" * 76 + b"\n"

RUNTIME_RPCS = {
    "Version", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus",
    "ListPodSandbox", "CreateContainer", "StartContainer", "StopContainer",
    "RemoveContainer", "ListContainers", "ContainerStatus", "UpdateContainerResources",
    "ReopenContainerLog", "ExecSync", "Exec", "Attach", "PortForward", "ContainerStats",
    "ListContainerStats", "PodSandboxStats", "ListPodSandboxStats", "UpdateRuntimeConfig",
    "Status", "CheckpointContainer", "GetContainerEvents", "ListMetricDescriptors",
    "ListPodSandboxMetrics", "RuntimeConfig", "UpdatePodSandboxResources",
    # server-streaming list variants, new in the 1.36 line
    "StreamPodSandboxes", "StreamContainers", "StreamContainerStats",
    "StreamPodSandboxStats", "StreamPodSandboxMetrics",
}
IMAGE_RPCS = {"ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo",
              "StreamImages"}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# (a) ----------------------------------------------------------------------------

def test_regenerated_stubs_are_byte_identical(tmp_path):
    out = tmp_path / "gen"
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["sh", os.path.join(PROTO_DIR, "regen.sh"), str(out)], check=True, env=env)
    assert sorted(p.name for p in out.iterdir()) == sorted(GENERATED)
    for name in GENERATED:
        fresh = _read(str(out / name))
        committed = _read(os.path.join(GEN_DIR, name))
        assert fresh == committed, (
            f"pycri/cri/_gen/{name} differs from what proto/regen.sh makes now: either it was "
            "edited by hand or grpcio-tools changed version (its version is written into the "
            "files); rerun proto/regen.sh and commit the result"
        )


def test_proto_body_is_the_upstream_file():
    text = _read(os.path.join(PROTO_DIR, "api.proto"))
    header, sep, body = text.partition(HEADER_END)
    assert sep, "the origin note must end with the dashed line"
    assert b"v0.36.3" in header
    assert hashlib.sha256(body).hexdigest() == UPSTREAM_SHA256
    assert b"gogoproto" not in body


# (b) ----------------------------------------------------------------------------

def test_package_and_services():
    fd = api_pb2.DESCRIPTOR
    assert fd.package == "runtime.v1"
    assert set(fd.services_by_name) == {"RuntimeService", "ImageService"}
    runtime = {m.name for m in fd.services_by_name["RuntimeService"].methods}
    image = {m.name for m in fd.services_by_name["ImageService"].methods}
    assert RUNTIME_RPCS <= runtime, sorted(RUNTIME_RPCS - runtime)
    assert IMAGE_RPCS <= image, sorted(IMAGE_RPCS - image)
    # Nothing unexpected either: a new upstream RPC should be a conscious update here.
    assert runtime == RUNTIME_RPCS and image == IMAGE_RPCS


def test_rpc_shapes():
    svc = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    events = svc.methods_by_name["GetContainerEvents"]
    assert events.input_type.name == "GetEventsRequest"
    assert events.output_type.name == "ContainerEventResponse"
    assert events.server_streaming and not events.client_streaming
    version = svc.methods_by_name["Version"]
    assert not version.server_streaming and not version.client_streaming
    assert version.input_type.full_name == "runtime.v1.VersionRequest"
    for name in ("StreamPodSandboxes", "StreamContainers", "StreamContainerStats"):
        assert svc.methods_by_name[name].server_streaming
    pull = api_pb2.DESCRIPTOR.services_by_name["ImageService"].methods_by_name["PullImage"]
    assert pull.output_type.full_name == "runtime.v1.PullImageResponse"


# (c) ----------------------------------------------------------------------------

# Field numbers as read in upstream api.proto v0.36.3: a renumbering breaks the wire.
FIELD_NUMBERS = {
    "VersionResponse": {"version": 1, "runtime_name": 2, "runtime_version": 3,
                        "runtime_api_version": 4},
    "PodSandboxConfig": {"metadata": 1, "hostname": 2, "log_directory": 3, "dns_config": 4,
                         "port_mappings": 5, "labels": 6, "annotations": 7, "linux": 8,
                         "windows": 9},
    "LinuxContainerSecurityContext": {
        "capabilities": 1, "privileged": 2, "namespace_options": 3, "selinux_options": 4,
        "run_as_user": 5, "run_as_username": 6, "readonly_rootfs": 7,
        "supplemental_groups": 8, "no_new_privs": 11, "run_as_group": 12,
        "masked_paths": 13, "readonly_paths": 14, "seccomp": 15, "apparmor": 16,
        "supplemental_groups_policy": 17,
    },
    "ContainerConfig": {"metadata": 1, "image": 2, "command": 3, "args": 4, "working_dir": 5,
                        "envs": 6, "mounts": 7, "devices": 8, "labels": 9, "annotations": 10,
                        "log_path": 11, "stdin": 12, "stdin_once": 13, "tty": 14, "linux": 15,
                        "windows": 16, "CDI_devices": 17, "stop_signal": 18},
    "Mount": {"container_path": 1, "host_path": 2, "readonly": 3, "selinux_relabel": 4,
              "propagation": 5, "uidMappings": 6, "gidMappings": 7,
              "recursive_read_only": 8, "image": 9, "image_sub_path": 10},
    "LinuxContainerResources": {"cpu_period": 1, "cpu_quota": 2, "cpu_shares": 3,
                                "memory_limit_in_bytes": 4, "oom_score_adj": 5,
                                "cpuset_cpus": 6, "cpuset_mems": 7, "hugepage_limits": 8,
                                "unified": 9, "memory_swap_limit_in_bytes": 10},
    "ExecSyncRequest": {"container_id": 1, "cmd": 2, "timeout": 3},
}


@pytest.mark.parametrize("message", sorted(FIELD_NUMBERS))
def test_field_numbers(message):
    fields = api_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name
    for name, number in FIELD_NUMBERS[message].items():
        assert fields[name].number == number, f"{message}.{name}"


def test_field_types_and_enums():
    sc = api_pb2.DESCRIPTOR.message_types_by_name["LinuxContainerSecurityContext"]
    assert sc.fields_by_name["run_as_user"].message_type.full_name == "runtime.v1.Int64Value"
    assert sc.fields_by_name["masked_paths"].is_repeated
    assert api_pb2.ContainerState.Value("CONTAINER_CREATED") == 0
    assert api_pb2.ContainerState.Value("CONTAINER_RUNNING") == 1
    assert api_pb2.ContainerState.Value("CONTAINER_EXITED") == 2
    assert api_pb2.ContainerState.Value("CONTAINER_UNKNOWN") == 3
    assert api_pb2.PodSandboxState.Value("SANDBOX_READY") == 0
    assert api_pb2.PodSandboxState.Value("SANDBOX_NOTREADY") == 1
    assert api_pb2.MountPropagation.Value("PROPAGATION_BIDIRECTIONAL") == 2


def test_wire_bytes():
    # Field 1 (metadata), length-delimited; inside it field 1 (name) = "p".
    cfg = api_pb2.PodSandboxConfig(metadata=api_pb2.PodSandboxMetadata(name="p"))
    assert cfg.SerializeToString() == b"\x0a\x03\x0a\x01p"
    back = api_pb2.PodSandboxConfig.FromString(b"\x0a\x03\x0a\x01p")
    assert back.metadata.name == "p"


# (d) ----------------------------------------------------------------------------

class _VersionOnly(api_pb2_grpc.RuntimeServiceServicer):
    def Version(self, request, context):
        return api_pb2.VersionResponse(version=request.version, runtime_name="pycri-test",
                                       runtime_version="0.0.1", runtime_api_version="v1")


def test_grpc_round_trip_on_unix_socket():
    # A short private dir: unix socket paths are limited to 107 bytes.
    sockdir = tempfile.mkdtemp(prefix="pycri-cri-")
    sock = os.path.join(sockdir, "cri.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(_VersionOnly(), server)
    server.add_insecure_port("unix://" + sock)
    server.start()
    try:
        assert os.path.exists(sock)
        with grpc.insecure_channel("unix://" + sock) as channel:
            stub = api_pb2_grpc.RuntimeServiceStub(channel)
            reply = stub.Version(api_pb2.VersionRequest(version="v1"), timeout=10)
            assert reply.version == "v1"
            assert reply.runtime_name == "pycri-test"
            assert reply.runtime_api_version == "v1"
            # The generated base class answers every other RPC with UNIMPLEMENTED.
            with pytest.raises(grpc.RpcError) as exc:
                stub.Status(api_pb2.StatusRequest(), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The method path kubelet uses on the wire.
            raw = channel.unary_unary(
                "/runtime.v1.RuntimeService/Version",
                request_serializer=api_pb2.VersionRequest.SerializeToString,
                response_deserializer=api_pb2.VersionResponse.FromString,
            )
            assert raw(api_pb2.VersionRequest(version="x"), timeout=10).version == "x"
    finally:
        server.stop(grace=None).wait(5)
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(sockdir)
