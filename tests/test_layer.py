"""Layer apply: formats, metadata, whiteouts, compression, digests (real files, as root).

The raw tar writer below (``member``, ``pax``, ``gnu_long``, ``END``) is also used
by test_layer_hostile.py; Python's tarfile only ever *writes* test archives here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import secrets
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
import zstandard

from pycri import _native
from pycri.errors import (
    DigestMismatchError,
    InvalidArgumentError,
    InvalidLayerError,
    PycriError,
    UnsupportedError,
)
from pycri.layer import LayerLimits, apply_layer, apply_layer_file

TAR = "application/vnd.oci.image.layer.v1.tar"
TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TZST = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_TGZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"

END = b"\0" * 1024


# --- a raw tar writer, for archives tarfile would refuse to write -------------

def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def header(name: bytes | str, *, type: bytes = b"0", size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000,
           linkname: bytes | str = b"", devmajor: int = 0, devminor: int = 0,
           prefix: bytes = b"", magic: bytes = b"ustar\x0000", size_field: bytes | None = None,
           uid_field: bytes | None = None, checksum_delta: int = 0) -> bytes:
    name = name.encode() if isinstance(name, str) else name
    linkname = linkname.encode() if isinstance(linkname, str) else linkname
    b = bytearray(512)
    b[0:len(name[:100])] = name[:100]
    b[100:108] = _octal(mode, 8)
    b[108:116] = uid_field if uid_field is not None else _octal(uid, 8)
    b[116:124] = _octal(gid, 8)
    b[124:136] = size_field if size_field is not None else _octal(size, 12)
    b[136:148] = _octal(mtime, 12)
    b[148:156] = b" " * 8
    b[156:157] = type
    b[157:157 + len(linkname[:100])] = linkname[:100]
    b[257:265] = magic
    b[329:337] = _octal(devmajor, 8)
    b[337:345] = _octal(devminor, 8)
    b[345:345 + len(prefix)] = prefix
    chk = sum(b) + checksum_delta
    b[148:156] = b"%06o\0 " % chk
    return bytes(b)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: bytes | str, data: bytes = b"", **kw: object) -> bytes:
    kw.setdefault("size", len(data))
    return header(name, **kw) + _pad(data)  # type: ignore[arg-type]


def pax(records: dict[str, bytes | str], type: bytes = b"x") -> bytes:
    body = b""
    for k, v in records.items():
        v = v.encode() if isinstance(v, str) else v
        rest = b" " + k.encode() + b"=" + v + b"\n"
        n = len(rest) + 1
        while len(str(n)) + len(rest) != n:
            n += 1
        body += str(n).encode() + rest
    return member("PaxHeader", body, type=type)


def gnu_long(name: bytes | str, kind: bytes = b"L") -> bytes:
    name = name.encode() if isinstance(name, str) else name
    return member("././@LongLink", name + b"\0", type=kind, magic=b"ustar  \0")


def tar_of(*members: bytes) -> bytes:
    return b"".join(members) + END


def apply(data: bytes, dest: str, media_type: str = TAR, **kw: object):
    return apply_layer([data], media_type, dest, **kw)  # type: ignore[arg-type]


def lxattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "dest"
    d.mkdir()
    return str(d)


# --- formats ------------------------------------------------------------------

def test_ustar_files_dirs_modes_owners_times(dest):
    data = tar_of(
        member("etc/", type=b"5", mode=0o750, uid=10, gid=20, mtime=1000),
        member("etc/conf", b"hello\n", mode=0o640, uid=1234, gid=5678, mtime=2000),
        member("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0, mtime=3000),
        member("tmp/", type=b"5", mode=0o1777),
        member("shared/", type=b"5", mode=0o2775, gid=50),
        member("empty", b""),
    )
    r = apply(data, dest)
    assert r.entries == 6 and r.size == len(data)
    assert r.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert r.digest == r.diff_id  # plain tar: the blob is the tar
    st = os.stat(f"{dest}/etc/conf")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)
    assert st.st_mtime == 2000
    assert Path(f"{dest}/etc/conf").read_bytes() == b"hello\n"
    st = os.stat(f"{dest}/etc")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime) == (10, 20, 0o750, 1000)
    assert stat.S_IMODE(os.stat(f"{dest}/bin/tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(f"{dest}/tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(f"{dest}/shared").st_mode) == 0o2775
    # implicit parents are 0755 root
    st = os.stat(f"{dest}/bin")
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0


def test_ustar_prefix_field(dest):
    long_dir = "d" * 120
    data = tar_of(member("file.txt", b"x", prefix=long_dir.encode()))
    apply(data, dest)
    assert Path(f"{dest}/{long_dir}/file.txt").read_text() == "x"


def test_gnu_long_names_and_links_and_base256(dest):
    name = "/".join([f"segment{i:03d}" for i in range(20)]) + "/file"
    link = "/".join([f"other{i:03d}" for i in range(20)])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size, ti.uid, ti.gid = 3, 3_000_000, 4_000_000  # past octal: base-256
        t.addfile(ti, io.BytesIO(b"abc"))
        ti = tarfile.TarInfo("lnk")
        ti.type, ti.linkname = tarfile.SYMTYPE, link
        t.addfile(ti)
    apply(buf.getvalue(), dest)
    st = os.stat(f"{dest}/{name}")
    assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)
    assert os.readlink(f"{dest}/lnk") == link
    # and the raw GNU L/K headers
    data = tar_of(gnu_long("x" * 200), member("trunc", b"q"),
                  gnu_long("t" * 150, b"K"), member("sl", type=b"2", linkname="ignored"))
    apply(data, dest)
    assert Path(f"{dest}/{'x' * 200}").read_text() == "q"
    assert os.readlink(f"{dest}/sl") == "t" * 150


def test_pax_path_size_owner_mtime_fraction_and_global_header(dest):
    name = "p/" + "n" * 250
    data = tar_of(
        pax({"comment": "global stuff", "path": "ignored-global"}, type=b"g"),
        pax({"path": name, "uid": "70000", "gid": "80000", "mtime": "1700000000.123456789",
             "linkpath": "unused", "atime": "1.5", "uname": "someone"}),
        member("short", b"payload"),
        member("after", b"z"),
    )
    apply(data, dest)
    st = os.stat(f"{dest}/{name}")
    assert (st.st_uid, st.st_gid) == (70000, 80000)
    assert st.st_mtime_ns == 1700000000_123456789
    assert Path(f"{dest}/{name}").read_bytes() == b"payload"
    assert not os.path.exists(f"{dest}/short")
    # the PAX header applied to one entry only
    assert os.stat(f"{dest}/after").st_uid == 0
    assert not os.path.exists(f"{dest}/ignored-global")


def test_pax_size_overrides_header(dest):
    data = tar_of(pax({"size": "5"}), member("f", b"hello", size=0))
    apply(data, dest)
    assert Path(f"{dest}/f").read_bytes() == b"hello"


def test_negative_pax_mtime(dest):
    data = tar_of(pax({"mtime": "-1.25"}), member("old", b""))
    apply(data, dest)
    assert os.stat(f"{dest}/old").st_mtime_ns == -1_250_000_000


def test_xattrs_kept_and_trusted_dropped(dest):
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service
    data = tar_of(
        pax({"SCHILY.xattr.user.note": b"bin\x00ary", "SCHILY.xattr.security.capability": cap,
             "SCHILY.xattr.trusted.overlay.redirect": "/etc",
             "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0"}),
        member("bin/ping", b"\x7fELF", mode=0o755),
        pax({"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.d": "dir"}),
        member("d/", type=b"5"),
    )
    r = apply(data, dest)
    assert lxattr(f"{dest}/bin/ping", "user.note") == b"bin\x00ary"
    assert lxattr(f"{dest}/bin/ping", "security.capability") == cap
    assert lxattr(f"{dest}/bin/ping", "trusted.overlay.redirect") is None
    assert lxattr(f"{dest}/d", "trusted.overlay.opaque") is None
    assert lxattr(f"{dest}/d", "user.d") == b"dir"
    assert r.stats.xattrs_dropped == 3


def _acl(entries: list[tuple[int, int]]) -> bytes:
    # the kernel's posix_acl_xattr format: version 2, then (tag u16, perm u16, id u32)
    out = struct.pack("<I", 2)
    for tag, perm in entries:
        out += struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_file_modes_and_owners_exact_whatever_the_umask_setgid_or_acl(tmp_path, umask):
    dest = tmp_path / "d"
    dest.mkdir()
    # default ACL on "acl/": user rwx, group r-x, other ---  (1 user_obj, 4 group_obj, 32 other)
    acl = _acl([(1, 7), (4, 5), (32, 0)])
    data = tar_of(
        member("plain", b"p", mode=0o666),
        member("ro", b"r", mode=0o444),
        member("sg/", type=b"5", mode=0o2775, gid=77),
        member("sg/inherits", b"", mode=0o664, gid=0),  # must end up gid 0, not 77
        member("sg/same", b"", mode=0o664, gid=77),
        pax({"SCHILY.xattr.system.posix_acl_default": acl}),
        member("acl/", type=b"5", mode=0o755),
        member("acl/f", b"a", mode=0o666),
        member("u1000", b"", mode=0o600, uid=1000, gid=1000),
    )
    old = os.umask(umask)
    try:
        apply(data, str(dest))
    finally:
        os.umask(old)
    want = {"plain": (0o666, 0, 0), "ro": (0o444, 0, 0), "sg/inherits": (0o664, 0, 0),
            "sg/same": (0o664, 0, 77), "acl/f": (0o666, 0, 0), "u1000": (0o600, 1000, 1000)}
    for rel, (mode, uid, gid) in want.items():
        st = os.lstat(dest / rel)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid), rel


def test_devices_and_fifo(dest):
    data = tar_of(
        member("dev/null", type=b"3", devmajor=1, devminor=3, mode=0o666),
        member("dev/loop0", type=b"4", devmajor=7, devminor=0, mode=0o660, gid=6),
        member("run/pipe", type=b"6", mode=0o620, uid=5, mtime=4444),
    )
    r = apply(data, dest)
    st = os.lstat(f"{dest}/dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(f"{dest}/dev/loop0")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0) and st.st_gid == 6
    st = os.lstat(f"{dest}/run/pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert st.st_uid == 5 and st.st_mtime == 4444
    assert r.stats.devices == 3


def test_symlink_metadata_never_follows(dest, tmp_path):
    target = tmp_path / "target"
    target.write_text("t")
    os.chmod(target, 0o600)
    before = os.stat(target)
    data = tar_of(member("s", type=b"2", linkname=str(target), uid=777, gid=888, mtime=5,
                        mode=0o777))
    apply(data, dest)
    st = os.lstat(f"{dest}/s")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid, st.st_mtime) == (777, 888, 5)
    after = os.stat(target)
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
        before.st_mode, before.st_uid, before.st_mtime_ns)


def test_hardlinks(dest):
    data = tar_of(member("a/f", b"data", mode=0o600), member("b/h", type=b"1", linkname="a/f"),
                  member("s", type=b"2", linkname="a/f"), member("hs", type=b"1", linkname="s"),
                  member("a/f2", type=b"1", linkname="/a/f"))
    r = apply(data, dest)
    assert os.stat(f"{dest}/a/f").st_ino == os.stat(f"{dest}/b/h").st_ino
    assert os.stat(f"{dest}/a/f").st_nlink == 3
    # a hardlink to a symlink links the symlink itself
    assert os.path.islink(f"{dest}/hs") and os.lstat(f"{dest}/hs").st_ino == os.lstat(
        f"{dest}/s").st_ino
    assert r.stats.hardlinks == 3


def test_hardlink_from_lower_layer(tmp_path, dest):
    lower = tmp_path / "lower"
    (lower / "usr").mkdir(parents=True)
    (lower / "usr" / "big").write_bytes(b"L" * 100000)
    os.chown(lower / "usr" / "big", 42, 43)
    os.chmod(lower / "usr" / "big", 0o751)
    data = tar_of(member("usr/alias", type=b"1", linkname="usr/big"))
    with pytest.raises(InvalidLayerError, match="neither in this layer nor in a lower"):
        apply(data, dest)
    os.rmdir(f"{dest}/usr")
    r = apply(data, dest, lowers=[str(lower)])
    st = os.stat(f"{dest}/usr/alias")
    assert Path(f"{dest}/usr/alias").read_bytes() == b"L" * 100000
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (42, 43, 0o751)
    assert r.stats.lower_copies == 1


@pytest.mark.parametrize("top", ["nothing", "opaque-usr", "whiteout-usr", "whiteout-file",
                                 "has-it"])
def test_hardlink_from_lower_layers_honours_whiteouts_and_opaque_dirs(tmp_path, top):
    upper, bottom = tmp_path / "upper", tmp_path / "bottom"
    (bottom / "usr").mkdir(parents=True)
    (bottom / "usr" / "big").write_bytes(b"bottom")
    upper.mkdir()
    if top == "opaque-usr":
        (upper / "usr").mkdir()
        os.setxattr(upper / "usr", "trusted.overlay.opaque", b"y")
    elif top == "whiteout-usr":
        os.mknod(upper / "usr", stat.S_IFCHR, 0)
    elif top == "whiteout-file":
        (upper / "usr").mkdir()
        os.mknod(upper / "usr" / "big", stat.S_IFCHR, 0)
    elif top == "has-it":
        (upper / "usr").mkdir()
        (upper / "usr" / "big").write_bytes(b"upper")
    dest = tmp_path / "dest"
    dest.mkdir()
    data = tar_of(member("alias", type=b"1", linkname="usr/big"))
    if top in ("nothing", "has-it"):
        apply(data, str(dest), lowers=[str(upper), str(bottom)])
        assert (dest / "alias").read_bytes() == (b"bottom" if top == "nothing" else b"upper")
    else:
        with pytest.raises(InvalidLayerError, match="neither in this layer nor in a lower"):
            apply(data, str(dest), lowers=[str(upper), str(bottom)])


def test_dir_mtimes_applied_last_and_duplicates_later_wins(dest):
    data = tar_of(
        member("a/", type=b"5", mtime=100),
        member("a/b/", type=b"5", mtime=200),
        member("a/b/c", b"x", mtime=300),
        member("a/new", b"y", mtime=400),
        member("a/", type=b"5", mtime=150, mode=0o700),
    )
    apply(data, dest)
    assert os.stat(f"{dest}/a").st_mtime == 150
    assert stat.S_IMODE(os.stat(f"{dest}/a").st_mode) == 0o700
    assert os.stat(f"{dest}/a/b").st_mtime == 200
    assert os.stat(f"{dest}/a/b/c").st_mtime == 300


def test_root_entry_metadata(dest):
    apply(tar_of(member("./", type=b"5", mode=0o755, mtime=999), member("./x", b"")), dest)
    st = os.stat(dest)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_mtime == 999


def test_replacing_entries_of_other_types(dest):
    data = tar_of(
        member("x", b"file"),
        member("x/", type=b"5"),          # file -> dir
        member("x/inner", b"i"),
        member("x", type=b"2", linkname="elsewhere"),  # dir (with content) -> symlink
        member("y/", type=b"5"),
        member("y/keep", b"k"),
        member("y/", type=b"5", mode=0o711),  # dir over dir merges
        member("z", b"old"),
        member("z", b"new"),
    )
    apply(data, dest)
    assert os.readlink(f"{dest}/x") == "elsewhere"
    assert Path(f"{dest}/y/keep").read_text() == "k"
    assert Path(f"{dest}/z").read_text() == "new"


# --- whiteouts ------------------------------------------------------------------

def test_whiteouts_become_overlay_whiteouts(dest):
    data = tar_of(
        member("etc/", type=b"5"),
        member("etc/.wh.passwd", b""),
        member("var/cache/", type=b"5"),
        member("var/cache/.wh..wh..opq", b""),
        member("var/cache/fresh", b"f"),
        member(".wh.topgone", b"ignored content"),
    )
    r = apply(data, dest)
    for p in ("etc/passwd", "topgone"):
        st = os.lstat(f"{dest}/{p}")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert lxattr(f"{dest}/var/cache", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(f"{dest}/var/cache")) == ["fresh"]
    assert not [n for n in os.listdir(f"{dest}/etc") if n.startswith(".wh.")]
    assert r.stats.whiteouts == 3


def test_whiteout_replaces_same_layer_entry(dest):
    data = tar_of(member("d/sub/f", b"x"), member("d/.wh.sub", b""))
    apply(data, dest)
    st = os.lstat(f"{dest}/d/sub")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# --- compression ------------------------------------------------------------------

def _sample_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(60):
            ti = tarfile.TarInfo(f"d{i % 5}/file{i}")
            payload = str(i).encode() * (i * 97)
            ti.size = len(payload)
            t.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def _check_sample(dest: str) -> None:
    for i in range(60):
        assert Path(f"{dest}/d{i % 5}/file{i}").read_bytes() == str(i).encode() * (i * 97)


_FORMATS = [
    (TAR, lambda b: b),
    (TGZ, gzip.compress),
    (DOCKER_TGZ, gzip.compress),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", gzip.compress),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar", lambda b: b),
    (TZST, zstandard.compress),
]


@pytest.mark.parametrize("media_type,compress,chunk", [
    *[(mt, c, chunk) for mt, c in _FORMATS for chunk in (4096, 1 << 22)],
    (TGZ, gzip.compress, 1),  # byte at a time through every state of both parsers
    (TZST, zstandard.compress, 1),
])
def test_compressions_and_digests(tmp_path, media_type, compress, chunk):
    raw = _sample_tar()
    blob = compress(raw)
    dest = tmp_path / "d"
    dest.mkdir()
    seen: list[int] = []
    r = apply_layer([blob[i:i + chunk] for i in range(0, len(blob), chunk)], media_type,
                    str(dest), expected_digest="sha256:" + hashlib.sha256(blob).hexdigest(),
                    expected_diff_id="sha256:" + hashlib.sha256(raw).hexdigest(),
                    progress=seen.append)
    _check_sample(str(dest))
    assert (r.compressed_size, r.size, r.entries) == (len(blob), len(raw), 60)
    assert seen[-1] == len(blob) and seen == sorted(seen)


def test_multi_member_gzip_and_trailing_zero_padding(dest):
    raw = _sample_tar()
    cut = [0, 1000, 20000, 20001, len(raw)]
    blob = b"".join(gzip.compress(raw[a:b]) for a, b in itertools.pairwise(cut)) + b"\0" * 700
    r = apply(blob, dest, TGZ)
    _check_sample(dest)
    assert r.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_multi_frame_zstd(dest):
    raw = _sample_tar()
    blob = zstandard.compress(raw[:7000]) + zstandard.compress(raw[7000:])
    apply(blob, dest, TZST)
    _check_sample(dest)


def test_zstd_checksums_skippable_frames_and_truncation(tmp_path):
    raw = _sample_tar()
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    blob = (zstandard.ZstdCompressor(write_checksum=True).compress(raw[:9000]) + skippable
            + zstandard.compress(raw[9000:]))
    (tmp_path / "ok").mkdir()
    apply(blob, str(tmp_path / "ok"), TZST)
    _check_sample(str(tmp_path / "ok"))
    for cut in (len(blob) - 1, len(blob) - 4, len(blob) // 2, 9):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        with pytest.raises(InvalidLayerError, match="truncated"):
            apply(blob[:cut], str(d), TZST)
    (tmp_path / "junk").mkdir()
    with pytest.raises(InvalidLayerError, match="not a zstd frame"):
        apply(blob + b"junk", str(tmp_path / "junk"), TZST)


def test_apply_layer_file(tmp_path, dest):
    raw = _sample_tar()
    blob_path = tmp_path / "blob"
    blob_path.write_bytes(gzip.compress(raw))
    r = apply_layer_file(str(blob_path), TGZ, dest, chunk_size=777)
    _check_sample(dest)
    assert r.compressed_size == blob_path.stat().st_size


@pytest.mark.parametrize("digest,error", [
    ("sha512:" + "a" * 128, UnsupportedError),
    ("sha256:../../etc", InvalidArgumentError),
    ("sha256:" + "A" * 64, InvalidArgumentError),
])
def test_bad_expected_digests_refused_before_reading(dest, digest, error):
    def never():  # type: ignore[no-untyped-def]
        raise AssertionError("read before the digests were checked")
        yield b""
    with pytest.raises(error):
        apply_layer(never(), TGZ, dest, expected_digest=digest)
    with pytest.raises(error):
        apply_layer(never(), TGZ, dest, expected_diff_id=digest)


def test_unknown_media_type(dest):
    with pytest.raises(UnsupportedError):
        apply(b"", dest, "application/vnd.oci.image.layer.v1.tar+lz4")


@pytest.mark.parametrize("media_type,blob", [
    (TGZ, lambda raw: raw),
    (TAR, gzip.compress),
    (TZST, gzip.compress),
    (TGZ, zstandard.compress),
    (TGZ, lambda raw: b"\xfd7zXZ\x00" + raw),
])
def test_mislabelled_blob(dest, media_type, blob):
    with pytest.raises(InvalidLayerError, match="looks like"):
        apply(blob(_sample_tar()), dest, media_type)
    assert os.listdir(dest) == []


@pytest.mark.parametrize("which", ["digest", "diff_id"])
@pytest.mark.parametrize("media_type,compress", [(TGZ, gzip.compress), (TZST, zstandard.compress),
                                                 (TAR, lambda b: b)])
def test_digest_mismatch(tmp_path, which, media_type, compress):
    raw = _sample_tar()
    blob = compress(raw)
    sandbox = tmp_path / "sb"
    (sandbox / "dest").mkdir(parents=True)
    kw = {"expected_digest" if which == "digest" else "expected_diff_id": "sha256:" + "0" * 64}
    with pytest.raises(DigestMismatchError) as ei:
        apply(blob, str(sandbox / "dest"), media_type, **kw)
    assert ei.value.expected == "sha256:" + "0" * 64
    want = hashlib.sha256(blob if which == "digest" else raw).hexdigest()
    assert ei.value.actual == "sha256:" + want
    assert os.listdir(sandbox) == ["dest"]  # nothing beside dest


def test_corrupt_blob_with_expected_digest_reports_digest_mismatch(dest):
    raw = _sample_tar()
    blob = bytearray(gzip.compress(raw))
    good = "sha256:" + hashlib.sha256(blob).hexdigest()
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(DigestMismatchError) as ei:
        apply(bytes(blob), dest, TGZ, expected_digest=good)
    assert isinstance(ei.value.__cause__, InvalidLayerError)


# --- the C boundary ------------------------------------------------------------

def test_layer_writer_contract(dest):
    w = _native.LayerWriter(dest)
    w.feed(member("a", b"1"))
    w.feed(END)
    assert len(w.finish()) == 64
    assert w.stats.files == 1
    with pytest.raises(OSError):
        w.feed(b"x")  # after finish
    w.close()
    w.close()  # idempotent
    with pytest.raises(OSError):
        w.feed(b"x")
    with pytest.raises(OSError):
        w.finish()
    with _native.LayerWriter(dest) as w2:
        with pytest.raises(OSError) as ei:
            w2.feed(member("../x", b""))
        assert "escapes the layer root" in str(ei.value)
        with pytest.raises(OSError):
            w2.feed(END)  # refuses input after an error
    with pytest.raises(FileNotFoundError):
        _native.LayerWriter(dest + "/missing")


def test_layer_writer_hash_separately(dest):
    data = tar_of(member("a", b"1"))
    with _native.LayerWriter(dest, hash_separately=True) as w:
        w.hash(data[:100])
        w.feed(data)
        with pytest.raises(OSError, match="hashed but"):
            w.finish()
    os.unlink(f"{dest}/a")
    with _native.LayerWriter(dest, hash_separately=True) as w:
        w.feed(data)
        w.hash(data)
        assert w.finish() == hashlib.sha256(data).hexdigest()
    with _native.LayerWriter(dest) as w, pytest.raises(OSError):
        w.hash(data)  # only with hash_separately


def test_no_thread_or_fd_leaks(dest):
    before_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(InvalidLayerError):
            apply(gzip.compress(member("../x", b"")), dest, TGZ)
    assert len(os.listdir("/proc/self/fd")) == before_fds
    assert not [t for t in threading.enumerate() if t.name == "pycri-layer-feed"]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        LayerLimits(max_entries=0)
    with pytest.raises(ValueError):
        LayerLimits(max_path_len=10000)


# --- fuzzing --------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_SEED = tar_of(
    pax({"path": "pax/long", "SCHILY.xattr.user.x": "1", "mtime": "5.5"}),
    member("d/", type=b"5"),
    member("d/f", b"hello world" * 10),
    member("d/l", type=b"2", linkname="../d/f"),
    member("d/h", type=b"1", linkname="d/f"),
    gnu_long("g" * 130),
    member("x", b"gnu"),
    member("d/.wh.gone", b""),
    member("dev/c", type=b"3", devmajor=1, devminor=5),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_mutated_tar(tmp_path_factory, data):
    sandbox = tmp_path_factory.mktemp("fuzz")
    outside = sandbox / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("s")
    dest = sandbox / "dest"
    dest.mkdir()
    blob = bytearray(_SEED)
    for _ in range(data.draw(st.integers(0, 8))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and blob:
            blob[pos] = data.draw(st.sampled_from([0, 0x2F, 0x2E, 0x30, 0x35, 0x80, 0xFF]))
        elif op == "cut":
            del blob[pos:]
        else:
            blob[pos:pos] = data.draw(st.binary(max_size=600))
    compressed = data.draw(st.booleans())
    try:
        if compressed:
            apply(gzip.compress(bytes(blob)), str(dest), TGZ)
        else:
            apply(bytes(blob), str(dest), TAR)
    except PycriError:
        pass
    assert sorted(os.listdir(sandbox)) == ["dest", "outside"]
    assert os.listdir(outside) == ["sentinel"]
    assert (outside / "sentinel").read_text() == "s"


# Structured fuzzing: random sequences of the entries that hostile layers are made
# of (symlinks aimed outside, type changes, hardlinks, whiteouts, odd names).
# named at import (the strategies mention it), created by the test itself
_FUZZ_SANDBOX = os.path.join(tempfile.gettempdir(),
                             f"layer-fuzz-sandbox-{os.getpid()}-{secrets.token_hex(6)}")
_FUZZ_OUT = os.path.join(_FUZZ_SANDBOX, "outside")
_NAMES = ["a", "b", "a/b", "a/b/c", "l", "l/x", "l/l2/y", "m/z", "./a", "a/", "/a/b", ".wh.a",
          "a/.wh.b", "l/.wh.sentinel", "a/.wh..wh..opq", "l/.wh..wh..opq", "c/d/e"]
_TARGETS = [_FUZZ_OUT, _FUZZ_OUT + "/sentinel", _FUZZ_OUT + "/sub", "..", "../..",
            "../../outside", "../outside/sentinel", "/", "a", "a/b", "l", "l/x", ".", "m"]
_TYPES = [b"0", b"5", b"2", b"1", b"6", b"3"]


@st.composite
def _hostile_entries(draw):  # type: ignore[no-untyped-def]
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(_TYPES))
        name = draw(st.sampled_from(_NAMES))
        kw = {"mode": draw(st.sampled_from([0o644, 0o777, 0o4755, 0o1777, 0])),
              "uid": draw(st.sampled_from([0, 4321])), "mtime": draw(st.integers(0, 2**33))}
        if kind in (b"1", b"2"):
            kw["linkname"] = draw(st.sampled_from(_TARGETS))
        if kind == b"3":
            kw["devmajor"], kw["devminor"] = 1, 3
        if draw(st.booleans()):
            out.append(pax({"SCHILY.xattr.user.k": "v", "SCHILY.xattr.trusted.overlay.opaque": "y"}))
        data = b"payload" if kind == b"0" else b""
        out.append(member(name, data, type=kind, **kw))
    return out


def _outside_state() -> list[tuple]:
    state = []
    for dirpath, dirnames, filenames in os.walk(_FUZZ_SANDBOX):
        if dirpath == os.path.join(_FUZZ_SANDBOX, "dest"):
            dirnames[:] = []
            continue
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            if p == os.path.join(_FUZZ_SANDBOX, "dest"):
                continue
            s = os.lstat(p)
            state.append((p, s.st_mode, s.st_uid, s.st_mtime_ns, s.st_ino,
                          tuple(os.listxattr(p, follow_symlinks=False))))
    return state


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(_hostile_entries())
def test_fuzz_hostile_entry_sequences(entries):
    shutil.rmtree(_FUZZ_SANDBOX, ignore_errors=True)
    os.makedirs(os.path.join(_FUZZ_OUT, "sub"))
    Path(_FUZZ_OUT, "sentinel").write_text("s")
    os.mkdir(os.path.join(_FUZZ_SANDBOX, "dest"))
    before = _outside_state()
    try:
        apply(tar_of(*entries), os.path.join(_FUZZ_SANDBOX, "dest"))
    except PycriError:
        pass
    assert _outside_state() == before
    assert Path(_FUZZ_OUT, "sentinel").read_text() == "s"


def teardown_module(module: object) -> None:
    shutil.rmtree(_FUZZ_SANDBOX, ignore_errors=True)


# --- fidelity: the same tree as GNU tar extracts it ------------------------------

def _tree_state(root: str) -> dict[str, tuple]:
    """Everything tar round-trips, per path, plus hardlink groups by first path."""
    state: dict[str, tuple] = {}
    first_of_inode: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            s = os.lstat(p)
            link = first_of_inode.setdefault(s.st_ino, rel) if not stat.S_ISDIR(s.st_mode) else ""
            content: object = None
            if stat.S_ISREG(s.st_mode):
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(s.st_mode):
                content = os.readlink(p)
            xattrs = () if stat.S_ISLNK(s.st_mode) else tuple(sorted(
                (k, os.getxattr(p, k)) for k in os.listxattr(p) if k.startswith("user.")))
            mtime = s.st_mtime_ns if not stat.S_ISLNK(s.st_mode) else s.st_mtime_ns // 10**9
            state[rel] = (s.st_mode, s.st_uid, s.st_gid, mtime, s.st_rdev, content, link, xattrs)
    return state


@pytest.mark.skipif(not os.path.isdir("/usr/share/zoneinfo"), reason="needs tzdata")
@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_same_tree_as_gnu_tar(tmp_path, fmt):
    src = tmp_path / "src"
    subprocess.run(["cp", "-a", "/usr/share/zoneinfo", str(src)], check=True)
    deep = src / ("long-directory-name-" * 6) / ("x" * 120)
    deep.mkdir(parents=True)
    (deep / "file").write_bytes(b"deep")
    os.symlink("t" * 300, src / "long-target")
    (src / "orig").write_bytes(b"linked")
    os.link(src / "orig", src / "Europe" / "hard")
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (src / "suid").write_bytes(b"s")
    os.chmod(src / "suid", 0o4755)
    os.chown(src / "Europe" / "Paris", 1234, 5678, follow_symlinks=False)
    os.setxattr(src / "orig", "user.origin", b"test")
    os.chmod(src / "Asia", 0o2750)
    os.utime(src / "Asia", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    blob = tmp_path / "layer.tar.gz"
    subprocess.run(["tar", f"--format={fmt}", "--xattrs", "-czf", str(blob), "-C", str(src),
                    "."], check=True)
    by_tar, by_pycri = tmp_path / "tar", tmp_path / "pycri"
    by_tar.mkdir()
    by_pycri.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-xpzf", str(blob), "-C",
                    str(by_tar)], check=True)
    r = apply_layer_file(str(blob), TGZ, str(by_pycri))
    want, got = _tree_state(str(by_tar)), _tree_state(str(by_pycri))
    assert sorted(got) == sorted(want)
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert not diff
    assert r.stats.hardlinks >= 1 and r.stats.devices == 2 and r.stats.symlinks > 300
