"""Shared fixtures: a real docker-registry on loopback, and a Runtime on temp dirs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # import the in-tree pycri first
sys.path.insert(0, HERE)  # test helpers (imagebuild, ...)

# pycri's C core forks; gRPC's fork support (on by default in grpcio) installs atfork
# handlers that crash such children when gRPC threads are busy. Turn it off before any
# test starts gRPC, as the CRI server itself does (pycri/cri/server.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """A docker-registry process on 127.0.0.1 with its own storage dir."""

    def __init__(self, workdir: str, extra_config: str = "") -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.workdir = workdir
        os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
        cfg = os.path.join(workdir, "config.yml")
        with open(cfg, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: error\n"
                "storage:\n  filesystem:\n    rootdirectory: " + os.path.join(workdir, "data") + "\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{self.port}\n" + extra_config
            )
        self.log = open(os.path.join(workdir, "registry.log"), "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401 from an auth-enabled registry: it is up
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start; see " + self.log.name) from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def registry():
    """A plain-http registry on 127.0.0.1 (no auth), shared by the whole session."""
    d = tempfile.mkdtemp(prefix="pycri-registry-")
    reg = LocalRegistry(d)
    yield reg
    reg.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmp_root(tmp_path):
    """root and state dirs for a Runtime, on the same disk as real use."""
    root = tmp_path / "root"
    state = tmp_path / "state"
    return str(root), str(state)


@pytest.fixture
def dirs(tmp_path):
    """root, state, socket and CNI paths for a CRI server (crihelpers.server_dirs)."""
    import crihelpers

    yield from crihelpers.server_dirs(tmp_path)


@pytest.fixture
def cri(dirs):
    """(client, server, dirs): a CRI server in this process on a unix socket in ``dirs``.
    test_cri_runtime.py, test_cri_metrics.py and test_streaming.py have a ``cri`` of
    their own (a module-wide server over a Runtime with an image; a streaming server)."""
    import crihelpers

    with crihelpers.in_process(dirs) as (client, server):
        yield client, server, dirs
