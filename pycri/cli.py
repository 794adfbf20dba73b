"""The `pycri` command.

Exit codes (stable, for scripts):
  0  success
  1  failure not covered below
  2  bad usage or invalid argument
  3  not found (image, reference, file)
  4  registry or network failure, or authentication refused
  5  integrity failure: digest mismatch, malformed or hostile image or layer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

from pycri import errors
from pycri.image import Image, PullProgress
from pycri.reference import familiar

EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.NotFoundError, 3),
    (errors.InvalidImageError, 5),
    (errors.InvalidArgumentError, 2),
    (errors.RegistryError, 4),
    (errors.DigestMismatchError, 5),
    (errors.InvalidLayerError, 5),
    (errors.ResourceExhaustedError, 5),
    (errors.UnsupportedError, 5),
    (errors.PycriError, 1),
]


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


class _Bars:
    """Per-layer progress bars on stderr (redrawn in place on a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.rows: dict[str, tuple[int, int, str]] = {}
        self.lock = threading.Lock()
        self.drawn = 0

    def __call__(self, p: PullProgress) -> None:
        with self.lock:
            old = self.rows.get(p.digest)
            self.rows[p.digest] = (p.completed, p.total, p.status)
            if self.tty:
                self._redraw()
            elif p.status in ("done", "exists") and (old is None or old[2] != p.status):
                print(f"{p.digest[7:19]}: {p.status} {_human(p.total)}", file=sys.stderr)

    def _redraw(self) -> None:
        out = []
        if self.drawn:
            out.append(f"\x1b[{self.drawn}F")
        for digest, (done, total, status) in self.rows.items():
            frac = min(1.0, done / total) if total else 1.0
            bar = "#" * int(frac * 30)
            out.append(f"\x1b[2K{digest[7:19]} [{bar:<30}] {_human(done):>9} / "
                       f"{_human(total):<9} {status}\n")
        self.drawn = len(self.rows)
        sys.stderr.write("".join(out))
        sys.stderr.flush()


def _runtime(args: argparse.Namespace) -> Any:
    from pycri.runtime import Runtime

    return Runtime(root=args.root, state=args.state,
                   registry_config_dir=args.registry_config_dir,
                   insecure_registries=tuple(args.insecure_registry or ()))


def cmd_pull(args: argparse.Namespace) -> int:
    from pycri.config import Auth

    rt = _runtime(args)
    auth = None
    if args.user:
        user, _, password = args.user.partition(":")
        if not password and sys.stdin.isatty():
            import getpass

            password = getpass.getpass("Password: ")
        auth = Auth(username=user, password=password)
    t0 = time.monotonic()
    img = rt.images.pull(args.ref, auth=auth, progress=None if args.quiet else _Bars())
    if not args.quiet:
        print(f"pulled {args.ref} in {time.monotonic() - t0:.2f}s", file=sys.stderr)
    print(img.id)
    return 0


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_images(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    images: list[Image] = rt.images.list()
    if args.quiet:
        for img in images:
            print(img.id)
        return 0
    rows = [["IMAGE", "TAG", "IMAGE ID", "SIZE"]]
    for img in images:
        tags = img.repo_tags or tuple(d.split("@")[0] + ":<none>" for d in img.repo_digests[:1])
        for t in tags:
            name, _, tag = t.rpartition(":")
            rows.append([familiar(name), tag, img.id[7:19], _human(img.size)])
    _table(rows)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    out = [rt.images.get(r).to_json() for r in args.refs]
    json.dump(out if len(out) > 1 else out[0], sys.stdout, indent=2)
    print()
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    rc = 0
    for r in args.refs:
        try:
            rt.images.remove(r)
            print(f"Deleted: {r}")
        except errors.NotFoundError as e:
            print(f"pycri: {e}", file=sys.stderr)
            rc = 3
    return rc


def cmd_tag(args: argparse.Namespace) -> int:
    _runtime(args).images.tag(args.source, args.target)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for img in rt.images.import_archive(args.path, progress=None if args.quiet else _Bars()):
        print(img.id, " ".join(img.repo_tags))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _runtime(args).images.export(args.refs, args.output)
    return 0


RUN_LABEL = "io.pycri.cli.run"


def _size(text: str) -> int:
    """'512m', '1g', '1048576' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (like 256m or 1g)") from None


def _ulimit(text: str) -> tuple[str, tuple[int, int]]:
    """'nofile=1024:2048', 'nofile=4096' (soft = hard), 'core=unlimited' -> (name, (soft, hard))."""
    from pycri.config import RLIM_UNLIMITED, rlimit_name
    from pycri.errors import InvalidArgumentError

    name, sep, values = text.partition("=")
    try:
        if not sep or not values:
            raise ValueError
        key = rlimit_name(name.strip())
        parts = values.split(":")
        if len(parts) > 2:
            raise ValueError
        nums = [RLIM_UNLIMITED if v.strip() in ("unlimited", "-1") else int(v) for v in parts]
        if any(n < RLIM_UNLIMITED for n in nums):
            raise ValueError
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a ulimit: {text!r} (like nofile=1024:2048, nofile=4096 or core=unlimited)"
        ) from None
    return key, (nums[0], nums[-1])


def _sysctl(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"not a sysctl: {text!r} (like net.ipv4.ip_forward=1)")
    return k.strip(), v


def _image_for(rt: Any, ref: str, quiet: bool) -> Any:
    from pycri.errors import NotFoundError

    try:
        return rt.images.get(ref)
    except NotFoundError:
        return rt.images.pull(ref, progress=None if quiet else _Bars())


def _follow(container: Any, stdout: Any, stderr: Any, follow: bool) -> None:
    """Copy the container's log to our stdout/stderr, following until it exits."""
    path = container.log_path
    pos = 0
    buf = b""
    while True:
        # look at the state before reading: the monitor writes the last output
        # before it records the exit, so one more read after "exited" gets it all
        running = follow and container.state == "running"
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
                pos += len(data)
        except FileNotFoundError:
            data = b""
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            from pycri.logs import parse_record

            rec = parse_record(line)
            out = stdout if rec.stream == "stdout" else stderr
            out.write(rec.content + (b"" if rec.partial else b"\n"))
            out.flush()
        if not running:
            return
        time.sleep(0.05)


def cmd_run(args: argparse.Namespace) -> int:
    import secrets

    import pycri

    rt = _runtime(args)
    img = _image_for(rt, args.image, args.quiet)
    res = pycri.Resources(
        memory_limit_in_bytes=args.memory or 0,
        memory_swap_limit_in_bytes=args.memory or 0,
        cpu_period=100_000 if args.cpus else 0,
        cpu_quota=int(args.cpus * 100_000) if args.cpus else 0,
        pids_limit=args.pids or 0)
    name = args.name or "run-" + secrets.token_hex(4)
    # the whole config first: a bad one leaves no pod behind
    cfg = pycri.ContainerConfig(
        name=name, image=img.id, command=tuple(args.command), tty=args.tty,
        stdin=args.interactive, env=tuple(_kv(e) for e in args.env or ()),
        resources=res, labels={RUN_LABEL: "run"}, privileged=args.privileged,
        rlimits=dict(args.ulimit or ()), sysctls=dict(args.sysctl or ()))
    sb = rt.run_sandbox(pycri.SandboxConfig(name=name, hostname=args.hostname or "",
                                            labels={RUN_LABEL: "run"},
                                            privileged=args.privileged))
    try:
        try:
            c = sb.create_container(cfg)
        except BaseException:
            sb.remove()  # the pod was made for this container only
            raise
        c.start()
        if args.detach:
            print(c.id)
            return 0
        if args.interactive or args.tty:
            _attach(c, args.tty)
        else:
            _follow(c, sys.stdout.buffer, sys.stderr.buffer, follow=True)
        return int(c.wait())
    finally:
        if args.rm and not args.detach:
            sb.remove()


def _kv(e: str) -> tuple[str, str]:
    k, sep, v = e.partition("=")
    if not sep:
        v = os.environ.get(k, "")
    return k, v


def _attach(container: Any, tty: bool) -> None:
    """Relay our terminal to the container through its monitor's attach socket."""
    import select
    import termios
    import tty as ttymod

    from pycri import _native

    sock = container.attach()
    fd_in = sys.stdin.fileno()
    old = None
    if tty and os.isatty(fd_in):
        old = termios.tcgetattr(fd_in)
        ttymod.setraw(fd_in)
        rows, cols = os.get_terminal_size(fd_in)
        sock.sendall(_native.attach_resize_frame(rows, cols))
    try:
        stdin_open = True
        while True:
            rl = [sock] + ([fd_in] if stdin_open else [])
            ready, _, _ = select.select(rl, [], [])
            if sock in ready:
                frame = _native.attach_read_frame(sock)
                if frame is None or frame[0] == _native.ATTACH_EXIT:
                    return
                kind, data = frame
                out = sys.stderr.buffer if kind == _native.ATTACH_STDERR else sys.stdout.buffer
                out.write(data)
                out.flush()
            if stdin_open and fd_in in ready:
                data = os.read(fd_in, 65536)
                if not data:
                    sock.sendall(_native.attach_frame(_native.ATTACH_CLOSE_STDIN))
                    stdin_open = False
                else:
                    sock.sendall(_native.attach_frame(_native.ATTACH_STDIN, data))
    finally:
        if old is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, old)
        sock.close()


def cmd_ps(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "STATE", "NAME", "POD ID"]]
    for c in rt.containers():
        st = c.status()
        if st.state != "running" and not args.all:
            continue
        cmd = " ".join(st.config.command + st.config.args)[:30]
        rows.append([c.id[:12], familiar(st.image.rsplit("@", 1)[0]), cmd,
                     st.state + (f" ({st.exit_code})" if st.state == "exited" else ""),
                     st.name, st.sandbox_id[:12]])
    _table(rows)
    return 0


def cmd_pods(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    rows = [["POD ID", "NAME", "STATE", "IP", "CONTAINERS"]]
    for sb in rt.sandboxes():
        st = sb.status()
        rows.append([sb.id[:12], st.config.name, st.state, st.ip or "-",
                     str(len(sb.containers()))])
    _table(rows)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    c = rt.container(args.container)
    if args.interactive or args.tty:
        import select

        p = c.exec(args.command, tty=args.tty, stdin=args.interactive)
        fds = {p.pty: sys.stdout.buffer} if p.pty >= 0 else {p.stdout: sys.stdout.buffer,
                                                              p.stderr: sys.stderr.buffer}
        src = sys.stdin.fileno()
        sink = p.pty if p.pty >= 0 else p.stdin
        try:
            while fds:
                rl = list(fds) + ([src] if sink >= 0 else [])
                ready, _, _ = select.select(rl, [], [])
                for fd in ready:
                    if fd == src:
                        data = os.read(src, 65536)
                        if data:
                            os.write(sink, data)
                        elif p.pty < 0:
                            p.close_stdin()
                            sink = -1
                        else:
                            sink = -1
                        continue
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        del fds[fd]
                    else:
                        fds[fd].write(data)
                        fds[fd].flush()
        finally:
            p.close()
        return p.wait()
    r = c.exec_sync(args.command, timeout=args.timeout)
    sys.stdout.buffer.write(r.stdout)
    sys.stderr.buffer.write(r.stderr)
    return r.exit_code


def cmd_logs(args: argparse.Namespace) -> int:
    c = _runtime(args).container(args.container)
    _follow(c, sys.stdout.buffer, sys.stderr.buffer, follow=args.follow)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for cid in args.containers:
        rt.container(cid).stop(timeout=args.time)
        print(cid)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for cid in args.containers:
        c = rt.container(cid)
        if c.state == "running" and not args.force:
            raise errors.InvalidStateError(f"container {cid} is running: stop it or use -f")
        sb_id = c.sandbox_id
        c.remove()
        # `pycri run` made a pod for the container: it goes with its last container
        sb = rt.sandbox(sb_id)
        if not sb.containers() and sb.config.labels.get(RUN_LABEL):
            sb.remove()
        print(cid)
    return 0


def cmd_rmp(args: argparse.Namespace) -> int:
    rt = _runtime(args)
    for sid in args.pods:
        rt.sandbox(sid).remove()
        print(sid)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pycri", description="pycri: a container runtime you import")
    p.add_argument("--root", default=os.environ.get("PYCRI_ROOT", "/var/lib/pycri"),
                   help="persistent state directory (default /var/lib/pycri)")
    p.add_argument("--state", default=os.environ.get("PYCRI_STATE", "/run/pycri"),
                   help="runtime state directory (default /run/pycri)")
    p.add_argument("--registry-config-dir", default=None,
                   help="directory of <host>/hosts.toml files (containerd's format)")
    p.add_argument("--insecure-registry", action="append",
                   help="allow plain http to this registry host (repeatable)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="serve the CRI v1 gRPC API (see `pycri serve --help`)")

    s = sub.add_parser("pull", help="pull an image from a registry")
    s.add_argument("ref")
    s.add_argument("-u", "--user", help="USER[:PASSWORD] for the registry")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("images", help="list images")
    s.add_argument("-q", "--quiet", action="store_true", help="only ids")
    s.set_defaults(func=cmd_images)

    s = sub.add_parser("inspect", help="show images as JSON")
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("rmi", help="remove images (by name: that name; by id: all names)")
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=cmd_rmi)

    s = sub.add_parser("tag", help="give an image another name")
    s.add_argument("source")
    s.add_argument("target")
    s.set_defaults(func=cmd_tag)

    s = sub.add_parser("import", help="import an OCI layout (dir or tar) or a docker save tar")
    s.add_argument("path")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("run", help="run a command in a new container (in a pod of its own)")
    s.add_argument("--rm", action="store_true", help="remove the container and pod when done")
    s.add_argument("-d", "--detach", action="store_true", help="print the id and leave it running")
    s.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    s.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    s.add_argument("-e", "--env", action="append", help="KEY=VALUE (repeatable)")
    s.add_argument("--name")
    s.add_argument("--hostname")
    s.add_argument("--memory", type=_size, help="memory limit, like 256m")
    s.add_argument("--cpus", type=float, help="CPU limit, like 0.5")
    s.add_argument("--pids", type=int, help="process count limit")
    s.add_argument("--privileged", action="store_true",
                   help="all capabilities, no seccomp, host devices, writable /sys")
    s.add_argument("--ulimit", action="append", type=_ulimit, metavar="NAME=SOFT[:HARD]",
                   help="a resource limit, like nofile=1024:2048 (repeatable)")
    s.add_argument("--sysctl", action="append", type=_sysctl, metavar="KEY=VALUE",
                   help="a namespaced sysctl, like net.ipv4.ip_forward=1 (repeatable)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("image")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("ps", help="list containers")
    s.add_argument("-a", "--all", action="store_true", help="include exited ones")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("pods", help="list pods")
    s.set_defaults(func=cmd_pods)

    s = sub.add_parser("exec", help="run a command in a running container")
    s.add_argument("-i", "--interactive", action="store_true")
    s.add_argument("-t", "--tty", action="store_true")
    s.add_argument("--timeout", type=float)
    s.add_argument("container")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("logs", help="show a container's output")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("container")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("stop", help="stop containers")
    s.add_argument("-t", "--time", type=float, default=10.0, help="grace period in seconds")
    s.add_argument("containers", nargs="+")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("rm", help="remove containers")
    s.add_argument("-f", "--force", action="store_true", help="stop running ones first")
    s.add_argument("containers", nargs="+")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("rmp", help="remove pods with everything in them")
    s.add_argument("pods", nargs="+")
    s.set_defaults(func=cmd_rmp)

    s = sub.add_parser("export", help="export images as an OCI layout tar")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # the CRI server has its own options (containerd's conventions)
        try:
            from pycri.cri import server
        except ImportError as e:
            print(f"pycri serve needs the CRI extra (pip install 'pycri-runtime[cri]'): {e}",
                  file=sys.stderr)
            return 1
        return int(server.main(argv[1:], prog="pycri serve"))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("pycri: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`pycri inspect x | head`): not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except errors.PycriError as e:
        print(f"pycri: {e}", file=sys.stderr)
        for cls, code in EXIT_CODES:
            if isinstance(e, cls):
                return code
        return 1
    except PermissionError as e:
        print(f"pycri: {e} (pycri needs root)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pycri: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
