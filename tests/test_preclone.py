"""Pre-cloned container processes (pycri/slots.py, launchplan.standin, csrc/launch.c
PRE/RESUME): a pod's next container process is set up ahead - namespaces, mounts,
pivot_root - and held; a create whose setup is the same resumes it with its own
process config, any other create goes the plain way. Real pods and containers,
probed from inside with the static probe of test_container.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pycri
import test_container
from pycri import _native
from test_container import TREE, _wait_slot

# the fixtures of test_container.py: a Runtime on temp dirs with the probe image
env = test_container.env
probe_image = test_container.probe_image

TIMEOUT = 20


def _held(rt, sb, img=None):
    _wait_slot(rt, sb)
    slot = pycri.slots.peek(rt, sb.id)
    if img is not None and slot.image_id != img.id:
        # (a new pod's first slot premounts the image this process last ran: none yet)
        assert sb.run(img, ["true"]).exit_code == 0
        _wait_slot(rt, sb)
        slot = pycri.slots.peek(rt, sb.id)
    assert slot is not None and slot.pre is not None and slot.pre.alive(), slot
    return slot


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    time.sleep(0.01)    # (a zombie: its parent reaps it next)
                    continue
        except (FileNotFoundError, ProcessLookupError):    # (ESRCH: it is exiting)
            return True
        time.sleep(0.01)
    return False


def _cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def _run(sb, img, argv, **config):
    c = sb.create_container(pycri.ContainerConfig(
        name="c" + os.urandom(4).hex(), image=img.id, command=tuple(argv), **config))
    pid = c._read()["pid"]
    c.start()
    assert c.wait(TIMEOUT) == 0, [r.content for r in c.logs()]
    out = b"\n".join(r.content for r in c.logs() if r.stream == "stdout")
    c.remove()
    return pid, out


def test_held_process_is_resumed_with_the_real_config(env):
    """The held process is outside the pod's memory and pids cgroups while it waits
    (the pod's usage and limits do not see it), in the container's others; the
    create resumes that very process, which then
    runs as the config says: user, groups, capabilities, no_new_privs, seccomp,
    env, working dir, rlimits, oom_score_adj - and in the container's cgroups and
    namespaces, with nothing but its stdio open."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-a", hostname="pre-a")) as sb:
        slot = _held(rt, sb, img)
        held = dict(line.split(":", 2)[1:] for line in _cgroups(slot.pre.pid).splitlines())
        assert f"/{sb.id}/" not in held["memory"] and f"/{sb.id}/" not in held["pids"]
        assert held["cpu"].endswith(f"/{sb.id}/{slot.id}"), held
        c = sb.create_container(pycri.ContainerConfig(
            name="p", image=img.id, command=("probe",),
            run_as_user=1000, run_as_group=2000, supplemental_groups=(3000,),
            cap_drop=("ALL",), cap_add=("CHOWN",), no_new_privs=True,
            env={"FROM_CONFIG": "yes"}, working_dir="/tmp/w", oom_score_adj=300,
            rlimits={"nofile": (123, 456)}))
        assert c.id == slot.id and c._read()["pid"] == slot.pre.pid
        cg = _cgroups(slot.pre.pid)
        assert f"/{sb.id}/{c.id}" in cg or "::/\n" in cg, cg     # (its own cgroup ns)
        c.start()
        assert c.wait(TIMEOUT) == 0
        p = json.loads(b"".join(r.content for r in c.logs() if r.stream == "stdout"))
        assert p["uid"] == [1000] * 3 and p["gid"] == [2000] * 3 and p["groups"] == [2000, 3000]
        assert int(p["CapBnd"], 16) == 1 << 0    # CAP_CHOWN only
        assert p["no_new_privs"] == 1 and p["seccomp"] == 2
        assert p["cwd"] == "/tmp/w"
        assert p["oom_score_adj"] == 300
        assert p["rlimits"]["7"] == [123, 456]     # RLIMIT_NOFILE
        assert p["hostname"] == "pre-a" and p["pid"] == 1
        assert p["fds"] == [0, 1, 2]
        assert c.status().exit_code == 0
        c.remove()


def test_env_comes_from_the_image_and_the_config(env):
    """The stand-in the process was set up with has no env of its own to leak."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-env")) as sb:
        slot = _held(rt, sb, img)
        pid, out = _run(sb, img, ["sh", "-c", "echo $FROM_IMAGE $FROM_CONFIG; cat /proc/1/cmdline"],
                        env={"FROM_CONFIG": "c"})
        assert pid == slot.pre.pid
        lines = out.split(b"\n")
        assert lines[0] == b"1 c" and lines[1].startswith(b"cat\0/proc/1/cmdline")


def test_another_setup_goes_the_plain_way(env):
    """A create whose setup differs from the held process's (a bind mount, other
    masked paths, privileged) ends it first and mounts its own root; each works."""
    rt, img = env
    host = tempfile.mkdtemp(prefix="pycri-pre-")
    with open(os.path.join(host, "f"), "w") as f:
        f.write("from the host")
    try:
        with rt.run_sandbox(pycri.SandboxConfig(name="pre-b", privileged=True)) as sb:
            for config, argv, want in (
                (dict(mounts=(pycri.Mount(container_path="/mnt/h", host_path=host),)),
                 ["cat", "/mnt/h/f"], b"from the host"),
                (dict(masked_paths=("/etc/hostname",)),
                 ["sh", "-c", "wc -c < /etc/hostname"], b"0"),
                (dict(privileged=True), ["sh", "-c", "test -w /sys && echo rw"], b"rw"),
            ):
                _run(sb, img, ["true"])     # (the next held process follows this config)
                slot = _held(rt, sb, img)
                pid, out = _run(sb, img, argv, **config)
                assert pid != slot.pre.pid and out.strip() == want
                assert _gone(slot.pre.pid) and _gone(slot.pre.monitor_pid)
    finally:
        os.unlink(os.path.join(host, "f"))
        os.rmdir(host)


def test_the_next_slot_follows_the_last_config(env):
    """A pod's next held process is set up as its last create was: a pod whose
    containers all mask /etc/hostname gets its held processes set up so, and uses
    them; one whose containers bind-mount gets none (mounts are the config's own
    work) but still a premounted root."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-c")) as sb:
        _held(rt, sb, img)
        _run(sb, img, ["true"], masked_paths=("/etc/hostname",))  # (plain: differs)
        slot = _held(rt, sb, img)
        pid, out = _run(sb, img, ["sh", "-c", "wc -c < /etc/hostname"],
                        masked_paths=("/etc/hostname",))
        assert pid == slot.pre.pid and out.strip() == b"0"
        _run(sb, img, ["true"], mounts=(pycri.Mount(container_path="/mnt/t", host_path="/tmp"),))
        _wait_slot(rt, sb)
        slot = pycri.slots.peek(rt, sb.id)
        assert slot.pre is None and slot.premounted


def test_no_held_process_in_a_shared_pid_namespace(env):
    """Where the pod's containers share its pid namespace a held process would show
    in their ps: none is made."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-pid", pid="pod")) as sb:
        _wait_slot(rt, sb)
        slot = pycri.slots.peek(rt, sb.id)
        assert slot.pre is None
        pid, out = _run(sb, img, ["ps", "-o", "comm="])
        assert sorted(out.split()) == [b"ps", b"pycri-pause"], out     # (the pod's infra)


def test_a_held_process_killed_is_not_used(env):
    """kill -9 of the held process (or its launcher): the create notices and goes
    the plain way."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-kill")) as sb:
        for victim in ("pid", "monitor_pid"):
            slot = _held(rt, sb, img)
            os.kill(getattr(slot.pre, victim), signal.SIGKILL)
            assert _gone(slot.pre.monitor_pid)
            pid, out = _run(sb, img, ["cat", "/etc/hostname"])
            assert pid != slot.pre.pid and out == b"pre-kill"


def test_pod_stop_and_removal_end_the_held_process(env):
    """A pod's stop ends its held process and launcher (nothing of ours stays in its
    namespaces); its removal leaves no mount, cgroup or process behind (the env
    fixture checks mounts and cgroups)."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="pre-stop"))
    slot = _held(rt, sb, img)
    sb.stop()
    assert _gone(slot.pre.pid) and _gone(slot.pre.monitor_pid)
    sb.remove()
    sb = rt.run_sandbox(pycri.SandboxConfig(name="pre-rm"))
    slot = _held(rt, sb, img)
    sb.remove()
    assert _gone(slot.pre.pid) and _gone(slot.pre.monitor_pid)


def test_held_process_goes_with_its_owner(env):
    """kill -9 of the process that holds it: its launcher sees the socket close,
    kills the held process and exits; a new Runtime deletes the slot."""
    rt, img = env
    sb = rt.run_sandbox(pycri.SandboxConfig(name="pre-owner"))
    script = f"""
import sys, os, signal, time; sys.path.insert(0, {TREE!r})
import pycri
rt = pycri.Runtime(root={rt.root!r}, state={rt.state!r}, cgroup_parent={rt.cgroup_parent!r})
sb = rt.sandbox({sb.id!r})
sb.run({img.id!r}, ["true"])
deadline = time.monotonic() + 5
while (s := pycri.slots.peek(rt, sb.id)) is None or s.pre is None:
    assert time.monotonic() < deadline
    time.sleep(0.01)
print(s.pre.pid, s.pre.monitor_pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    pid, launcher = map(int, r.stdout.split())
    assert _gone(pid) and _gone(launcher)
    pycri.Runtime(root=rt.root, state=rt.state, cgroup_parent=rt.cgroup_parent)
    assert not [n for n in os.listdir(f"{rt.root}/slots") if not n.startswith(f"{os.getpid()}.")]
    sb.remove()


def test_tty_stdin_and_exec_on_a_held_process(env):
    """What comes with the resume works as on a plain create: a pty of the
    container's own devpts (made after pivot_root, its master passed back), a
    stdin pipe, and exec into the resumed process's namespaces."""
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="pre-tty")) as sb:
        slot = _held(rt, sb, img)
        c = sb.create_container(pycri.ContainerConfig(
            name="t", image=img.id, tty=True,
            command=("sh", "-c", "tty; test -t 0 && echo interactive")))
        assert c._read()["pid"] == slot.pre.pid
        c.start()
        assert c.wait(TIMEOUT) == 0
        out = b"".join(r.content for r in c.logs())
        assert b"/dev/pts/0" in out and b"interactive" in out, out
        c.remove()

        slot = _held(rt, sb, img)
        c = sb.create_container(pycri.ContainerConfig(
            name="s", image=img.id, stdin=True, command=("sh", "-c", "read x; echo got-$x")))
        assert c._read()["pid"] == slot.pre.pid
        c.start()
        att = c.attach()
        try:
            # (one write: the monitor may hang up as soon as the container has read it)
            att.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"hello\n")
                        + _native.attach_frame(_native.ATTACH_CLOSE_STDIN))
        finally:
            att.close()
        assert c.wait(TIMEOUT) == 0
        assert [r.content for r in c.logs() if r.stream == "stdout"] == [b"got-hello"]
        c.remove()

        slot = _held(rt, sb, img)
        c = sb.create_container(pycri.ContainerConfig(
            name="e", image=img.id, command=("sleep", "30")))
        assert c._read()["pid"] == slot.pre.pid
        c.start()
        r = c.exec_sync(["sh", "-c", "cat /proc/1/cmdline; hostname"])
        assert r.exit_code == 0 and r.stdout.startswith(b"sleep\x0030\x00"), r
        c.stop(timeout=0)
        c.remove()
