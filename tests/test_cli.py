"""The `pycri` command for containers and pods, run as a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

import imagebuild as ib

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def busybox_ref(registry):
    built = ib.build_image([ib.busybox_layer()], config={"Cmd": ["sh"], "Env": ["PATH=/bin"]})
    ib.push(registry.host, "cli/busybox", "latest", built)
    return f"{registry.host}/cli/busybox:latest"


@pytest.fixture
def cli():
    base = tempfile.mkdtemp(prefix="pycri-cli-", dir="/tmp")
    env = dict(os.environ, PYCRI_ROOT=base + "/root", PYCRI_STATE=base + "/state")

    def run(*args, check=True):
        r = subprocess.run([sys.executable, "-m", "pycri", *args], capture_output=True,
                           text=True, cwd=TREE, env=env, timeout=120)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    yield run
    run("rmp", *[line.split()[0] for line in run("pods").stdout.splitlines()[1:]], check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_run_rm_pulls_and_shows_output(cli, busybox_ref):
    r = cli("run", "--rm", "-q", busybox_ref, "sh", "-c", "echo out; echo err >&2; exit 5",
            check=False)
    assert (r.returncode, r.stdout, r.stderr) == (5, "out\n", "err\n")
    assert cli("ps", "-a").stdout.strip().splitlines()[1:] == []
    assert cli("pods").stdout.strip().splitlines()[1:] == []


def test_detached_ps_exec_logs_stop_rm(cli, busybox_ref):
    name = "c" + uuid.uuid4().hex[:6]
    cid = cli("run", "-d", "-q", "--name", name, "--memory", "64m", "--pids", "20", busybox_ref,
              "sh", "-c", "echo hello; sleep 60").stdout.strip()
    assert len(cid) == 64
    ps = cli("ps").stdout
    assert cid[:12] in ps and "running" in ps and name in ps
    r = cli("exec", cid[:12], "sh", "-c", "hostname; exit 2", check=False)
    assert r.returncode == 2 and r.stdout.strip() == name
    assert "hello" in cli("logs", cid).stdout
    r = cli("rm", cid, check=False)
    assert r.returncode == 1 and "running" in r.stderr
    cli("stop", "-t", "0", cid)
    assert "exited" in cli("ps", "-a").stdout
    cli("rm", cid)
    assert cid[:12] not in cli("ps", "-a").stdout
    assert cli("pods").stdout.strip().splitlines()[1:] == []


def test_errors_and_exit_codes(cli):
    r = cli("logs", "ffffffffffff", check=False)
    assert r.returncode == 3 and "not found" in r.stderr
    r = cli("run", "--memory", "lots", "x", "true", check=False)
    assert r.returncode == 2
