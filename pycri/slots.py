"""Container slots: the part of a container create that does not depend on its
config, made ahead of need by a background thread.

A slot is a fresh container id whose record directory is already laid out
(``fs/upper``, ``fs/work``, ``fs/rootfs``) under ``<root>/slots/`` and whose cgroup
already exists in the pod (default limits and device rules). In a pod without a
user namespace it also holds the container's root and /dev, mounted ahead as
detached mounts: the overlay of the image the pod's last create used (with the
mount points the container's setup needs made in it) and a filled /dev tmpfs.
A create takes the pod's slot, renames the directory into ``<root>/containers/``
and applies the config's limits; the container process attaches the mounts. That
is one rename instead of five mkdirs on the record disk, a mkdir per cgroup
hierarchy (nine on a v1 host), an overlay mount, a copy-up of /etc and a /dev,
all off the caller's path. The record dir itself is often a removed container's,
emptied, and its overlay still mounted (``retire``: one whose writable layer was
left as made; see Overlay).

A slot belongs to the process that made it, and its directory name says so:
``<pid>.<start time>.<pod id>.<container id>``. Nothing lists slots as
containers. One left by a process that is gone (killed, or exited between the
making and the use) is deleted, directory and cgroup, by the next Runtime on the
same root (``cleanup``); a pod's removal deletes the remover's own slot of it
(``forget``) and its cgroup removal takes anyone else's with it.

Where the pod allows it, a premounted slot also holds the container process
itself, set up ahead (launchplan.standin: the setup a create with the pod's
last config would get) and held by its launcher until a create with the same
setup resumes it (Container._launch_in) or it is discarded; see Slot.pre.

One thread makes them (``make``): a pod asks for its first while it is being
set up (premounting the image this process last ran: a guess; its held process
comes once the pod is ready, ``pod_ready``), and each create asks for the next
once its container process exists (Container._launch). For a pod that creates
containers the thread then makes the slot after next too, all but its held
process, so the next one is ready sooner (``_make_base``). PYCRI_PRECLONE=0 in
the environment turns held processes off (slots are premounted only).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import secrets
import select
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycri import _native, store
from pycri.errors import PycriError
from pycri.procinfo import STARTED_XATTR, _start_time

if TYPE_CHECKING:
    from pycri.config import ContainerConfig
    from pycri.runtime import Runtime

# the record dir's layout for a container's writable layer (mode of each)
FS_DIRS = (("fs", 0o700), ("fs/upper", 0o755), ("fs/work", 0o700), ("fs/rootfs", 0o755))


# What a container's setup mounts on or binds to in its rootfs: made in a premounted
# overlay ahead, where the image lacks them (csrc/api/mount.h)
MOUNT_DIRS = ("proc", "sys", "dev")
MOUNT_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")


def mount_points_layer(root: str) -> str:
    """The lowest overlay layer of every container: empty MOUNT_DIRS and MOUNT_FILES,
    made once per root. The image's own entries hide it; where the image lacks one
    (minimal images have no /proc, /sys, /dev or /etc/hostname) this one is there
    to mount on, so nothing has to be made in each container's writable layer
    (a dir and up to six inodes per container, each made and later deleted)."""
    final = os.path.join(root, "mountpoints.v1")
    if os.path.isdir(final):
        return final
    tmp = tempfile.mkdtemp(prefix=".mountpoints-", dir=root)
    try:
        os.chmod(tmp, 0o755)
        for d in MOUNT_DIRS + ("etc",):
            os.mkdir(os.path.join(tmp, d), 0o755)
        for f in MOUNT_FILES:
            fd = os.open(os.path.join(tmp, f), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):    # (else another Runtime made it first)
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# pods whose slot may hold a premounted rootfs and /dev (2 fds each), or a
# pre-cloned process (2 fds and a held launcher), per process
MAX_PREMOUNTED = 128
# how long a create waits for its pod's slot while the thread is making it (s)
TAKE_WAIT = 0.02
# containers whose overlay this process keeps for reuse (an fd each), per process
MAX_KEPT_OVERLAYS = 128
# spare record dirs kept per root (retire), and how long a removed container's
# monitor may take to exit before its dirs are deleted instead (s)
MAX_SPARES = 4
SPARE_WAIT = 1.0
SPARE = "spare"     # (a spare's name: <pid>.<start time>.spare.<random>)
OVERLAY_UUID = "trusted.overlay.uuid"
# whether slots hold a pre-cloned container process (PYCRI_PRECLONE=0: never)
PRECLONE = os.environ.get("PYCRI_PRECLONE", "1") != "0"


@dataclass(frozen=True)
class Overlay:
    """A container's overlay as this process keeps it: a detached mount (``fd``)
    of the image's layers over the record dir's fs/upper. Its containers attach a
    clone each (Slot.rootfs_fd), so the file system outlives them: one whose
    container left the writable layer as made serves a next container of the same
    image as it is (``retire``), without a new mount, nor the unmount (and sync
    of the upper file system) at the end of each container."""
    fd: int
    image_id: str
    lowers: tuple[tuple[int, int], ...]     # the layer dirs' (device, inode) then
    layers: tuple[str, ...] = ()            # and their paths

    def layers_gone(self) -> bool:
        """Whether a layer dir was deleted (or replaced) since: then only this
        overlay keeps its files, and their disk space."""
        try:
            return _dir_ids(list(self.layers)) != self.lowers
        except OSError:
            return True

    def fits(self, image_id: str, lowers: tuple[tuple[int, int], ...]) -> bool:
        return bool(image_id) and self.image_id == image_id and self.lowers == lowers

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)   # (the last reference: the file system goes)


@dataclass(frozen=True)
class Slot:
    id: str             # the container id it was made for
    dir: str            # <root>/slots/<pid>.<start>.<pod>.<id>: the record dir to be
    pod_id: str
    cgroup_parent: str
    # A clone of ``overlay`` (below), the rootfs mounted ahead (detached) for the
    # image the pod's last create used; or -1.
    rootfs_fd: int = -1
    dev_fd: int = -1        # the container's /dev, made ahead with it (or -1)
    # The container process itself, set up ahead in the pod's namespaces, in the
    # cgroup, on the rootfs and /dev above (which it then holds: both fds are -1),
    # as a create with the pod's last config would have it; held by its launcher
    # until a create resumes it with the real spec (or discards it). pre_key is
    # that setup (launchplan.setup_key).
    pre: _native.Preclone | None = None
    pre_key: tuple[Any, ...] = ()
    # the overlay rootfs_fd is a clone of (kept while the container lives), or None
    overlay: Overlay | None = None

    @property
    def image_id(self) -> str:
        return self.overlay.image_id if self.overlay is not None else ""

    def fds(self) -> tuple[int, int]:
        return (self.rootfs_fd, self.dev_fd)

    @property
    def premounted(self) -> bool:
        return self.rootfs_fd >= 0 or self.pre is not None

    def fits(self, image_id: str, layer_dirs: list[str]) -> bool:
        """Whether the premounted rootfs is this image's, on the same layer dirs (an
        image removed and pulled again has new ones)."""
        try:
            return self.overlay is not None and self.overlay.fits(image_id, _dir_ids(layer_dirs))
        except OSError:
            return False


def _dir_ids(dirs: list[str]) -> tuple[tuple[int, int], ...]:
    out = []
    for d in dirs:
        st = os.stat(d)
        out.append((st.st_dev, st.st_ino))
    return tuple(out)


def make_record_dir(path: str, root: str = "", image_id: str = "",
                    lowers: tuple[tuple[int, int], ...] = ()) -> Overlay | None:
    """A container's record dir with its writable-layer dirs, none there before:
    a spare one of ``root`` (a removed container's, see ``retire``) renamed into
    place where there is one, else made. Returns the spare's overlay where it is
    of ``image_id`` on those ``lowers`` (the caller's now), else None."""
    while root:
        spare = _slots.take_spare(root, image_id, lowers)
        if spare is None:
            break
        spare_dir, overlay = spare
        try:
            os.rename(spare_dir, path)
            return overlay
        except OSError:
            if overlay is not None:
                overlay.close()
            with contextlib.suppress(OSError):
                store.remove_tree(spare_dir)
    try:
        _native.mkdir_each([(path, 0o700)] + [(os.path.join(path, n), m) for n, m in FS_DIRS])
    except OSError as e:
        if getattr(e, "made", 0):
            shutil.rmtree(path, ignore_errors=True)
        raise
    return None


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}.{_start_time(pid)}"


class _Slots:
    """At most one ready slot per (root, pod) for this process, made by one thread.

    A create asks for the next slot once its container process exists and sets
    itself up (Container._launch): the caller then waits in C, without the GIL,
    so the slot's making competes least with it. (Made by the caller itself in
    that window, a create took ~1 ms longer; asked for at the start of the
    create, the making competed with the create's own Python work.)"""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        for slot in [*self._ready.values(), *self._base.values()]:
            if slot.pre is not None:
                for fd in (slot.pre.sock, slot.pre._pidfd):
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            for fd in slot.fds():
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        for ov in self._overlays():
            ov.close()
        self._reset()

    def _overlays(self) -> list[Overlay]:
        slots = [*self._ready.values(), *self._base.values()]
        spares = [ov for ps in self._spares.values() for _p, ov in ps]
        return [ov for ov in [*(s.overlay for s in slots), *spares, *self._in_use.values()]
                if ov is not None]

    def _reset(self) -> None:
        # (also in a forked child: the parent's slots are not its own)
        self._cv = threading.Condition()
        self._ready: dict[tuple[str, str], Slot] = {}
        self._making: set[tuple[str, str]] = set()     # asked for, not ready yet
        # per root: the image (id, layer dirs) of the last slot asked for with one
        self._last: dict[str, tuple[str, list[str] | None]] = {}
        self._queue: list[tuple[Any, ...]] = []
        # per (root, pod): the config of the pod's last create, for its next pre-clone
        self._configs: dict[tuple[str, str], ContainerConfig] = {}
        # per (root, pod): a premounted slot made ahead of the ready one, for a pod
        # that creates containers (its held process comes when it is next up)
        self._base: dict[tuple[str, str], Slot] = {}
        self._basing: set[tuple[str, str]] = set()
        self._thread: threading.Thread | None = None
        self._tag = ""
        # per root: spare record dirs (retire) with their overlays, newest last
        self._spares: dict[str, list[tuple[str, Overlay | None]]] = {}
        # per container id: the overlay its rootfs is a clone of (adopt, release)
        self._in_use: dict[str, Overlay] = {}
        self._in_use_dirs: dict[str, str] = {}      # (and their record dirs)

    def take(self, runtime: Runtime, pod_id: str, cgroup_parent: str, image_id: str = "",
             layer_dirs: list[str] | None = None) -> Slot | None:
        """This process's slot for the pod, or None. A slot with another image's
        rootfs is not used (its writable layer may have that image's directories
        copied up): it is deleted off the caller's path."""
        key = (runtime.root, pod_id)
        with self._cv:
            # one being made is nearly done (it was asked for during the last
            # create): waiting for it costs less than doing its work inline
            self._cv.wait_for(lambda: key in self._ready or key not in self._making, TAKE_WAIT)
            slot = self._ready.pop(key, None)
        if slot is not None and (slot.cgroup_parent != cgroup_parent or (
                slot.premounted and not slot.fits(image_id, layer_dirs or []))):
            runtime.trash.later(functools.partial(discard, runtime, slot))
            slot = None
        return slot

    def make(self, runtime: Runtime, pod_id: str, cgroup_parent: str, image_id: str = "",
             layer_dirs: list[str] | None = None, config: ContainerConfig | None = None) -> None:
        """Have the pod's next slot made, with the rootfs of ``image_id`` premounted
        when its ``layer_dirs`` are given, unless one is ready or being made; its
        container process is set up ahead too, as for ``config`` (the config of the
        create asking, a guess at the next), or a plain config of that image."""
        key = (runtime.root, pod_id)
        with self._cv:
            if layer_dirs:
                self._last[runtime.root] = (image_id, list(layer_dirs))
            if config is not None:
                self._configs[key] = config
            if key in self._ready or key in self._making:
                return
            self._making.add(key)
            if not self._tag:
                self._tag = _owner_tag()
            tag = self._tag
            self._queue.append((key, runtime, pod_id, cgroup_parent, tag, image_id, layer_dirs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pycri-slots",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                job = self._queue.pop(0)
            if len(job) == 4:
                self._upgrade(*job)
            else:
                self._make(*job)

    def _make(self, key: tuple[str, str], runtime: Runtime, pod_id: str, cgroup_parent: str,
              tag: str, image_id: str, layer_dirs: list[str] | None) -> None:
        slot = None
        with self._cv:     # (a premounted slot holds 2 fds: not for every pod there is)
            premount = (sum(1 for s in self._ready.values() if s.premounted)
                        + len(self._base)) < MAX_PREMOUNTED
            base = self._base.pop(key, None)
        hot = False
        try:
            if base is not None and (base.cgroup_parent != cgroup_parent or not premount
                                     or not base.fits(image_id, list(layer_dirs or []))):
                runtime.trash.later(functools.partial(discard, runtime, base))
                base = None
            slot = base or _make(runtime, pod_id, cgroup_parent, tag,
                                 image_id if layer_dirs and premount else "",
                                 list(layer_dirs or []) if premount else [])
            if slot is not None and slot.rootfs_fd >= 0 and PRECLONE:
                with self._cv:
                    hot = key in self._configs      # (asked for by a create)
                slot = self._preclone(key, runtime, slot, layer_dirs)
        except (OSError, PycriError):
            pass        # the pod went, or the disk is full
        finally:
            with self._cv:
                self._making.discard(key)
                if slot is not None:
                    self._ready[key] = slot
                self._cv.notify_all()
        if hot and slot is not None and slot.pre is not None:
            self._make_base(key, runtime, pod_id, cgroup_parent, tag, image_id,
                            list(layer_dirs or []))

    def _make_base(self, key: tuple[str, str], runtime: Runtime, pod_id: str,
                   cgroup_parent: str, tag: str, image_id: str, layer_dirs: list[str]) -> None:
        """For a pod that creates containers: the slot after next, but for its held
        process, made now while the pod's last container runs; the next slot then
        only needs that process (it is asked for once a create's process exists, and
        making all of it took longer than a short container's whole life)."""
        with self._cv:
            if key in self._base or any(j[0] == key for j in self._queue):
                return
            self._basing.add(key)   # (forget waits for it)
        base = None
        try:
            base = _make(runtime, pod_id, cgroup_parent, tag, image_id, layer_dirs)
        except (OSError, PycriError):
            pass
        finally:
            with self._cv:
                self._basing.discard(key)
                if base is not None and base.rootfs_fd >= 0:
                    self._base[key] = base
                    base = None
                self._cv.notify_all()
        if base is not None:
            discard(runtime, base)

    def _preclone(self, key: tuple[str, str], runtime: Runtime, slot: Slot,
                  layer_dirs: list[str] | None) -> Slot:
        with self._cv:
            config = self._configs.get(key)
        return _preclone(runtime, slot, config, list(layer_dirs or []))

    def pod_ready(self, runtime: Runtime, pod_id: str, layer_dirs: list[str] | None) -> None:
        """A pod's setup is done: its first slot (made during the setup, before its
        namespaces and files were all in place) may now get its held process."""
        key = (runtime.root, pod_id)
        with self._cv:
            slot = self._ready.get(key)
            if (slot is None or slot.pre is not None or slot.rootfs_fd < 0 or not layer_dirs
                    or not PRECLONE):
                return
            del self._ready[key]
            self._making.add(key)
            self._queue.append((key, runtime, slot, list(layer_dirs)))
            self._cv.notify_all()

    def _upgrade(self, key: tuple[str, str], runtime: Runtime, slot: Slot,
                 layer_dirs: list[str]) -> None:
        try:
            slot = self._preclone(key, runtime, slot, layer_dirs)
        finally:
            with self._cv:
                self._making.discard(key)
                self._ready[key] = slot
                self._cv.notify_all()

    def take_spare(self, root: str, image_id: str = "", lowers: tuple[tuple[int, int], ...] = ()
                   ) -> tuple[str, Overlay | None] | None:
        """A spare dir of root: one whose overlay fits (image_id, lowers) first, with
        it; else the newest, its overlay (if any) closed."""
        with self._cv:
            spares = self._spares.get(root)
            if not spares:
                return None
            for i in range(len(spares) - 1, -1, -1):
                ov = spares[i][1]
                if ov is not None and ov.fits(image_id, lowers):
                    return spares.pop(i)
            path, ov = spares.pop()
        if ov is not None:
            ov.close()      # (before its dirs get another overlay)
        return path, None

    def keep_spare(self, root: str, path: str, overlay: Overlay | None = None) -> bool:
        """Move a removed container's emptied record dir (in the trash) to a spare's
        name under ``<root>/slots/``, with its overlay; False when there are
        MAX_SPARES already."""
        with self._cv:
            if len(self._spares.get(root, ())) >= MAX_SPARES:
                return False
            if not self._tag:
                self._tag = _owner_tag()
            dest = os.path.join(root, "slots", f"{self._tag}.{SPARE}.{secrets.token_hex(16)}")
        try:
            os.rename(path, dest)
        except OSError:
            return False
        with self._cv:
            self._spares.setdefault(root, []).append((dest, overlay))
        return True

    def drop_spares(self, root: str = "") -> None:
        """Delete this process's spares, of ``root`` or all (at exit: nobody else may
        use them)."""
        with self._cv:
            if root:
                spares = self._spares.pop(root, [])
            else:
                spares = [sp for ps in self._spares.values() for sp in ps]
                self._spares.clear()
        for p, ov in spares:
            if ov is not None:
                ov.close()
            with contextlib.suppress(OSError):
                store.remove_tree(p)

    def drop_stale_overlays(self, root: str) -> None:
        """Close the spares' overlays whose layer dirs were deleted (image GC), so
        their files' disk space is freed; the spare dirs stay."""
        stale = []
        with self._cv:
            spares = self._spares.get(root, [])
            for i, (path, ov) in enumerate(spares):
                if ov is not None and ov.layers_gone():
                    stale.append(ov)
                    spares[i] = (path, None)
        for ov in stale:
            ov.close()

    def adopt(self, ctr_id: str, overlay: Overlay | None, record_dir: str = "") -> None:
        """A container made on a slot keeps the slot's overlay (release), but past
        MAX_KEPT_OVERLAYS (an fd each): then the container's own clone is all that
        holds it, and it goes with the container. (Kept ones of containers another
        process removed are let go first.)"""
        if overlay is None:
            return
        with self._cv:
            if len(self._in_use) >= MAX_KEPT_OVERLAYS:
                gone = [k for k, d in self._in_use_dirs.items() if d and not os.path.isdir(d)]
                for k in gone:
                    self._in_use_dirs.pop(k, None)
                    self._in_use.pop(k).close()
            if len(self._in_use) < MAX_KEPT_OVERLAYS:
                self._in_use[ctr_id] = overlay
                self._in_use_dirs[ctr_id] = record_dir
                return
        overlay.close()

    def release(self, ctr_id: str) -> Overlay | None:
        with self._cv:
            self._in_use_dirs.pop(ctr_id, None)
            return self._in_use.pop(ctr_id, None)

    def last_image(self, runtime: Runtime) -> tuple[str, list[str] | None]:
        """The image (id, layer dirs) the last slot on this root was asked for with:
        a new pod's first slot premounts it, a guess at what the pod will run."""
        with self._cv:
            return self._last.get(runtime.root, ("", None))

    def peek(self, runtime: Runtime, pod_id: str) -> Slot | None:
        """The slot a create in the pod would take now (it stays)."""
        with self._cv:
            return self._ready.get((runtime.root, pod_id))

    def forget(self, runtime: Runtime, pod_id: str) -> None:
        """Before a pod goes: delete this process's slot of it (once made)."""
        key = (runtime.root, pod_id)
        with self._cv:
            queued = [j for j in self._queue if j[0] == key]
            slot = None
            for job in queued:
                self._queue.remove(job)
                self._making.discard(key)
                if len(job) == 4:
                    slot = job[2]       # (a made slot waiting for its held process)
            while key in self._making or key in self._basing:
                self._cv.wait()
            slot = self._ready.pop(key, None) or slot
            self._configs.pop(key, None)
            base = self._base.pop(key, None)
        # their processes and cgroups now (the pod's namespaces and cgroup go next),
        # their mounts and dirs off the caller's path (closing a premounted overlay
        # unmounts it, syncing the upper dir)
        for s in (base, slot):
            if s is not None:
                discard(runtime, s, mounts_later=True)


def _make(runtime: Runtime, pod_id: str, parent: str, tag: str, image_id: str,
          layers: list[str]) -> Slot | None:
    mgr = runtime.cgroups(parent)
    if not mgr.pod(pod_id).exists():
        return None
    cid = secrets.token_hex(32)
    base = store.makedirs(os.path.join(runtime.root, "slots"), 0o700)
    path = os.path.join(base, f"{tag}.{pod_id}.{cid}")
    try:
        lowers = _dir_ids(layers) if layers else ()
    except OSError:
        lowers, layers = (), []     # (the image went meanwhile: a slot without a rootfs)
    overlay = make_record_dir(path, runtime.root, image_id if layers else "", lowers)
    try:
        mgr.create_container(pod_id, cid)
    except BaseException:
        if overlay is not None:
            overlay.close()
        runtime.trash.put(path)
        raise
    slot = Slot(cid, path, pod_id, parent)
    if layers:
        try:
            if overlay is None:
                overlay = Overlay(_native.overlay_premount(
                    layers + [runtime.mount_points], os.path.join(path, "fs", "upper"),
                    os.path.join(path, "fs", "work"), MOUNT_DIRS, MOUNT_FILES), image_id, lowers,
                    tuple(layers))
            fd = _native.mount_clone(overlay.fd)
        except OSError:
            if overlay is not None:
                overlay.close()
            return slot     # (the image went meanwhile: a slot without a rootfs)
        try:
            dev = _native.dev_premount()
        except OSError:
            dev = -1
        slot = Slot(cid, path, pod_id, parent, rootfs_fd=fd, dev_fd=dev, overlay=overlay)
    return slot


def _preclone(runtime: Runtime, slot: Slot, config: ContainerConfig | None,
              layer_dirs: list[str]) -> Slot:
    """The slot with its container process set up ahead (Slot.pre), where the pod
    allows one (launchplan.standin); else as it was."""
    from pycri import launchplan     # (it imports this module's types)
    from pycri.config import ContainerConfig
    try:
        sandbox = runtime.sandbox(slot.pod_id)
        sb_rec = sandbox.record()
        if sb_rec.get("state") != "ready":
            return slot
        cfg = config if config is not None else ContainerConfig(name="standin", image=slot.image_id)
        spec = launchplan.standin(runtime, sandbox, sb_rec, cfg, slot, layer_dirs)
        if spec is None:
            return slot
        key = launchplan.setup_key(spec, slot.dir)
        pre = _native.preclone(spec, _native.monitor_path())
    except (OSError, PycriError):
        return slot     # (the pod went meanwhile, or it cannot be done: a plain slot)
    # the process has the overlay and /dev attached in its own mount namespace now
    for fd in slot.fds():
        os.close(fd)
    return dataclasses.replace(slot, rootfs_fd=-1, dev_fd=-1, pre=pre, pre_key=key)


def discard(runtime: Runtime, slot: Slot, mounts_later: bool = False) -> None:
    """Delete an unused slot: its process, cgroup, mounts and directory (the last
    two on the trash thread with ``mounts_later``)."""
    if slot.pre is not None:
        slot.pre.discard()
    _drop_cgroup(runtime, slot)
    if mounts_later:
        runtime.trash.later(functools.partial(_drop_mounts_and_dir, runtime, slot))
    else:
        _drop_mounts_and_dir(runtime, slot)


def _drop_cgroup(runtime: Runtime, slot: Slot) -> None:
    with contextlib.suppress(OSError, PycriError):
        runtime.cgroups(slot.cgroup_parent).container(slot.pod_id, slot.id).destroy(1.0)


def _drop_mounts_and_dir(runtime: Runtime, slot: Slot) -> None:
    for fd in slot.fds():
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    if slot.overlay is not None:
        slot.overlay.close()    # (the last reference: the mount goes)
    with contextlib.suppress(OSError):
        runtime.trash.put(slot.dir)


def retire(runtime: Runtime, record_dir: str, monitor_pid: int = 0,
           overlay: Overlay | None = None) -> None:
    """Take a removed container's record dir away (one rename into the trash, as
    Trash.put does) and, off the caller's path, keep its writable-layer dirs as a
    spare for a next slot where they are as make_record_dir made them (nothing
    written, no attribute changed), else delete it all.

    A spare saves the next container five mkdirs, and this one five rmdirs. On a
    journal-less ext4 (this project's CI host) that is more than it looks: each
    inode made skips, one by one, every inode freed in the last minutes.
    ``monitor_pid`` is the container's monitor, which may still hold the old
    overlay while it exits: the dirs are reused only once it is gone. ``overlay``
    (this process's, see Overlay) goes with them when they are kept, else it is
    closed before they are deleted."""
    runtime.trash.put(record_dir, functools.partial(_salvage, runtime.root, monitor_pid, overlay))


def _salvage(root: str, monitor_pid: int, overlay: Overlay | None, path: str) -> bool:
    kept = _salvage_dirs(root, monitor_pid, overlay, path)
    if not kept and overlay is not None:
        overlay.close()
    return kept


def _salvage_dirs(root: str, monitor_pid: int, overlay: Overlay | None, path: str) -> bool:
    if not _monitor_gone(monitor_pid):
        return False
    try:
        with os.scandir(path) as it:
            others = [e.path for e in it if e.name != "fs"]
        for p in others:
            if os.path.isdir(p) and not os.path.islink(p):
                store.remove_tree(p)
            else:
                os.unlink(p)
        if not _as_made(path):
            return False
    except OSError:
        return False
    return _slots.keep_spare(root, path, overlay)


def _monitor_gone(pid: int, timeout: float = SPARE_WAIT) -> bool:
    if pid <= 0:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _as_made(path: str) -> bool:
    """Whether the record dir holds its FS_DIRS only, each empty (fs/work: but for
    the overlay's own empty work/work, which a mount remakes), with the mode it was
    made with, owned by root, without xattrs (ACLs included; the upper dir's
    overlay uuid is removed), none a mount point."""
    with contextlib.suppress(OSError):     # (the start time of its last container)
        os.removexattr(path, STARTED_XATTR, follow_symlinks=False)
    dev = os.lstat(path).st_dev
    expect = ((path, 0o700, ["fs"]),) + tuple(
        (os.path.join(path, n), m, ["rootfs", "upper", "work"] if n == "fs" else None)
        for n, m in FS_DIRS)
    for d, mode, names in expect:
        st = os.lstat(d)
        xattrs = os.listxattr(d, follow_symlinks=False)
        if OVERLAY_UUID in xattrs and d.endswith("/upper"):
            # the last overlay's identity (f_fsid): the next mount sets a new one
            os.removexattr(d, OVERLAY_UUID, follow_symlinks=False)
            xattrs.remove(OVERLAY_UUID)
        if (not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != mode
                or st.st_uid or st.st_gid or st.st_dev != dev or xattrs):
            return False
        got = sorted(os.listdir(d))
        if names is not None:
            if got != names:
                return False
        elif d.endswith("/work"):
            if got not in ([], ["work"]) or (got and os.listdir(os.path.join(d, "work"))):
                return False
        elif got:
            return False
    return True


def cleanup(runtime: Runtime) -> None:
    """Delete the slots of processes that are gone."""
    base = os.path.join(runtime.root, "slots")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return
    for name in names:
        parts = name.split(".")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].lstrip("-").isdigit():
            runtime.trash.put(os.path.join(base, name))     # not ours to keep
            continue
        pid, start, pod_id, cid = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if _start_time(pid) == start:
            continue    # its owner lives (and may take it any moment)
        if pod_id == SPARE:
            runtime.trash.put(os.path.join(base, name))
            continue
        parent = runtime.cgroup_parent
        with contextlib.suppress(OSError, ValueError, KeyError):
            parent = store.read_json(os.path.join(runtime.root, "sandboxes", pod_id,
                                                  "record.json"))["cgroup_parent"]
        discard(runtime, Slot(cid, os.path.join(base, name), pod_id, parent))


_slots = _Slots()
atexit.register(_slots.drop_spares)     # (before store's drain: atexit runs newest first)
take = _slots.take
adopt = _slots.adopt
drop_stale_overlays = _slots.drop_stale_overlays
drop_spares = _slots.drop_spares
release = _slots.release
make = _slots.make
last_image = _slots.last_image
peek = _slots.peek
forget = _slots.forget
pod_ready = _slots.pod_ready
