"""Hostile layer tarballs (SECURITY.md items 1-7).

Every case is applied into ``sandbox/dest`` next to ``sandbox/outside`` (a sentinel
tree that symlinks in the archive aim at, by absolute and by relative path). Each
case asserts either a typed error or its documented safe outcome, and always:
nothing in the sandbox outside dest changed (a full lstat + content + xattr
snapshot), no fd or feeder thread leaked, and a good layer still applies after.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from test_layer import END, TAR, TGZ, TZST, gnu_long, header, lxattr, member, pax, tar_of

from pycri.errors import InvalidLayerError, PycriError, ResourceExhaustedError
from pycri.layer import LayerLimits, apply_layer

# One sandbox per test process, named at import so archives can name the outside
# dir by its absolute path (a random name: nothing else on the machine can guess
# it and clean it up mid-test); the fixture creates it.
SANDBOX = os.path.join(tempfile.gettempdir(),
                       f"layer-hostile-sandbox-{os.getpid()}-{secrets.token_hex(6)}")
OUT = SANDBOX + "/outside"
DEFAULT_LIMITS = LayerLimits()


@dataclass
class Case:
    id: str
    build: Callable[[str], bytes]      # outside path -> blob
    error: type[Exception] | tuple[type[Exception], ...] | None = None
    match: str | None = None           # regex the error message must contain
    check: Callable[[str, str], None] | None = None  # (dest, outside) for safe outcomes
    media_type: str = TAR
    limits: LayerLimits = DEFAULT_LIMITS


def t(*members: bytes) -> Callable[[str], bytes]:
    """A plain tar of these members."""
    return lambda out: tar_of(*members)


def m(name: str, data: bytes = b"", **kw: object) -> bytes:
    return member(name, data, **kw)


def sym(name: str, target: str, **kw: object) -> bytes:
    return member(name, type=b"2", linkname=target, **kw)


def hl(name: str, target: str) -> bytes:
    return member(name, type=b"1", linkname=target)


def d(name: str, **kw: object) -> bytes:
    return member(name, type=b"5", **kw)


# --- checks for the safe outcomes ------------------------------------------------

def is_file(rel: str, content: bytes) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        p = os.path.join(dest, rel)
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode), p
        assert Path(p).read_bytes() == content
    return check


def is_symlink(rel: str) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        assert stat.S_ISLNK(os.lstat(os.path.join(dest, rel)).st_mode)
    return check


def all_of(*checks: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        for c in checks:
            c(dest, out)
    return check


CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def is_dir(rel: str, mode: int, uid: int) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        st = os.lstat(os.path.join(dest, rel))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        assert st.st_uid == uid
    return check


def is_node(rel: str, fmt: int, rdev: int) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        st = os.lstat(os.path.join(dest, rel))
        assert stat.S_IFMT(st.st_mode) == fmt and st.st_rdev == rdev
    return check


def is_whiteout(rel: str) -> Callable[[str, str], None]:
    return is_node(rel, stat.S_IFCHR, 0)


def absent(rel: str) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        assert not os.path.lexists(os.path.join(dest, rel))
    return check


def has_mode(rel: str, mode: int) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        assert stat.S_IMODE(os.lstat(os.path.join(dest, rel)).st_mode) == mode
    return check


def has_xattr(rel: str, name: str, value: bytes) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        assert lxattr(os.path.join(dest, rel), name) == value
    return check


def no_xattr(rel: str, name: str) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        assert lxattr(os.path.join(dest, rel), name) is None
    return check


def symlink_owned(rel: str, uid: int, mtime: int) -> Callable[[str, str], None]:
    def check(dest: str, out: str) -> None:
        st = os.lstat(os.path.join(dest, rel))
        assert stat.S_ISLNK(st.st_mode) and st.st_uid == uid and st.st_mtime == mtime
    return check


def gz_bomb(out: str) -> bytes:
    # 64 MiB of zeros after a valid header: compresses ~1000:1
    comp = gzip.compress(m("bomb", b"\0" * (64 << 20)), compresslevel=1)
    return comp


def zstd_huge_window(out: str) -> bytes:
    params = zstandard.ZstdCompressionParameters(window_log=30, write_content_size=False)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    blob = cobj.compress(tar_of(m("a", b"x" * 1000))) + cobj.flush()
    assert zstandard.get_frame_parameters(blob).window_size == 1 << 30
    return blob


def pax_record_lies(out: str) -> bytes:
    body = b"99999999 path=x\n"
    return tar_of(member("PaxHeader", body, type=b"x"), m("f", b""))


def long_path(out: str) -> bytes:
    name = "/".join(["c" * 200] * 25)  # ~5000 bytes
    return tar_of(pax({"path": name}), m("f", b""))


def pad_dir_with_hidden_header(out: str) -> bytes:
    hidden = m("../escape", b"boo")
    return header("dir/", type=b"5", size=len(hidden)) + hidden + END


def many_entries(out: str) -> bytes:
    return tar_of(*[m(f"f{i}", b"") for i in range(50)])


def huge_pax_size(out: str) -> bytes:
    return tar_of(member("PaxHeader", b"", type=b"x", size=100 << 20))


CASES = [
    # 1. names
    Case("absolute-name", t(m("/abs", b"a")), check=is_file("abs", b"a")),
    Case("absolute-name-into-outside-path", t(m(OUT + "/pwn", b"p")),
         check=is_file(OUT.lstrip("/") + "/pwn", b"p")),
    Case("dotdot-leading", t(m("../outside/pwn", b"p")), InvalidLayerError,
         "escapes the layer root"),
    Case("dotdot-middle", t(m("a/../../outside/pwn", b"p")), InvalidLayerError, "escapes"),
    Case("dotdot-only", t(d("..")), InvalidLayerError, "escapes"),
    Case("empty-name-file", t(m("", b"x")), InvalidLayerError, "layer root"),
    Case("dot-name-file", t(m("./", b"x", type=b"0")), InvalidLayerError, "layer root"),
    Case("nul-in-pax-path", t(pax({"path": b"a\x00../../outside/pwn"}), m("f", b"")),
         InvalidLayerError, "NUL"),
    Case("nul-in-gnu-longname", t(gnu_long(b"ok\x00../../outside/pwn"), m("f", b"")),
         InvalidLayerError, "NUL"),
    Case("component-over-name-max", t(pax({"path": "n" * 256}), m("f", b"")), InvalidLayerError,
         "longer than 255"),
    Case("path-over-path-max", long_path, InvalidLayerError, "longer than 4096"),
    Case("duplicate-entries-last-wins", t(m("f", b"first"), m("f", b"second")),
         check=is_file("f", b"second")),
    Case("trailing-slash-on-file", t(m("f/", b"data")), check=is_file("f", b"data")),
    Case("file-under-a-file", t(m("f", b"x"), m("f/g", b"y")), InvalidLayerError,
         "Not a directory"),
    # 2. writes through earlier symlinks, type changes
    Case("symlink-absolute-then-write", t(sym("l", OUT), m("l/pwn", b"p")), InvalidLayerError),
    Case("symlink-relative-then-write", t(sym("l", "../../../../outside"), m("l/pwn", b"p")),
         InvalidLayerError),
    Case("symlink-relative-contained", t(d("outside/"), sym("l", "../../../../outside"),
                                         m("l/pwn", b"p")),
         check=is_file("outside/pwn", b"p")),
    Case("symlink-to-root-then-etc", t(sym("r", "/"), m("r/etc/passwd", b"root::0:0")),
         check=is_file("etc/passwd", b"root::0:0")),
    Case("symlink-chain", t(sym("a", "b"), sym("b", "c/../.."), m("a/outside/pwn", b"p")),
         InvalidLayerError),
    Case("symlink-dangling-parent", t(sym("l", "nowhere/dir"), m("l/x", b"")), InvalidLayerError),
    Case("symlink-loop", t(sym("a", "b"), sym("b", "a"), m("a/x", b"")), InvalidLayerError),
    Case("symlink-named-dotdot", t(sym("a/..", OUT)), InvalidLayerError, "escapes"),
    Case("file-over-symlink-replaces-it", t(sym("l", OUT + "/sentinel"), m("l", b"mine")),
         check=is_file("l", b"mine")),
    Case("dir-symlink-dir", t(d("x/"), sym("x", OUT), d("x/"), m("x/f", b"in")),
         check=is_file("x/f", b"in")),
    Case("dir-over-symlink-to-outside-dir", t(sym("s", OUT), d("s/", mode=0o777, uid=99)),
         check=is_dir("s", 0o777, 99)),
    Case("file-then-dir", t(m("x", b"f"), d("x/"), m("x/y", b"y")), check=is_file("x/y", b"y")),
    # 3. hardlinks
    Case("hardlink-absolute-outside", t(hl("h", OUT + "/sentinel")), InvalidLayerError,
         "neither in this layer"),
    Case("hardlink-dotdot", t(hl("h", "../outside/sentinel")), InvalidLayerError, "escapes"),
    Case("hardlink-to-symlink", t(sym("s", OUT + "/sentinel"), hl("h", "s")),
         check=is_symlink("h")),
    Case("hardlink-through-symlinked-parent", t(sym("p", OUT), hl("h", "p/sentinel")),
         InvalidLayerError),
    Case("hardlink-through-relative-symlink", t(sym("p", "../outside"), hl("h", "p/sentinel")),
         InvalidLayerError),
    Case("hardlink-to-directory", t(d("dir/"), hl("h", "dir")), InvalidLayerError,
         "is a directory"),
    Case("hardlink-to-root", t(hl("h", "./")), InvalidLayerError, "layer root"),
    Case("hardlink-then-write-through-symlink-entry", t(sym("s", OUT + "/sentinel"), hl("h", "s"),
                                                        m("h", b"over")),
         check=is_file("h", b"over")),
    # 4. metadata on symlinks never follows
    Case("symlink-chmod-chown-utimes", t(sym("s", OUT + "/sentinel", mode=0o7777, uid=4242,
                                             gid=4242, mtime=77)),
         check=symlink_owned("s", 4242, 77)),
    Case("symlink-xattr", t(pax({"SCHILY.xattr.user.pwn": "1",
                                 "SCHILY.xattr.security.capability": "x"}),
                            sym("s", OUT + "/sentinel")),
         check=all_of(is_symlink("s"), no_xattr("s", "user.pwn"))),
    Case("symlink-dir-xattr-relative", t(pax({"SCHILY.xattr.user.pwn": "1"}),
                                         sym("s", "../outside")),
         check=is_symlink("s")),
    # 5. whiteouts
    Case("whiteout-dot", t(m(".wh..", b"")), InvalidLayerError, "whiteout"),
    Case("whiteout-dotdot", t(m("a/.wh...", b"")), InvalidLayerError, "whiteout"),
    Case("whiteout-empty", t(m("a/.wh.", b"")), InvalidLayerError, "whiteout"),
    Case("whiteout-through-absolute-symlink", t(sym("l", OUT), m("l/.wh.sentinel", b"")),
         InvalidLayerError),
    Case("whiteout-through-relative-symlink", t(sym("l", "../outside"),
                                                m("l/.wh.sentinel", b"")), InvalidLayerError),
    Case("opaque-through-symlink", t(sym("l", OUT), m("l/.wh..wh..opq", b"")), InvalidLayerError),
    Case("whiteout-as-directory", t(m(".wh.x/y", b"")), InvalidLayerError, "whiteout"),
    Case("whiteout-reserved-meta", t(m(".wh..wh.plnk", b"")), InvalidLayerError, "reserved"),
    Case("whiteout-symlink-entry-not-written", t(sym(".wh.x", OUT + "/sentinel")),
         check=all_of(is_whiteout("x"), absent(".wh.x"))),
    Case("whiteout-replaces-symlink-not-target", t(sym("x", OUT + "/sentinel"), m(".wh.x", b"")),
         check=is_whiteout("x")),
    Case("opaque-marker-only-on-its-dir", t(d("a/"), m("a/.wh..wh..opq", b"")),
         check=all_of(has_xattr("a", "trusted.overlay.opaque", b"y"),
                      no_xattr("", "trusted.overlay.opaque"), absent("a/.wh..wh..opq"))),
    # 6. devices, setuid, xattrs
    Case("trusted-xattrs-dropped", t(pax({"SCHILY.xattr.trusted.overlay.opaque": "y",
                                          "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                                          "SCHILY.xattr.trusted.overlay.metacopy": ""}),
                                     d("d/")),
         check=all_of(no_xattr("d", "trusted.overlay.opaque"),
                      no_xattr("d", "trusted.overlay.redirect"))),
    Case("device-kept-in-root", t(m("dev/kmem", type=b"3", devmajor=1, devminor=2)),
         check=is_node("dev/kmem", stat.S_IFCHR, os.makedev(1, 2))),
    Case("fifo-over-symlink-to-outside", t(sym("p", OUT + "/sentinel"), m("p", type=b"6")),
         check=is_node("p", stat.S_IFIFO, 0)),
    Case("device-over-symlink", t(sym("dev", OUT), m("dev/sda", type=b"4", devmajor=8)),
         InvalidLayerError),
    Case("setuid-and-capability-kept", t(pax({"SCHILY.xattr.security.capability": CAP}),
                                         m("su", b"x", mode=0o6755, uid=0)),
         check=all_of(has_mode("su", 0o6755), has_xattr("su", "security.capability", CAP))),
    Case("uid-negative-base256", t(header("f", uid_field=b"\xff" * 8) + END[:0]),
         InvalidLayerError, "out of range"),
    # 7. sizes, bombs, garbage
    Case("pax-header-too-big", huge_pax_size, ResourceExhaustedError, "exceeds the limit"),
    Case("pax-record-length-lies", pax_record_lies, InvalidLayerError, "PAX"),
    Case("pax-sparse", t(pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), m("f", b"")),
         InvalidLayerError, "sparse"),
    Case("gnu-sparse-type", t(m("f", b"", type=b"S")), InvalidLayerError, "sparse"),
    Case("huge-pax-size", t(pax({"size": str(10 ** 15)}), m("f", b"")), ResourceExhaustedError,
         "claims 1000000000000000 bytes"),
    Case("huge-base256-size", t(header("f", size_field=b"\x80" + b"\0" * 4 + b"\x7f" + b"\xff" * 6)),
         ResourceExhaustedError, "over the limit"),
    Case("size-over-limit", t(m("big", b"x" * 100000)), ResourceExhaustedError,
         limits=LayerLimits(max_size=50000)),
    Case("too-many-entries", many_entries, ResourceExhaustedError, "entries",
         limits=LayerLimits(max_entries=10)),
    Case("gzip-ratio-bomb", gz_bomb, ResourceExhaustedError, "bomb", media_type=TGZ,
         limits=LayerLimits(max_ratio=50, ratio_floor=1 << 20)),
    Case("zstd-window-bomb", zstd_huge_window, ResourceExhaustedError, "window",
         media_type=TZST),
    Case("truncated-tar", lambda out: tar_of(m("f", b"x" * 5000))[:3000], InvalidLayerError,
         "truncated"),
    Case("no-end-marker", lambda out: m("f", b"x"), InvalidLayerError, "end-of-archive"),
    Case("truncated-gzip", lambda out: gzip.compress(tar_of(m("f", os.urandom(9000))))[:-100],
         InvalidLayerError, "truncated", media_type=TGZ),
    Case("truncated-zstd", lambda out: zstandard.compress(tar_of(m("f", os.urandom(9000))))[:-100],
         InvalidLayerError, "truncated", media_type=TZST),
    Case("gzip-trailing-garbage", lambda out: gzip.compress(tar_of(m("f", b"x"))) + b"garbage",
         InvalidLayerError, "trailing garbage", media_type=TGZ),
    Case("garbage-tar", lambda out: bytes(range(256)) * 8, InvalidLayerError, "checksum"),
    Case("garbage-gzip", lambda out: b"\x1f\x8b" + bytes(range(256)) * 4, InvalidLayerError,
         "gzip", media_type=TGZ),
    Case("garbage-zstd", lambda out: b"\x28\xb5\x2f\xfd" + bytes(range(256)) * 4,
         InvalidLayerError, "zstd", media_type=TZST),
    Case("empty-blob", lambda out: b"", InvalidLayerError),
    Case("bad-checksum", t(header("f", checksum_delta=1)), InvalidLayerError, "checksum"),
    Case("lone-zero-block-then-header", lambda out: b"\0" * 512 + tar_of(m("f", b"")),
         InvalidLayerError, "lone zero block"),
    Case("dir-with-data-hiding-a-header", pad_dir_with_hidden_header, InvalidLayerError,
         "nonzero size"),
    Case("unknown-type", t(m("v", b"", type=b"V")), InvalidLayerError, "unsupported"),
]


def snapshot(root: str, skip: str) -> dict[str, tuple]:
    """Everything observable about a tree, without following symlinks."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.abspath(dirpath) == os.path.abspath(skip):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.abspath(p) == os.path.abspath(skip):
                continue
            st = os.lstat(p)
            content = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                  for n in os.listxattr(p, follow_symlinks=False)))
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, st.st_ino, st.st_nlink, content,
                                             xattrs)
    return out


@pytest.fixture(scope="module", autouse=True)
def _remove_sandbox_at_the_end():
    yield
    shutil.rmtree(SANDBOX, ignore_errors=True)


@pytest.fixture
def sandbox():
    shutil.rmtree(SANDBOX, ignore_errors=True)
    os.mkdir(SANDBOX, 0o700)
    sb = pathlib.Path(SANDBOX)
    out = sb / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sentinel").write_text("sentinel")
    os.chmod(out / "sentinel", 0o640)
    (out / "sub" / "deep").write_text("deep")
    os.symlink("sentinel", out / "alias")
    (sb / "dest").mkdir()
    return sb


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(sandbox, case: Case):
    out = str(sandbox / "outside")
    dest = str(sandbox / "dest")
    blob = case.build(out)
    if case.media_type == TGZ and case.build is not gz_bomb and blob[:2] != b"\x1f\x8b":
        blob = gzip.compress(blob)
    before = snapshot(str(sandbox), dest)
    host_passwd = os.stat("/etc/passwd")
    fds = len(os.listdir("/proc/self/fd"))

    if case.error is not None:
        with pytest.raises(case.error, match=case.match) as ei:
            apply_layer([blob], case.media_type, dest, limits=case.limits)
        assert isinstance(ei.value, PycriError)
        assert str(ei.value)  # an actionable message, not an empty one
    else:
        apply_layer([blob], case.media_type, dest, limits=case.limits)
        assert case.check is not None
        case.check(dest, out)

    assert snapshot(str(sandbox), dest) == before, "something outside dest changed"
    after_passwd = os.stat("/etc/passwd")
    assert (after_passwd.st_mtime_ns, after_passwd.st_ino) == (host_passwd.st_mtime_ns,
                                                              host_passwd.st_ino)
    assert len(os.listdir("/proc/self/fd")) == fds, "fd leak"
    assert not [th for th in threading.enumerate() if th.name == "pycri-layer-feed"]
    # still serving: a good layer applies into a fresh dest
    fresh = sandbox / "fresh"
    fresh.mkdir()
    r = apply_layer([gzip.compress(tar_of(m("ok", b"ok")))], TGZ, str(fresh))
    assert r.entries == 1 and (fresh / "ok").read_bytes() == b"ok"


def test_corpus_size():
    assert len(CASES) >= 30


@pytest.mark.parametrize("target,match", [
    ("esc/sentinel", "neither in this layer"),       # lower's symlink aims outside: stays in
    ("rel/sentinel", "neither in this layer"),       # same, relative ../../..
    ("link", "not a regular file"),                  # a symlink in the lower is not copied
    ("dev", "not a regular file"),                   # nor a device node
    ("gone", "neither in this layer"),               # whited out in the lower
])
def test_hostile_hardlink_into_lower(sandbox, target, match):
    lower = sandbox / "lower"
    lower.mkdir()
    os.symlink(OUT, lower / "esc")
    os.symlink("../../../outside", lower / "rel")
    os.symlink(OUT + "/sentinel", lower / "link")
    os.mknod(lower / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(lower / "gone", stat.S_IFCHR | 0o600, 0)
    before = snapshot(str(sandbox), str(sandbox / "dest"))
    with pytest.raises(InvalidLayerError, match=match):
        apply_layer([tar_of(hl("h", target))], TAR, str(sandbox / "dest"), lowers=[str(lower)])
    assert snapshot(str(sandbox), str(sandbox / "dest")) == before
