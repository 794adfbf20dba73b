"""pycri-monitor with real processes: CRI log records, exit file, surviving its
launcher, log rotation, attach (stdin, tty resize), adopt mode, memory."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from pycri import _native
from pycri.logs import join_lines, parse_cri_log, parse_time, read_log

MON = _native.monitor_path()


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until pid (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"process {pid} still running"
    finally:
        os.close(fd)


def _wait_file(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


class Mon:
    """A monitor started as our child, waited for through --ready-fd."""

    def __init__(self, d, argv, extra_fds=(), **kw):
        self.exit_file = str(d / "exit.json")
        self.log = str(d / "ctr.log")
        self.pid_file = str(d / "ctr.pid")
        r, w = os.pipe()
        cmd = _native.monitor_command(self.exit_file, self.log, argv=argv, ready_fd=w,
                                      pid_file=self.pid_file, **kw)
        self.proc = subprocess.Popen(cmd, pass_fds=(w, *extra_fds), stderr=subprocess.PIPE)
        os.close(w)
        ready = os.read(r, 1)
        os.close(r)
        if ready != b"R":
            err = self.proc.stderr.read()
            self.proc.wait()
            raise AssertionError(f"monitor not ready: {err!r}")
        with open(self.pid_file) as f:
            self.ctr_pid = int(f.read())

    def wait(self, timeout=20):
        assert self.proc.wait(timeout) == 0
        self.proc.stderr.close()
        _wait_gone(self.ctr_pid)
        st = _native.read_exit_file(self.exit_file)
        assert st is not None
        return st

    def records(self):
        return read_log(self.log)


@pytest.fixture
def mon(tmp_path):
    started = []

    def start(argv, **kw):
        m = Mon(tmp_path, argv, **kw)
        started.append(m)
        return m

    yield start
    for m in started:  # never leave anything behind, even when a test failed
        if m.proc.poll() is None:
            try:
                os.kill(m.ctr_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            m.proc.wait(10)
        if m.proc.stderr:
            m.proc.stderr.close()


def test_stdout_stderr_full_lines(mon):
    t0 = time.time_ns()
    m = mon(["sh", "-c", "echo hello; echo oops >&2; echo; echo 'two words'"])
    st = m.wait()
    t1 = time.time_ns()
    recs = m.records()
    out = [(r.stream, r.partial, r.content) for r in recs if r.stream == "stdout"]
    err = [(r.stream, r.partial, r.content) for r in recs if r.stream == "stderr"]
    assert out == [("stdout", False, b"hello"), ("stdout", False, b""),
                   ("stdout", False, b"two words")]
    assert err == [("stderr", False, b"oops")]
    for r in recs:
        assert t0 <= r.time_ns <= t1
    # The raw format: fixed-width RFC3339 UTC with nanoseconds.
    with open(m.log, "rb") as f:
        first = f.readline()
    stamp, stream, tag, rest = first.split(b" ", 3)
    assert len(stamp) == 30 and stamp.endswith(b"Z") and parse_time(stamp) == recs[0].time_ns
    assert (stream, tag, rest) == (b"stdout", b"F", b"hello\n")
    assert st.exit_code == 0 and st.signal == 0 and st.pid == m.ctr_pid
    assert t0 <= st.exited_at_ns <= t1
    assert os.stat(m.log).st_mode & 0o777 == 0o640


def test_long_line_split(mon):
    m = mon([sys.executable, "-c", "import sys; sys.stdout.write('x' * 102400 + '\\n')"])
    m.wait()
    recs = m.records()
    assert len(recs) >= 7
    assert all(r.partial for r in recs[:-1]) and not recs[-1].partial
    assert all(len(r.content) <= 16384 for r in recs)
    assert b"".join(r.content for r in recs) == b"x" * 102400
    assert list(join_lines(recs)) == [("stdout", b"x" * 102400, True)]


def test_small_max_line_exact(mon):
    m = mon(["printf", "abcdefghij\\n0123456789abc\\n"], log_max_line=10)
    m.wait()
    got = [(r.partial, r.content) for r in m.records()]
    # Exactly max_line bytes is one F record; more is P + F.
    assert got == [(False, b"abcdefghij"), (True, b"0123456789"), (False, b"abc")]


def test_no_trailing_newline_is_partial(mon):
    m = mon(["printf", "line\\nno newline"])
    m.wait()
    got = [(r.partial, r.content) for r in m.records()]
    assert got == [(False, b"line"), (True, b"no newline")]
    assert list(join_lines(m.records()))[-1] == ("stdout", b"no newline", False)


def test_exit_code(mon):
    st = mon(["sh", "-c", "exit 3"]).wait()
    assert (st.exit_code, st.signal, st.oom_killed) == (3, 0, False)


def test_killed_by_signal(mon):
    st = mon(["sh", "-c", "kill -9 $$"]).wait()
    assert (st.exit_code, st.signal) == (137, 9)


def test_oom_flag_logic(mon, tmp_path):
    """oom_killed needs both a SIGKILL and a grown oom_kill count in --oom-file."""
    f = tmp_path / "memory.events"
    f.write_text("oom 0\noom_kill 0\n")
    st = mon(["sh", "-c", "kill -9 $$"], oom_file=str(f)).wait()
    assert (st.signal, st.oom_killed) == (9, False)
    os.unlink(tmp_path / "exit.json")
    st = mon(["sh", "-c", f"printf 'oom 1\\noom_kill 1\\n' > {f}; kill -9 $$"],
             oom_file=str(f)).wait()
    assert (st.signal, st.oom_killed) == (9, True)
    os.unlink(tmp_path / "exit.json")
    st = mon(["sh", "-c", f"printf 'oom_kill 2\\n' > {f}; exit 1"], oom_file=str(f)).wait()
    assert (st.exit_code, st.oom_killed) == (1, False)


def test_sigterm_is_forwarded(mon):
    m = mon(["sleep", "30"])
    os.kill(m.proc.pid, signal.SIGTERM)
    st = m.wait()
    assert (st.exit_code, st.signal) == (143, 15)


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """{child pid: (state, comm)} of pid, from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out[int(name)] = (fields[0], comm)
    return out


def test_orphans_are_reaped(mon):
    """A grandchild orphaned inside the container is re-parented to the monitor
    (child subreaper) and reaped when it exits: no zombie is left."""
    m = mon(["sh", "-c", "(sleep 0.6 >/dev/null 2>&1 &); exec sleep 3"])
    deadline = time.monotonic() + 5
    while not any(c[1] == "sleep" and p != m.ctr_pid for p, c in _children(m.proc.pid).items()):
        assert time.monotonic() < deadline, _children(m.proc.pid)
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while set(_children(m.proc.pid)) != {m.ctr_pid}:
        assert time.monotonic() < deadline, _children(m.proc.pid)
        time.sleep(0.02)
    os.kill(m.ctr_pid, signal.SIGKILL)
    assert m.wait().signal == 9


def test_exec_failure_is_a_setup_error(tmp_path):
    with pytest.raises(AssertionError, match="exec"):
        Mon(tmp_path, ["/nonexistent/binary"])
    assert not os.path.exists(tmp_path / "exit.json")


def test_survives_launcher_sigkill(tmp_path):
    """The launching Python process dies by SIGKILL; the monitor records the exit."""
    exit_file = str(tmp_path / "exit.json")
    log = str(tmp_path / "ctr.log")
    pid_file = str(tmp_path / "ctr.pid")
    go = str(tmp_path / "go")
    cmd = _native.monitor_command(
        exit_file, log, pid_file=pid_file,
        argv=["sh", "-c", (f"echo started; while [ ! -e {go} ]; do sleep 0.02; done; "
                           "echo finished; exit 5")])
    launcher_code = ("import subprocess, sys, time\n"
                     f"p = subprocess.Popen({cmd!r})\n"
                     "print(p.pid, flush=True)\n"
                     "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE)
    mon_pid = int(launcher.stdout.readline())
    _wait_file(pid_file)
    launcher.kill()
    assert launcher.wait(5) == -signal.SIGKILL
    launcher.stdout.close()
    # The monitor is now an orphan, re-parented away from the dead launcher.
    os.kill(mon_pid, 0)
    with open(pid_file) as f:
        ctr_pid = int(f.read())
    assert not os.path.exists(exit_file)
    with open(go, "w"):
        pass
    _wait_file(exit_file)
    st = _native.read_exit_file(exit_file)
    assert (st.pid, st.exit_code) == (ctr_pid, 5)
    _wait_gone(mon_pid)
    _wait_gone(ctr_pid)
    assert [r.content for r in read_log(log)] == [b"started", b"finished"]


def test_launch_monitor_detached(tmp_path):
    exit_file = str(tmp_path / "exit.json")
    log = str(tmp_path / "ctr.log")
    mon_pid, _ctr_pid = _native.launch_monitor(exit_file, log, ["sh", "-c", "echo hi; exit 7"])
    with pytest.raises(ChildProcessError):
        os.waitpid(mon_pid, os.WNOHANG)  # not our child: nothing to reap here
    _wait_file(exit_file)
    assert _native.read_exit_file(exit_file).exit_code == 7
    _wait_gone(mon_pid)
    assert [r.content for r in read_log(log)] == [b"hi"]
    with pytest.raises(OSError, match="exec"):
        _native.launch_monitor(exit_file, log, ["/nonexistent"])


def test_log_reopen_on_sigusr1(mon, tmp_path):
    go = str(tmp_path / "go")
    m = mon(["sh", "-c", f"echo one; while [ ! -e {go} ]; do sleep 0.02; done; echo two"])
    deadline = time.monotonic() + 10
    while not (os.path.exists(m.log) and os.path.getsize(m.log) > 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.rename(m.log, m.log + ".1")
    os.kill(m.proc.pid, signal.SIGUSR1)
    _wait_file(m.log)
    with open(go, "w"):
        pass
    m.wait()
    assert [r.content for r in read_log(m.log + ".1")] == [b"one"]
    assert [r.content for r in read_log(m.log)] == [b"two"]


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(path)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()  # bound but not yet listening (adopt test polls for the file)
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _read_until(s, want: bytes):
    got = {}
    while True:
        fr = _native.attach_read_frame(s)
        assert fr is not None, f"EOF before {want!r}; got {got!r}"
        kind, data = fr
        got[kind] = got.get(kind, b"") + data
        if want in got.get(_native.ATTACH_STDOUT, b""):
            return got


def test_attach_stdin_echo(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    m = mon(["sh", "-c", "while read l; do echo \"got:$l\"; echo \"err:$l\" >&2; done; exit 4"],
            stdin=True, attach_socket=sock)
    st_mode = os.stat(sock).st_mode
    assert st_mode & 0o777 == 0o600
    s = _connect(sock)
    s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"hello\n"))
    got = _read_until(s, b"got:hello\n")
    # A second client sees the live stream too.
    s2 = _connect(sock)
    time.sleep(0.1)
    s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"again\n"))
    _read_until(s2, b"got:again\n")
    s.sendall(_native.attach_frame(_native.ATTACH_CLOSE_STDIN))
    frames = []
    while (fr := _native.attach_read_frame(s)) is not None:
        frames.append(fr)
    assert frames[-1] == (_native.ATTACH_EXIT, b"4")
    s.close()
    s2.close()
    st = m.wait()
    assert st.exit_code == 4
    lines = [(st_, c) for st_, c, _ in join_lines(m.records())]
    assert ("stdout", b"got:hello") in lines and ("stderr", b"err:hello") in lines
    assert ("stdout", b"got:again") in lines
    assert got.get(_native.ATTACH_STDERR, b"").startswith(b"err:") or True
    assert not os.path.exists(sock)  # removed at exit


def test_attach_stdin_backpressure(mon, tmp_path):
    """1 MiB of stdin to a container that reads late: nothing lost, nothing stuck."""
    sock = str(tmp_path / "attach.sock")
    m = mon(["sh", "-c", "sleep 0.5; wc -c"], stdin=True, attach_socket=sock)
    s = _connect(sock)
    chunk = b"z" * 65536
    for _ in range(16):
        s.sendall(_native.attach_frame(_native.ATTACH_STDIN, chunk))
    s.sendall(_native.attach_frame(_native.ATTACH_CLOSE_STDIN))
    got = _read_until(s, b"\n")
    assert got[_native.ATTACH_STDOUT].strip() == b"1048576"
    s.close()
    assert m.wait().exit_code == 0


def test_attach_client_that_never_reads_is_dropped(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    go = str(tmp_path / "go")
    code = (f"import os, time\nwhile not os.path.exists({go!r}): time.sleep(0.01)\n"
            "import sys\nfor i in range(4096): sys.stdout.write('w' * 1023 + '\\n')\n")
    m = mon([sys.executable, "-c", code], attach_socket=sock)
    lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(sock)
    time.sleep(0.1)
    with open(go, "w"):
        pass
    t0 = time.monotonic()
    assert m.wait(30).exit_code == 0
    # One second of grace for the lazy client, then it is dropped and output flows.
    assert 0.9 < time.monotonic() - t0 < 10
    assert len(m.records()) == 4096  # the log got everything
    got = b""
    while chunk := lazy.recv(65536):
        got += chunk
    lazy.close()
    assert len(got) < 4096 * 1024  # dropped part-way, so no exit frame either
    assert got[:1] == bytes([_native.ATTACH_STDOUT])


def test_attach_rejects_garbage(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    m = mon(["cat"], stdin=True, attach_socket=sock)
    bad = _connect(sock)
    bad.sendall(b"\x09\xff\xff\xff\xff")  # unknown type, huge length
    assert bad.recv(10) == b""  # dropped
    bad.close()
    good = _connect(sock)
    good.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"still here\n"))
    _read_until(good, b"still here\n")
    good.sendall(_native.attach_frame(_native.ATTACH_CLOSE_STDIN))
    good.close()
    assert m.wait().exit_code == 0


def test_tty_without_stdin_ignores_input(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    # Input written to a pty is echoed by the line discipline, so it would show.
    m = mon(["sh", "-c", "sleep 0.5; echo done"], tty=True, attach_socket=sock)
    s = _connect(sock)
    s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"sneaky\n"))
    m.wait()
    s.close()
    text = b"".join(c for _, c, _ in join_lines(m.records()))
    assert b"sneaky" not in text and b"done" in text


def test_no_stdin_means_devnull(mon):
    m = mon(["sh", "-c", "cat; echo done"])
    m.wait()
    assert [r.content for r in m.records()] == [b"done"]


def test_tty_resize_and_input(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    m = mon(["sh", "-c", "read l; stty size; echo \"tty:$l\"; [ -t 0 ] && echo isatty"],
            tty=True, stdin=True, attach_socket=sock)
    s = _connect(sock)
    s.sendall(_native.attach_resize_frame(40, 100))
    s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"go\n"))
    got = _read_until(s, b"isatty")
    s.close()
    assert b"40 100" in got[_native.ATTACH_STDOUT]
    m.wait()
    recs = m.records()
    assert {r.stream for r in recs} == {"stdout"}
    text = b"\n".join(c for _, c, _ in join_lines(recs)).replace(b"\r", b"")
    assert b"40 100" in text and b"tty:go" in text


def test_adopt(tmp_path):
    """A launcher forks the container, then execs the monitor with --adopt."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    exit_file = str(tmp_path / "exit.json")
    log = str(tmp_path / "ctr.log")
    pid_file = str(tmp_path / "ctr.pid")
    script = (f"sh -c 'sleep 0.2; echo adopted; echo e >&2; exit 9' >&{out_w} 2>&{err_w} & "
              f"pid=$!; exec {out_w}>&- {err_w}>&-; "
              f"exec {MON} --exit-file {exit_file} --log {log} --pid-file {pid_file} "
              f"--adopt $pid --stdout-fd {out_r} --stderr-fd {err_r}")
    p = subprocess.Popen(["bash", "-c", script], pass_fds=(out_r, out_w, err_r, err_w))
    for fd in (out_r, out_w, err_r, err_w):
        os.close(fd)
    assert p.wait(20) == 0
    st = _native.read_exit_file(exit_file)
    assert st.exit_code == 9
    with open(pid_file) as f:
        assert int(f.read()) == st.pid
    got = sorted((r.stream, r.content) for r in read_log(log))
    assert got == [("stderr", b"e"), ("stdout", b"adopted")]


def test_adopt_tty(tmp_path):
    """--adopt with a pty: the launcher made the pty, the container has the slave."""
    master, slave = os.openpty()
    exit_file = str(tmp_path / "exit.json")
    log = str(tmp_path / "ctr.log")
    sock = str(tmp_path / "a.sock")
    script = (f"setsid -c sh -c 'read l; echo \"tty:$l\"; stty size' <&{slave} >&{slave} 2>&{slave} & "
              f"pid=$!; exec {slave}>&-; "
              f"exec {MON} --exit-file {exit_file} --log {log} --tty --stdin --attach-socket {sock} "
              f"--adopt $pid --pty-master-fd {master}")
    p = subprocess.Popen(["bash", "-c", script], pass_fds=(master, slave))
    os.close(master)
    os.close(slave)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.01)
    s = _connect(sock)
    s.sendall(_native.attach_resize_frame(33, 77))
    s.sendall(_native.attach_frame(_native.ATTACH_STDIN, b"hi\n"))
    got = _read_until(s, b"33 77")
    s.close()
    assert b"tty:hi" in got[_native.ATTACH_STDOUT]
    assert p.wait(20) == 0
    assert _native.read_exit_file(exit_file).exit_code == 0
    assert {r.stream for r in read_log(log)} == {"stdout"}


def test_adopt_requires_own_child(tmp_path):
    r = subprocess.run([MON, "--exit-file", str(tmp_path / "x"), "--log", str(tmp_path / "l"),
                        "--adopt", "1"], check=False, capture_output=True)
    assert r.returncode == 1 and b"not a child" in r.stderr


@pytest.mark.parametrize("args", [[], ["--log", "x", "--", "true"], ["--exit-file", "x", "--", "true"],
                                  ["--exit-file", "x", "--log", "y"],
                                  ["--exit-file", "x", "--log", "y", "--bogus", "--", "true"],
                                  ["--exit-file", "x", "--log", "y", "--attach-socket", "rel.sock",
                                   "--", "true"],
                                  ["--exit-file", "x", "--log", "y", "--log-max-line", "0", "--",
                                   "true"],
                                  ["--exit-file", "x", "--log", "/tmp/y", "--", "true"],
                                  ["--exit-file", "/tmp/x", "--log", "/tmp/y", "--detach",
                                   "--adopt", "1"]])
def test_bad_command_lines(tmp_path, args):
    r = subprocess.run([MON, *args], check=False, capture_output=True, cwd=tmp_path, timeout=10)
    assert r.returncode == 1 and r.stderr.startswith(b"pycri-monitor:")
    assert not os.path.exists(tmp_path / "x")


def test_container_sees_only_stdio(mon):
    """Fds the launcher leaks into the monitor reach neither it nor the container."""
    r, w = os.pipe()
    try:
        m = mon(["sh", "-c", "ls /proc/$$/fd"], extra_fds=(r, w))
        m.wait()
        assert sorted(rec.content for rec in m.records()) == [b"0", b"1", b"2"]
    finally:
        os.close(r)
        os.close(w)


def test_monitor_holds_no_stray_fds(mon, tmp_path):
    r, w = os.pipe()
    try:
        m = mon(["sleep", "30"], extra_fds=(r, w), attach_socket=str(tmp_path / "a.sock"))
        # stdio (/dev/null), log, signalfd, listening socket, stdout and stderr pipes,
        # the unnamed exit file-to-be (O_TMPFILE in the exit file's dir); a set-up fd
        # may still be open for a moment right after launch, so poll briefly
        deadline = time.monotonic() + 2
        while True:
            fds = os.listdir(f"/proc/{m.proc.pid}/fd")
            targets = [os.readlink(f"/proc/{m.proc.pid}/fd/{fd}") for fd in fds]
            assert f"pipe:[{os.fstat(w).st_ino}]" not in targets
            assert f"pipe:[{os.fstat(r).st_ino}]" not in targets
            if len(fds) <= 9 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(fds) <= 9, sorted(targets)
        unnamed = [t for t in targets if t.endswith(" (deleted)")]   # (made as it settles)
        assert all(t.startswith(str(tmp_path) + "/#") for t in unnamed) and len(unnamed) <= 1, \
            targets
        os.kill(m.ctr_pid, signal.SIGKILL)
        m.wait()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")
def test_oom_killed_recorded(tmp_path):
    import uuid

    from pycri.cgroup import CgroupManager, Resources

    mgr = CgroupManager("pycri-test-" + uuid.uuid4().hex[:8])
    pod = mgr.create_pod("pod")
    ctr = mgr.create_container("pod", "ctr", Resources(memory_limit_in_bytes=32 << 20,
                                                       memory_swap_limit_in_bytes=32 << 20))
    try:
        mem = ctr._dir_for("memory")
        oom_file = os.path.join(mem, "memory.events" if ctr.v2 else "memory.oom_control")
        exit_file = str(tmp_path / "exit.json")
        cmd = _native.monitor_command(
            exit_file, str(tmp_path / "log"), oom_file=oom_file,
            argv=[sys.executable, "-c", "b=[]\nwhile True: b.append(bytearray(1 << 20))"])

        def join():
            for f in ctr.procs_files():
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))

        p = subprocess.Popen(cmd, preexec_fn=join)  # noqa: PLW1509
        assert p.wait(60) == 0
        st = _native.read_exit_file(exit_file)
        assert (st.signal, st.oom_killed) == (9, True)
    finally:
        ctr.destroy()
        pod.destroy()
        mgr.remove_parent()


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss")


def test_memory_is_small(mon, tmp_path):
    sock = str(tmp_path / "attach.sock")
    code = ("import sys\nfor i in range(2000): print('y' * 100)\n"
            "sys.stdout.flush()\nimport time; time.sleep(30)")
    m = mon([sys.executable, "-c", code],
            stdin=True, attach_socket=sock)
    deadline = time.monotonic() + 10
    while len(m.records()) < 2000:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with open(f"/proc/{m.proc.pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    pss = _pss_kb(m.proc.pid)
    assert rss < 4096 and pss < 4096, (rss, pss)
    os.kill(m.ctr_pid, signal.SIGKILL)
    assert m.wait().signal == 9


def test_parse_cri_log_rejects_garbage():
    from pycri.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        parse_cri_log([b"not a record\n"])
    with pytest.raises(InvalidArgumentError):
        parse_cri_log(["2024-01-01T00:00:00Z stdin F x"])
    recs = parse_cri_log(["2024-01-01T00:00:00.5+01:00 stderr P a b \n",
                          "2024-01-01T00:00:01Z stderr F c\n"])
    assert recs[0].time_ns == 1704063600 * 10 ** 9 + 500_000_000
    assert recs[0].content == b"a b "
    assert list(join_lines(recs)) == [("stderr", b"a b c", True)]
