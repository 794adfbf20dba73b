"""Resolve a container's user, group and supplementary groups from its image.

Names are looked up in the image's /etc/passwd and /etc/group, read straight
from the layer directories (top layer first, honouring whiteouts and opaque
directories, never following a symlink). A name that is missing is an error.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass

from pycri.errors import InvalidArgumentError

MAX_FILE = 4 << 20


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str = "/"
    name: str = ""


def read_image_file(layer_dirs: list[str], path: str) -> bytes | None:
    """The content of ``path`` in the merged image, or None if it does not exist."""
    parts = [p for p in path.strip("/").split("/") if p]
    for d in layer_dirs:  # top first
        cur = d
        hidden = False
        for i, part in enumerate(parts):
            p = os.path.join(cur, part)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                # an opaque parent hides the lower layers' copies
                if i > 0 and _opaque(cur):
                    return None
                hidden = True
                break
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # whiteout
            if stat.S_ISLNK(st.st_mode):
                hidden = True  # not followed: treat as absent here
                break
            cur = p
        if hidden:
            continue
        if not stat.S_ISREG(os.lstat(cur).st_mode):
            return None
        fd = os.open(cur, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_FILE)
    return None


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _table(data: bytes | None, fields: int) -> list[list[str]]:
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        cols = line.split(":")
        if len(cols) >= fields:
            rows.append(cols)
    return rows


def _id(v: str, what: str) -> int:
    n = int(v)
    if not 0 <= n <= 2**31 - 1:
        raise InvalidArgumentError(f"{what} {v} is out of range")
    return n


def resolve(layer_dirs: list[str], user: str = "", uid: int | None = None,
            username: str = "", gid: int | None = None,
            supplemental: tuple[int, ...] = (), strict: bool = False) -> User:
    """As _resolve; answers are cached: layer directories are named by their content
    (chain ids) and never change, so the same question gets the same answer."""
    return _resolve_cached(tuple(layer_dirs), user, uid, username, gid, tuple(supplemental),
                           strict)


@functools.lru_cache(maxsize=256)
def _resolve_cached(layer_dirs: tuple[str, ...], user: str, uid: int | None, username: str,
                    gid: int | None, supplemental: tuple[int, ...], strict: bool) -> User:
    return _resolve(list(layer_dirs), user, uid, username, gid, supplemental, strict)


def _resolve(layer_dirs: list[str], user: str = "", uid: int | None = None,
             username: str = "", gid: int | None = None,
             supplemental: tuple[int, ...] = (), strict: bool = False) -> User:
    """Work out uid, gid and groups. ``uid``/``username``/``gid`` (from the container
    config) win over ``user`` (the image's ``User``, "name[:group]" or "uid[:gid]").
    ``strict`` leaves out the groups the image's /etc/group gives the user (the CRI's
    SupplementalGroupsPolicy=Strict); only ``supplemental`` is added then."""
    passwd = _table(read_image_file(layer_dirs, "etc/passwd"), 7)
    groups = _table(read_image_file(layer_dirs, "etc/group"), 4)
    spec_user, spec_group = (user.split(":", 1) + [""])[:2] if user else ("", "")
    pw: list[str] | None = None
    if uid is not None:
        pw = next((r for r in passwd if r[2] == str(uid)), None)
    elif username or spec_user:
        name = username or spec_user
        if name.isdigit():
            uid = _id(name, "user id")
            pw = next((r for r in passwd if r[2] == name), None)
        else:
            pw = next((r for r in passwd if r[0] == name), None)
            if pw is None:
                raise InvalidArgumentError(f"user {name!r} is not in the image's /etc/passwd")
            uid = _id(pw[2], "user id")
    else:
        uid = 0
        pw = next((r for r in passwd if r[2] == "0"), None)
    if gid is None and spec_group and uid is not None and not username:
        if spec_group.isdigit():
            gid = _id(spec_group, "group id")
        else:
            gr = next((r for r in groups if r[0] == spec_group), None)
            if gr is None:
                raise InvalidArgumentError(f"group {spec_group!r} is not in the image's /etc/group")
            gid = _id(gr[2], "group id")
    if gid is None:
        gid = _id(pw[3], "group id") if pw and pw[3].isdigit() else 0
    name = pw[0] if pw else ""
    extra: list[int] = []
    for g in supplemental:
        if g not in extra:
            extra.append(g)
    if name and not strict:  # "Merge": the user's groups from the image's /etc/group too
        for r in groups:
            if name in r[3].split(",") and r[2].isdigit():
                g = _id(r[2], "group id")
                if g != gid and g not in extra:
                    extra.append(g)
    return User(uid, gid, tuple(extra), pw[5] if pw and pw[5] else "/", name)


def check_mapped(user: User, uid_count: int, gid_count: int) -> None:
    """In a user namespace mapping ids 0..count-1, the process's uid, gid and groups
    must be mapped (the kernel refuses setresuid/setgroups to unmapped ids)."""
    if user.uid >= uid_count:
        raise InvalidArgumentError(
            f"user id {user.uid} is outside the pod's user namespace (uids 0-{uid_count - 1})")
    for g in (user.gid, *user.groups):
        if g >= gid_count:
            raise InvalidArgumentError(
                f"group id {g} is outside the pod's user namespace (gids 0-{gid_count - 1})")
