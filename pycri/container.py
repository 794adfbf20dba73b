"""Containers: create, start, stop, kill, wait, exec, logs, stats, remove.

A container is a record in ``<root>/containers/<id>/`` (config, state, times,
exit status; its writable layer in ``fs/``) plus runtime state in
``<state>/containers/<id>/`` (the launcher's start socket, the monitor's exit
file and attach socket). The process tree is::

    pycri-monitor (detached; the launcher before start)
      └─ container init (in the pod's namespaces, its own mount/pid namespaces,
         the container cgroup)

The monitor outlives the Python process, so a new Runtime finds running
containers again and reads how they ended from the exit file.

State machine: created -> running -> exited; created -> exited (removed or
failed start). Each verb takes the container lock, re-reads the record,
refreshes it from the exit file, checks the transition, acts, and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycri.procinfo import (_alive, _catches, _direct, _exits, _pty_in,  # noqa: F401 (_alive: sandbox.py)
                             _started_at, _start_time, mark_started)
from pycri import _native, launchplan, logs, slots, store, users
from pycri.execproc import EXEC_OUTPUT_LIMIT, ExecProcess, ExecResult, _collect  # noqa: F401 (public here too)
from pycri.execproc import _readable
from pycri.process import (  # noqa: F401 - CAPS, DEFAULT_* and cap_mask are public here too
    DEFAULT_PATH,
    _argv,
    _env,
    _groups,
    CAPS,
    DEFAULT_CAPS,
    DEFAULT_MASKED,
    DEFAULT_READONLY,
    cap_mask,
    capabilities,
    cgroup_resources,
    check_in_sandbox,
    masked_and_readonly,
    rlimits_for,
    seccomp_for,
)
from pycri.config import ContainerConfig, to_json
from pycri.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    InvalidStateError,
    NotFoundError,
    PycriError,
    RuntimeFailure,
)

if TYPE_CHECKING:
    from pycri.image import Image
    from pycri.runtime import Runtime
    from pycri.sandbox import Sandbox

CREATED = "created"
RUNNING = "running"
EXITED = "exited"



@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    oom_killed: bool
    timed_out: bool


@dataclass(frozen=True)
class ContainerStatus:
    id: str
    sandbox_id: str
    name: str
    state: str
    pid: int
    created_at_ns: int
    started_at_ns: int
    finished_at_ns: int
    exit_code: int
    reason: str
    message: str
    image: str
    image_ref: str
    log_path: str
    config: ContainerConfig
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    image_volumes: dict[str, str] | None = None   # container path -> image id


@dataclass(frozen=True)
class ContainerStats:
    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    pids: int
    writable_layer_bytes: int
    writable_layer_inodes: int
    timestamp_ns: int


def _parse(data: bytes) -> store.ParsedRecord:
    return store.ParsedRecord(data, ContainerConfig)


class Container:
    """A handle on one container: an id and its Runtime. The disk is the truth."""

    def __init__(self, runtime: Runtime, container_id: str) -> None:
        self.runtime = runtime
        self.id = container_id

    def __repr__(self) -> str:
        return f"Container({self.id[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Container) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- paths and records -----------------------------------------------------

    @property
    def record_dir(self) -> str:
        return os.path.join(self.runtime.root, "containers", self.id)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.runtime.state, "containers", self.id)

    def _cgroup(self, rec: dict[str, Any]) -> Any:
        return self.runtime.cgroups(rec["cgroup_parent"]).container(rec["sandbox_id"], self.id)

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _sock(self, kind: str) -> str:
        """Unix socket paths are limited to 107 bytes: keep them short."""
        return os.path.join(self.runtime.state, "sockets", f"{self.id[:20]}.{kind}")

    @contextlib.contextmanager
    def _lock(self, missing_ok: bool = False) -> Iterator[bool]:
        """The container's lock: an flock on its record dir, so a container has no
        lock file to make and delete (an inode each, costly on some disks). Once
        the container is removed: NotFoundError. One who opened the dir before the
        removal and gets the lock after it finds the record gone (every locked
        operation reads it first), even where the dir was reused for another
        container (slots.retire): that one only waits a moment. With ``missing_ok``
        a removed container yields False (no lock) instead."""
        try:
            fd = os.open(self.record_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not missing_ok:
                raise NotFoundError(f"container {self.id} not found") from None
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)

    def _parsed(self) -> store.ParsedRecord:
        """The record file as it is now, parsed (reused while its bytes are unchanged)."""
        path = os.path.join(self.record_dir, "record.json")
        try:
            data = store.read_bytes(path)
        except FileNotFoundError:
            self.runtime.parsed.forget(path)
            raise NotFoundError(f"container {self.id} not found") from None
        return self.runtime.parsed.get(path, data, _parse)

    def _read(self, parsed: store.ParsedRecord | None = None) -> dict[str, Any]:
        """The record with a recorded start folded in. Its nested values belong to the
        shared parse: callers may set top-level keys, and replace (never change) the rest."""
        rec = dict((parsed or self._parsed()).rec)
        if rec["state"] == CREATED:
            started = _started_at(self.record_dir)
            if started is not None:
                rec.update(state=RUNNING, started_at_ns=started)
        return rec

    def _mark_started(self) -> None:
        """Record the start beside record.json (procinfo.mark_started: no rewrite of
        the record, no file made). _read folds it in."""
        mark_started(self.record_dir)

    def _write(self, rec: dict[str, Any]) -> None:
        # No fsync: the rename is atomic, so a killed process never leaves a torn
        # record, and after a power loss the processes it describes are gone too
        # (recovery settles them). Image content, by contrast, is fsynced.
        store.write_json(os.path.join(self.record_dir, "record.json"), rec, sync=False)

    @property
    def _exit_file(self) -> str:
        # In the record dir (under root), not the state dir: the monitor's account of
        # the exit outlives a reboot that clears /run, with no write from Python.
        return os.path.join(self.record_dir, "exit.json")

    def record(self, parsed: store.ParsedRecord | None = None) -> dict[str, Any]:
        """The record, brought up to date (in memory) with the monitor's exit file.
        Nothing is written: the exit file itself is the durable account of the exit.
        (Nested values are shared with other readers: treat them as read-only.)"""
        rec = self._read(parsed)
        if rec["state"] == RUNNING and (os.path.exists(self._exit_file) or
                                        not _alive(rec.get("monitor_pid", 0), 0)):
            self._refresh(rec)      # (a killed monitor: the end is Unknown once it came)
        return rec

    def _refresh(self, rec: dict[str, Any]) -> bool:
        """Fold the exit file (or a vanished process) into rec; True if it changed."""
        if rec["state"] != RUNNING:
            return False
        try:
            ex = _native.read_exit_file(self._exit_file)
        except ValueError:
            ex = None       # cut short by a power loss: treated like a missing one
        if ex is None:
            if _alive(rec.get("pid", 0), rec.get("pid_start_time", 0)) or \
                    _alive(rec.get("monitor_pid", 0), 0):
                return False
            # Both gone without an exit file: the machine rebooted or someone
            # killed the monitor. Say so rather than invent an exit code.
            rec.update(state=EXITED, exit_code=255, reason="Unknown",
                       message="the container's monitor is gone and recorded no exit",
                       finished_at_ns=time.time_ns())
            return True
        # The monitor compares the cgroup's oom_kill count at start and exit for a
        # SIGKILLed init; a non-zero exit after an OOM kill of another process of the
        # container is reported as OOMKilled too (as containerd does).
        oom = ex.oom_killed or (ex.exit_code != 0 and self._oom_seen(rec))
        rec.update(state=EXITED, exit_code=ex.exit_code, finished_at_ns=ex.exited_at_ns,
                   reason="OOMKilled" if oom else ("Completed" if ex.exit_code == 0 else "Error"),
                   message="")
        return True

    def _oom_seen(self, rec: dict[str, Any]) -> bool:
        try:
            return self._cgroup(rec).oom_kill_count() > rec.get("oom_kills_at_start", 0)
        except (PycriError, OSError, AttributeError, ValueError):
            return False

    @property
    def config(self) -> ContainerConfig:
        """The container's config (shared with other readers; frozen, and its dicts are
        not to be changed)."""
        return self._parsed().config

    @property
    def sandbox_id(self) -> str:
        return str(self._read()["sandbox_id"])

    @property
    def name(self) -> str:
        return str(self._read()["config"]["name"])

    @property
    def state(self) -> str:
        return str(self.record()["state"])

    @property
    def log_path(self) -> str:
        return str(self._read()["log_path"])

    def status(self) -> ContainerStatus:
        """State, times, exit and config now. The config object is shared while the record
        is unchanged: read it, do not change its dicts."""
        parsed = self._parsed()
        rec = self.record(parsed)
        cfg = parsed.config
        return ContainerStatus(
            id=self.id, sandbox_id=rec["sandbox_id"], name=cfg.name, state=rec["state"],
            pid=rec.get("pid", 0) if rec["state"] == RUNNING else 0,
            created_at_ns=rec["created_at_ns"], started_at_ns=rec.get("started_at_ns", 0),
            finished_at_ns=rec.get("finished_at_ns", 0), exit_code=rec.get("exit_code", 0),
            reason=rec.get("reason", ""), message=rec.get("message", ""),
            image=rec["image_ref"], image_ref=rec["image_id"], log_path=rec["log_path"],
            config=cfg, uid=rec.get("user", {}).get("uid", 0),
            gid=rec.get("user", {}).get("gid", 0),
            groups=tuple(rec.get("user", {}).get("groups", ())),
            image_volumes=dict(rec.get("image_volumes", {})))

    # -- create ------------------------------------------------------------------

    @classmethod
    def create(cls, runtime: Runtime, sandbox: Sandbox, config: ContainerConfig) -> Container:
        sb_rec = sandbox.record()
        if sb_rec["state"] != "ready":
            raise InvalidStateError(f"sandbox {sandbox.id} is {sb_rec['state']}, not ready")
        check_in_sandbox(config, sb_rec["config"])
        rlimits_for(config)  # refuses limits above what pycri may grant, early
        image = runtime.images.get(config.image)
        # an id, record dir and cgroup made ahead by this process (pycri/slots.py)
        # (and, for a pod without a user namespace, its rootfs: the image's overlay)
        layer_dirs = runtime.images.layer_dirs(image)
        slot = slots.take(runtime, sandbox.id, sb_rec["cgroup_parent"], image.id,
                          None if sb_rec["config"].get("user_namespace") else layer_dirs)
        ctr = cls(runtime, slot.id if slot else secrets.token_hex(32))
        with contextlib.ExitStack() as held:
            placed = False
            try:
                with store.flock(os.path.join(runtime.root, "locks", "containers.lock")):
                    for other in sandbox.containers():
                        with contextlib.suppress(NotFoundError):
                            o = other._read()["config"]
                            if (o["name"], o.get("attempt", 0)) == (config.name, config.attempt):
                                raise AlreadyExistsError(
                                    f"container {config.name!r} (attempt {config.attempt}) "
                                    f"already exists in sandbox {sandbox.id[:12]} as {other.id}")
                    if slot:
                        os.rename(slot.dir, ctr.record_dir)
                    else:
                        slots.make_record_dir(ctr.record_dir, runtime.root)
                    placed = True
                    # The container's lock only now that its dir exists (a new
                    # Runtime's sweep of lock files spares it), held from before
                    # its first record to the end of the create.
                    held.enter_context(ctr._lock())
                    log_path = config.log_path or os.path.join(ctr.record_dir, "container.log")
                    if config.log_path and sb_rec["config"].get("log_directory") and \
                            not os.path.isabs(config.log_path):
                        log_path = os.path.join(sb_rec["config"]["log_directory"],
                                                config.log_path)
                    rec: dict[str, Any] = {
                        "id": ctr.id, "sandbox_id": sandbox.id, "state": CREATED,
                        "created_at_ns": time.time_ns(), "config": to_json(config),
                        "image_id": image.id,
                        "image_ref": (image.repo_tags or image.repo_digests or (image.id,))[0],
                        "log_path": log_path, "cgroup_parent": sb_rec["cgroup_parent"],
                        "layers": list(image.chain_ids),
                    }
                    if slot is not None and slot.pre is not None:
                        # its process exists already (held, see slots.py): recorded
                        # now, this is the record a crash from here on leaves (and
                        # the launch need not write it again when it reports them)
                        rec.update(pid=slot.pre.pid, pid_start_time=slot.pre.start_time,
                                   monitor_pid=slot.pre.monitor_pid)
                    ctr._write(rec)
                    if slot:
                        slots.adopt(ctr.id, slot.overlay, ctr.record_dir)
            except BaseException:
                if slot:    # all it holds, its directory wherever that is now
                    slots.discard(runtime, dataclasses.replace(
                        slot, dir=ctr.record_dir if placed else slot.dir))
                elif placed:
                    runtime.trash.put(ctr.record_dir)
                raise
            try:
                ctr._launch(rec, sandbox, sb_rec, image, config, slot)
            except BaseException:
                with contextlib.suppress(Exception):
                    ctr._destroy(rec)
                raise
        return ctr

    def _launch(self, rec: dict[str, Any], sandbox: Sandbox, sb_rec: dict[str, Any],
                image: Image, config: ContainerConfig, slot: slots.Slot | None) -> None:
        try:
            self._launch_in(rec, sandbox, sb_rec, image, config, slot)
        finally:
            for fd in slot.fds() if slot is not None else ():
                if fd >= 0:
                    os.close(fd)    # (the child has its own, or it failed)
            if slot is not None and slot.pre is not None:
                slot.pre.discard()  # (unless the launch used it up)

    def _launch_in(self, rec: dict[str, Any], sandbox: Sandbox, sb_rec: dict[str, Any],
                   image: Image, config: ContainerConfig, slot: slots.Slot | None) -> None:
        plan = launchplan.plan(self, rec, sandbox, sb_rec, image, config, slot)
        rt = self.runtime
        # the container process the slot holds, set up ahead, if it was set up just
        # as this config wants (else it goes first: it is in the cgroup and holds
        # the writable layer; the overlay is then mounted by the new process)
        pre = slot.pre if slot is not None else None
        if slot is not None and pre is not None and (
                launchplan.setup_key(plan.spec, self.record_dir) != slot.pre_key
                or not pre.alive()):
            pre.discard()
            pre = None
        if (pre is None and slot is not None and slot.overlay is not None
                and plan.spec.rootfs_mount_fd < 0):
            # the slot's overlay (its held process had the clone): one of its own, as
            # a second overlay on the same upper dir must not be
            plan.spec.rootfs_mount_fd = _native.mount_clone(slot.overlay.fd)
            plan.child_fds.append(plan.spec.rootfs_mount_fd)

        def record_pids(r: _native.LaunchResult) -> None:
            # while the container process mounts its root: the record with its pids
            # (a crash from here on leaves a record recovery can settle) ...
            pids = {"pid": r.pid, "pid_start_time": r.start_time, "monitor_pid": r.monitor_pid}
            if any(rec.get(k) != v for k, v in pids.items()):
                rec.update(pids)
                self._write(rec)
            # ... and the next create's slot (it would wait through this anyway)
            slots.make(rt, sandbox.id, rec["cgroup_parent"], image.id,
                       None if sb_rec["config"].get("user_namespace") else plan.layer_dirs,
                       config)

        try:
            res = _native.launch(plan.spec, self._sock("start"), plan.monitor, plan.monitor_fds,
                                 on_pid=record_pids, preclone=pre)
        except OSError as e:
            os.close(plan.done_r)
            stage = getattr(e, "stage", "")
            raise RuntimeFailure(f"create container {config.name}: {e.strerror or e}",
                                 stage=stage, errno=e.errno or 0) from e
        except BaseException:
            os.close(plan.done_r)
            raise
        finally:
            plan.close_passed()
        if not _exits.put(self.id, plan.done_r):
            os.close(plan.done_r)   # (holding enough: waits on this one poll instead)
        if res.start_fd >= 0:
            _direct.put(self.id, res.start_fd, res.report_fd)
        if rec.get("pid") != res.pid:   # (no early report from this launch)
            rec.update(pid=res.pid, pid_start_time=res.start_time, monitor_pid=res.monitor_pid)
            self._write(rec)

    def _image_volume(self, rec: dict[str, Any], index: int, m: Any) -> str:
        """Mount image ``m.image`` read-only (an overlay of its layers, no upper dir) in
        the state dir; the container binds it (or its ``sub_path``) at the target."""
        image = self.runtime.images.get(m.image)
        layer_dirs = self.runtime.images.layer_dirs(image)
        if m.sub_path and users.read_image_file(layer_dirs, m.sub_path) is None \
                and not _image_dir_exists(layer_dirs, m.sub_path):
            raise InvalidArgumentError(
                f"image volume {m.image!r}: sub_path {m.sub_path!r} does not exist in the image")
        store.makedirs(self.state_dir)       # (made only for image volumes)
        target = store.makedirs(self._path(f"image-volume-{index}"), 0o755)
        userns = self.runtime.sandbox(rec["sandbox_id"]).user_namespace()
        try:
            if userns:  # the image's owners, as in the rootfs (csrc/userns.c)
                _native.mount_overlay_idmapped(target, layer_dirs, userns)
            else:
                _native.mount_overlay(target, layer_dirs)
        except OSError as e:
            raise RuntimeFailure(f"image volume {m.image!r}: {e.strerror or e}",
                                 stage="mount") from e
        rec.setdefault("image_volumes", {})[m.container_path] = image.id
        rec["layers"] = sorted(set(rec.get("layers", [])) | set(image.chain_ids))
        return os.path.join(target, m.sub_path) if m.sub_path else target

    def _unmount_image_volumes(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.state_dir):
                if name.startswith("image-volume-"):
                    with contextlib.suppress(OSError):
                        _native.mount_unmount(os.path.join(self.state_dir, name))

    # -- start / stop / kill / wait ------------------------------------------------

    def _started_unrecorded(self, rec: dict[str, Any]) -> bool:
        """Started by a process that died before saving it: the launcher consumed its
        start socket and turned into the monitor, and the container runs."""
        return (not os.path.exists(self._sock("start"))
                and _alive(rec.get("monitor_pid", 0), 0)
                and _alive(rec.get("pid", 0), rec.get("pid_start_time", 0)))

    def start(self) -> None:
        with self._lock():
            rec = self._read()
            if rec["state"] == CREATED and self._started_unrecorded(rec):
                self._mark_started()
                return
            if rec["state"] != CREATED:
                raise InvalidStateError(f"container {self.id[:12]} is {rec['state']}, not created")
            try:
                fds = _direct.take(self.id)
                if fds is not None:
                    # this process made it: straight to the held process
                    _native.start_direct(*fds)
                else:
                    _native.launch_start(self._sock("start"))
            except OSError as e:
                rec.update(state=EXITED, exit_code=128, reason="StartError",
                           message=e.strerror or str(e), finished_at_ns=time.time_ns())
                self._write(rec)
                raise RuntimeFailure(f"start container {self.name}: {e.strerror or e}",
                                     stage=getattr(e, "stage", "exec"), errno=e.errno or 0) from e
            self._mark_started()

    def _signal(self, rec: dict[str, Any], sig: int) -> None:
        if rec["state"] != RUNNING or not _alive(rec["pid"], rec["pid_start_time"]):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the container's init process (if it runs)."""
        with self._lock():
            rec = self._read()
            self._refresh(rec)
            self._signal(rec, sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the container to exit; returns its exit code. TimeoutError on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        rec = self.record()
        if rec["state"] == CREATED:
            raise InvalidStateError(f"container {self.id[:12]} was never started")
        if rec["state"] == RUNNING and self._wait_done(rec, deadline):
            return int(rec["exit_code"])
        pidfd = _native.pidfd_open(rec.get("monitor_pid", 0)) if rec["state"] == RUNNING else -1
        # The container's own exit comes first: the monitor writes the exit file right
        # after reaping it, and only then exits (tearing the container's mounts down,
        # which takes a while). So watch the process, then look for the file in short
        # steps, with the monitor's end as the backstop.
        ctr_fd = -1
        if pidfd >= 0:
            ctr_fd = _native.pidfd_open(rec.get("pid", 0))
            if ctr_fd >= 0 and not _alive(rec["pid"], rec.get("pid_start_time", 0)):
                os.close(ctr_fd)    # (that pid is no longer the container)
                ctr_fd = -1
        step = 0.5
        try:
            while True:
                if rec["state"] == EXITED:
                    return int(rec["exit_code"])
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"container {self.id[:12]} still running")
                if pidfd >= 0:
                    fds = [pidfd] if ctr_fd < 0 else [pidfd, ctr_fd]
                    ready = _readable(fds, step if left is None else min(step, left))
                    if ctr_fd in ready:
                        os.close(ctr_fd)
                        ctr_fd = -1
                        step = 0.0001
                    elif step < 0.5:
                        step = min(0.5, step * 2)
                    # the record changes only by the exit file (or by a stop or a
                    # remove, which the monitor's end shows too): read it again then
                    if pidfd not in ready:
                        if os.path.exists(self._exit_file):
                            self._refresh(rec)      # (fold it into the record in hand)
                        continue
                else:
                    time.sleep(0.05 if left is None else min(0.05, left))
                rec = self.record()     # (folds in an exit, or both processes gone)
        finally:
            for fd in (pidfd, ctr_fd):
                if fd >= 0:
                    os.close(fd)

    def _wait_done(self, rec: dict[str, Any], deadline: float | None) -> bool:
        """For a container this process created: wait on the pipe its monitor closes
        once the exit file is written (or as it dies), then fold the file into rec.
        True when rec says exited; False: no pipe here, or no exit file after all."""
        held = _exits.take(self.id)
        if held is None:
            return False
        done = held[0]
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    _exits.put(self.id, done)   # (for the next wait)
                    done = -1
                    raise TimeoutError(f"container {self.id[:12]} still running")
                if _readable([done], left):
                    break
        finally:
            if done >= 0:
                os.close(done)
        self._refresh(rec)
        return rec["state"] == EXITED

    def stop(self, timeout: float = 10.0) -> None:
        """Stop signal, up to ``timeout`` seconds' grace, then SIGKILL to every process
        of the container. Idempotent; a created container is simply marked exited."""
        with self._lock(missing_ok=True) as present:
            if not present:
                return
            try:
                rec = self._read()
            except NotFoundError:
                return
            if self._refresh(rec):
                self._write(rec)
            if rec["state"] == CREATED:
                self._kill_launcher(rec)
                rec.update(state=EXITED, exit_code=137, reason="Error",
                           message="stopped before it was started", finished_at_ns=time.time_ns())
                self._write(rec)
                return
            if rec["state"] != RUNNING:
                return
            sig = _stop_signal(self.runtime, rec)
            dropped = False
            if timeout > 0:
                # A pid-namespace init gets a signal from outside only if it handles it;
                # one sent before the program installed its handler (a stop right after
                # start) is dropped by the kernel, so it is sent again once handled.
                dropped = not _catches(rec["pid"], sig)
                self._signal(rec, sig)
        if timeout > 0:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                try:
                    self.wait(min(left, 0.5) if dropped else left)
                    break
                except (TimeoutError, InvalidStateError):
                    if time.monotonic() >= deadline:
                        break
                if dropped and _catches(rec["pid"], sig):
                    dropped = False
                    with self._lock():
                        rec = self._read()
                        self._refresh(rec)
                        self._signal(rec, sig)
        with self._lock():
            rec = self._read()
            self._refresh(rec)
            if rec["state"] == RUNNING:
                cg = self._cgroup(rec)
                with contextlib.suppress(PycriError, OSError):
                    cg.kill()
                self._signal(rec, signal.SIGKILL)
            self._write(rec)
        with contextlib.suppress(TimeoutError, InvalidStateError):
            self.wait(10)
        # the init is gone; anything it left behind in the cgroup (host or pod pid
        # namespace modes) goes too
        with self._lock(missing_ok=True):
            with contextlib.suppress(NotFoundError, PycriError, OSError):
                rec = self._read()
                cg = self._cgroup(rec)
                if cg.pids():
                    cg.kill()

    def reopen_log(self) -> None:
        """Ask the monitor to reopen the log file (after it was rotated away)."""
        rec = self.record()
        if rec["state"] != RUNNING:
            raise InvalidStateError(f"container {self.id[:12]} is {rec['state']}, not running")
        pid = rec.get("monitor_pid", 0)
        if not _alive(pid, 0):
            raise RuntimeFailure("the container's monitor is gone", stage="log")
        # made here, so it exists when this returns; the monitor reopens it asynchronously
        os.close(os.open(rec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o640))
        os.kill(pid, signal.SIGUSR1)

    def _kill_launcher(self, rec: dict[str, Any]) -> None:
        """A created container: its launcher and held process go away."""
        _direct.drop(self.id)
        for key in ("pid", "monitor_pid"):
            pid = rec.get(key, 0)
            start = rec.get("pid_start_time", 0) if key == "pid" else 0
            if pid and _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Stop if needed, then delete the container and all it holds. Idempotent."""
        try:
            rec = self.record()
        except NotFoundError:
            return
        exited = rec["state"] == EXITED
        if not exited:
            self.stop(timeout=0)
        with self._lock(missing_ok=True) as present:
            if not present:
                return
            if exited:
                # an end is final: only whether someone removed it meanwhile matters
                if not os.path.exists(os.path.join(self.record_dir, "record.json")):
                    return
            else:
                try:
                    rec = self.record()     # (the exit folded in: _destroy looks at state)
                except NotFoundError:
                    return
            self._destroy(rec)

    def _destroy(self, rec: dict[str, Any]) -> None:
        _direct.drop(self.id)
        _exits.drop(self.id)
        if rec["state"] == CREATED:
            self._kill_launcher(rec)
        cg = self._cgroup(rec)
        ended = rec["state"] == EXITED and _nothing_runs_in(cg)
        if ended:
            # an empty cgroup: its rmdirs (one per hierarchy) need not hold up remove
            self.runtime.trash.later(cg.destroy)
        else:
            with contextlib.suppress(NotFoundError):
                cg.destroy()
        for kind in ("start", "attach"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sock(kind))
        self._unmount_image_volumes()
        # the state dir first: the record dir going is what makes the container gone
        self.runtime.state_trash.put(self.state_dir)
        overlay = slots.release(self.id)
        if ended:     # (its dirs may make a next container's: slots.retire)
            slots.retire(self.runtime, self.record_dir, rec.get("monitor_pid", 0), overlay)
        else:
            if overlay is not None:
                overlay.close()
            self.runtime.trash.put(self.record_dir)
        self.runtime.parsed.forget(os.path.join(self.record_dir, "record.json"))

    # -- exec, logs, stats, update ---------------------------------------------------

    def _exec_spec(self, cmd: list[str], stdin: int, stdout: int, stderr: int,
                   tty_fd: int) -> tuple[_native.SpawnSpec, dict[str, Any]]:
        parsed = self._parsed()
        rec = self.record(parsed)
        if rec["state"] != RUNNING:
            raise InvalidStateError(f"container {self.id[:12]} is {rec['state']}, not running")
        if not cmd:
            raise InvalidArgumentError("exec needs a command")
        cfg = parsed.config
        image = self.runtime.images.get(rec["image_id"])
        user = users.resolve(self.runtime.images.layer_dirs(image), image.config.user,
                             cfg.run_as_user, cfg.run_as_username, cfg.run_as_group,
                             cfg.supplemental_groups,
                             strict=cfg.supplemental_groups_policy == "Strict")
        caps = capabilities(cfg)
        seccomp = seccomp_for(cfg, caps)
        pid = rec["pid"]
        namespaces = {k: f"/proc/{pid}/ns/{k}" for k in ("mnt", "pid", "net", "ipc", "uts")}
        if os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino:
            namespaces["user"] = f"/proc/{pid}/ns/user"
        cg = self._cgroup(rec)
        spec = _native.SpawnSpec(
            argv=list(cmd), env=_env(image.config.env, cfg.env, user),
            cwd=cfg.working_dir or image.config.working_dir or "/", uid=user.uid,
            gid=user.gid, groups=_groups(user), cap_bounding=caps, cap_effective=caps,
            cap_permitted=caps, seccomp_bpf=seccomp,
            no_new_privs=cfg.no_new_privs or bool(seccomp and user.uid != 0),
            rlimits=rlimits_for(cfg),
            stdin=stdin, stdout=stdout, stderr=stderr, tty_fd=tty_fd,
            namespaces=namespaces, cgroup_procs=cg.procs_files(), rootfs=None,
            mount_proc=False, mount_sys=False, mount_dev=False)
        return spec, rec

    def exec(self, cmd: list[str], tty: bool = False, stdin: bool = False) -> ExecProcess:
        """Start ``cmd`` in the running container and return it with its stdio fds
        (a pty master when ``tty``). The caller reads, writes, waits and closes."""
        ours: list[int] = []
        theirs: list[int] = []
        try:
            if tty:
                master, slave = _pty_in(self._read().get("pid", 0))
                ours.append(master)
                theirs.append(slave)
                spec, rec = self._exec_spec(cmd, -1, -1, -1, slave)
                proc = ExecProcess(-1, -1, -1, -1, master)
            else:
                in_r = in_w = -1
                if stdin:
                    in_r, in_w = os.pipe()
                    ours.append(in_w)
                    theirs.append(in_r)
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                ours += [out_r, err_r]
                theirs += [out_w, err_w]
                spec, rec = self._exec_spec(cmd, in_r, out_w, err_w, -1)
                proc = ExecProcess(-1, in_w, out_r, err_r, -1)
            if not _alive(rec["pid"], rec["pid_start_time"]):
                raise InvalidStateError(f"container {self.id[:12]} is not running")
            try:
                child = _native.spawn(spec)
            except OSError as e:
                raise RuntimeFailure(f"exec {cmd[0]!r}: {e.strerror or e}",
                                     stage=getattr(e, "stage", ""), errno=e.errno or 0) from e
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        if child.pidfd >= 0:
            os.close(child.pidfd)
        proc.pid = child.pid
        return proc

    def exec_sync(self, cmd: list[str], timeout: float | None = None,
                  output_limit: int = EXEC_OUTPUT_LIMIT) -> ExecResult:
        """Run ``cmd`` in the running container and collect its output; each stream
        is capped at ``output_limit`` bytes (the rest is read and dropped)."""
        proc = self.exec(cmd)
        try:
            out, err, timed_out = _collect(proc.pid, proc.stdout, proc.stderr, timeout,
                                           output_limit)
        finally:
            proc.close()
        code = proc.wait()
        return ExecResult(code, out, err, timed_out)

    def attach(self) -> Any:
        """A socket attached to the container's monitor (frames per pycri._native.ATTACH_*)."""
        import socket

        rec = self.record()
        if rec["state"] != RUNNING:
            raise InvalidStateError(f"container {self.id[:12]} is {rec['state']}, not running")
        # Right after start the process runs, but its launcher may not have become
        # the monitor (which listens on the socket) yet: give it a moment.
        deadline = time.monotonic() + ATTACH_WAIT_S
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self._sock("attach"))
                return s
            except OSError as e:
                s.close()
                if (e.errno not in (errno.ENOENT, errno.ECONNREFUSED)
                        or time.monotonic() > deadline or self.record()["state"] != RUNNING):
                    raise RuntimeFailure(f"attach: {e.strerror}", stage="attach") from e
            time.sleep(0.002)

    def logs(self) -> list[logs.LogRecord]:
        """The parsed CRI log records written so far."""
        return logs.read_log(self.log_path)

    def stats(self) -> ContainerStats:
        rec = self._read()
        cg = self._cgroup(rec)
        st = cg.stats()
        used = inodes = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(self.record_dir, "fs", "upper")):
            for n in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    used += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
                    inodes += 1
        return ContainerStats(st.cpu_usage_ns, st.memory_usage_bytes, st.memory_working_set_bytes,
                              st.pids_current, used, inodes, time.time_ns())

    def update_resources(self, resources: Any) -> None:
        """Change cgroup limits while running; all or nothing."""
        with self._lock():
            rec = self._read()
            cg = self._cgroup(rec)
            cg.update(resources)
            cfg = dict(rec["config"])
            cfg["resources"] = to_json(resources)
            rec["config"] = cfg
            self._write(rec)


# -- helpers -------------------------------------------------------------------------


def _image_dir_exists(layer_dirs: list[str], path: str) -> bool:
    """Is ``path`` a directory in some layer (checked without following links)?"""
    import stat as _stat

    for d in layer_dirs:
        cur = d
        for part in [p for p in path.split("/") if p]:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                break
            if not _stat.S_ISDIR(st.st_mode):
                break
        else:
            return True
    return False


ATTACH_WAIT_S = 2.0     # how long attach waits for a just-started container's monitor


def _stop_signal(runtime: Runtime, rec: dict[str, Any]) -> int:
    name = ""
    with contextlib.suppress(PycriError):
        name = runtime.images.get(rec["image_id"]).config.stop_signal
    if not name:
        return signal.SIGTERM
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return signal.SIGTERM


def run_to_completion(container: Container, timeout: float | None) -> RunResult:
    """Start, wait (killing at ``timeout``), and collect the output of a container."""
    container.start()
    timed_out = False
    try:
        container.wait(timeout)
    except TimeoutError:
        timed_out = True
        container.stop(timeout=0)
    st = container.status()
    out = bytearray()
    err = bytearray()
    for r in container.logs():
        target = out if r.stream == "stdout" else err
        target += r.content
        if not r.partial:
            target += b"\n"
    return RunResult(st.exit_code, bytes(out), bytes(err), st.reason == "OOMKilled", timed_out)



def _nothing_runs_in(cg: Any) -> bool:
    """True if the cgroup holds no process (or is gone); a process that could still
    be in it makes this False."""
    try:
        return not cg.has_processes()
    except FileNotFoundError:
        return True
    except OSError:
        return False


def recover(runtime: Runtime) -> None:
    """After a crash or reboot: settle containers whose processes are gone."""
    for c in runtime.containers():
        with contextlib.suppress(NotFoundError, PycriError, OSError, KeyError):
            with c._lock():
                rec = c._read()
                if rec["state"] == RUNNING and c._refresh(rec):
                    c._write(rec)
                elif rec["state"] == CREATED and "pid" not in rec:
                    # the creator died before it recorded the process: nothing to keep
                    # (the cgroup kill takes a held container process with it)
                    c._destroy(rec)
                elif rec["state"] == CREATED and c._started_unrecorded(rec):
                    rec.update(state=RUNNING, started_at_ns=time.time_ns())
                    c._write(rec)
                elif rec["state"] == CREATED and not _alive(rec.get("monitor_pid", 0), 0):
                    rec.update(state=EXITED, exit_code=255, reason="Unknown",
                               message="its launcher is gone (machine restarted?)",
                               finished_at_ns=time.time_ns())
                    c._write(rec)
