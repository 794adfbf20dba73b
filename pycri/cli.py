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

    s = sub.add_parser("export", help="export images as an OCI layout tar")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("refs", nargs="+")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("pycri: interrupted", file=sys.stderr)
        return 130
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
