"""What the CRI test modules share: a gRPC client, servers in this process or as a
subprocess on temp dirs, and a server over a Runtime of its own with an image pulled.

The ``dirs`` and ``cri`` fixtures (tests/conftest.py) are built from these;
test_cri_runtime.py and test_cri_metrics.py use ``served_runtime`` for their
module-wide servers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

import pycri
from pycri.cri import server as srv
from pycri.cri._gen import api_pb2, api_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
CRICTL = "/work/peers/bin/crictl"


@dataclass
class Client:
    channel: grpc.Channel
    runtime: api_pb2_grpc.RuntimeServiceStub
    images: api_pb2_grpc.ImageServiceStub


def connect(address: str) -> Client:
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    return Client(channel, api_pb2_grpc.RuntimeServiceStub(channel),
                  api_pb2_grpc.ImageServiceStub(channel))


def short_tmpdir() -> str:
    # unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return tempfile.mkdtemp(prefix="pycri-cri-")


def server_dirs(tmp_path) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """Generator behind the ``dirs`` fixture: root, state, socket and CNI paths."""
    sock_dir = short_tmpdir()
    conf = tmp_path / "net.d"
    bins = tmp_path / "cni-bin"
    conf.mkdir()
    yield {"root": str(tmp_path / "root"), "state": str(tmp_path / "state"),
           "sock": os.path.join(sock_dir, "run", "cri.sock"), "cni_conf": str(conf),
           "cni_bin": str(bins)}
    shutil.rmtree(sock_dir, ignore_errors=True)


def start_in_process(dirs: dict[str, str], **over: object) -> srv.CriServer:
    opts: dict[str, object] = dict(listen="unix://" + dirs["sock"], root=dirs["root"],
                                   state=dirs["state"], cni_conf_dir=dirs["cni_conf"],
                                   cni_bin_dir=dirs["cni_bin"])
    opts.update(over)
    server = srv.CriServer(srv.ServerOptions(**opts))  # type: ignore[arg-type]
    server.start()
    return server


@contextlib.contextmanager
def in_process(dirs: dict[str, str]) -> Iterator[tuple[Client, srv.CriServer]]:
    """A server in this process on ``dirs`` and a client connected to it."""
    server = start_in_process(dirs)
    client = connect(server.address)
    try:
        yield client, server
    finally:
        client.channel.close()
        server.stop(grace=1)


def spawn(dirs: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pycri.cri", "--listen", "unix://" + dirs["sock"],
           "--root", dirs["root"], "--state", dirs["state"], "--cni-conf-dir", dirs["cni_conf"],
           "--cni-bin-dir", dirs["cni_bin"], "--log-level", "debug", *extra]
    return subprocess.Popen(cmd, cwd=TREE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=TREE))


def wait_for_socket(proc: subprocess.Popen[bytes], path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError("server exited: " + proc.stderr.read().decode())  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "server did not create its socket"
        time.sleep(0.05)


def stop_proc(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode()


@dataclass
class Served:
    runtime: pycri.Runtime
    client: Client
    server: srv.CriServer
    base: str               # temp dir holding root, state, the socket (and what tests add)


@contextlib.contextmanager
def served_runtime(name: str, image_ref: str) -> Iterator[Served]:
    """A server in this process over a Runtime of its own (temp root and state, a
    cgroup parent of its own, no CNI: pods get a network namespace with loopback only),
    with ``image_ref`` pulled through the server. Afterwards every pod is removed, the
    server stopped, the cgroup parent and the temp dir deleted."""
    base = tempfile.mkdtemp(prefix=f"pycri-{name}-")
    parent = f"pycri-{name}-" + uuid.uuid4().hex[:8]
    rt = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    opts = srv.ServerOptions(listen=f"unix://{base}/cri.sock", root=rt.root, state=rt.state,
                             cni_conf_dir="")
    server = srv.CriServer(opts, runtime=rt)
    server.start()
    client = connect(server.address)
    try:
        client.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image_ref)),
                                timeout=120)
        yield Served(rt, client, server, base)
    finally:
        for sb in rt.sandboxes():
            sb.remove()
        client.channel.close()
        server.stop(grace=1)
        rt.cgroups().remove_parent()
        shutil.rmtree(base, ignore_errors=True)
