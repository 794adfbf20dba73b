"""A container's own terminal (ContainerConfig.tty): a pty of the container's own
devpts instance, made by the container process after its /dev is mounted; the
master goes back over the spawn socket and ends up with the monitor.
"""

from __future__ import annotations

import json
import os
import time

import pycri
from pycri import _native
from test_container import env, probe_image  # noqa: F401 - fixtures
from test_monitor import _read_until


def _wait_output(c, want: bytes, timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        text = b"".join(r.content + (b"" if r.partial else b"\n") for r in c.logs())
        if want in text or time.monotonic() > deadline:
            return text.replace(b"\r", b"")
        time.sleep(0.05)


def test_container_tty_is_its_own_devpts(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="tty")) as sb:
        r = sb.run(img, ["sh", "-c", "tty; ls /dev/pts; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && "
                         "echo all-ttys"], timeout=10, tty=True)
        lines = r.stdout.replace(b"\r", b"").split(b"\n")
        assert r.exit_code == 0, r
        # numbered from 0 in a devpts no other container (and not the host) shares
        assert lines[0] == b"/dev/pts/0"
        assert lines[1].split() == [b"0", b"ptmx"]
        assert b"all-ttys" in r.stdout
        assert r.stderr == b""  # a tty has one stream
        r = sb.run(img, ["probe"], timeout=10, tty=True)
        assert sorted(json.loads(r.stdout)["fds"]) == [0, 1, 2]  # no stray pty fd leaks in


def test_tty_owned_by_the_user_and_controlling(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="ttyuser")) as sb:
        r = sb.run(img, ["sh", "-c", "stat -c '%u %g %a' $(tty); "
                         "ls -l /proc/self/fd/0; cat /proc/self/stat"],
                   timeout=10, tty=True, run_as_user=1000)
        out = r.stdout.replace(b"\r", b"").split(b"\n")
        assert r.exit_code == 0, r
        assert out[0] == b"1000 5 620"  # the user's, group tty, mode 0620 (devpts options)
        assert out[1].endswith(b"/dev/pts/0")
        stat = out[2].rsplit(b")", 1)[1].split()
        assert int(stat[4]) == 0x8800  # field 7 tty_nr: /dev/pts/0 (major 136, minor 0)


def test_monitor_owns_master_of_container_devpts(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="ttymon")) as sb:
        c = sb.create_container(pycri.ContainerConfig(
            name="t", image=img.id, tty=True, stdin=True,
            command=("sh", "-c", "read l; stty size; echo \"got:$l\"; tty")))
        rec = c.record()
        mon = rec["monitor_pid"]
        host_pts = os.stat("/dev/pts/ptmx").st_dev
        masters = []
        for fd in os.listdir(f"/proc/{mon}/fd"):
            try:
                link = os.readlink(f"/proc/{mon}/fd/{fd}")
            except FileNotFoundError:
                continue
            if link.endswith("ptmx"):
                masters.append(os.stat(f"/proc/{mon}/fd/{fd}"))
        # exactly one pty master, held from create on, and not of the host's devpts
        assert len(masters) == 1 and masters[0].st_dev != host_pts
        c.start()
        deadline = time.monotonic() + 10
        while True:  # the monitor binds its attach socket just after start returns
            try:
                s = c.attach()
                break
            except pycri.errors.RuntimeFailure:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        s.settimeout(10)
        s.sendall(_native.attach_resize_frame(30, 90))
        s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"hello\n"))
        got = _read_until(s, b"/dev/pts/0")
        s.close()
        text = got[_native.ATTACH_STDOUT].replace(b"\r", b"")
        assert b"30 90\n" in text and b"got:hello\n" in text
        assert c.wait(10) == 0
        assert b"/dev/pts/0" in _wait_output(c, b"/dev/pts/0")
        c.remove()


def test_exec_tty_shares_the_container_devpts(env):  # noqa: F811
    rt, img = env
    with rt.run_sandbox(pycri.SandboxConfig(name="ttyexec")) as sb:
        c = sb.create_container(pycri.ContainerConfig(name="t", image=img.id, tty=True,
                                                      command=("sleep", "60")))
        c.start()
        p = c.exec(["tty"], tty=True)
        out = b""
        while True:
            try:
                chunk = os.read(p.pty, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert p.wait() == 0
        p.close()
        assert out.strip() == b"/dev/pts/1"  # after the container's own /dev/pts/0
        c.stop(timeout=0)
