"""What a container create hands the C core: its spawn spec and its monitor's
command line and fds, worked out from the container's config, its image and
its pod (Container._launch_in launches it).

Also the few things that must exist before the launch: the log file, the
container's cgroup with its limits, its image volumes, and (in a user-namespaced
pod) the writable layer's owner. Nothing here starts a process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycri import _native, users
from pycri.config import NODE, POD, ContainerConfig
from pycri.errors import InvalidArgumentError, InvalidStateError
from pycri.process import (
    _argv,
    _env,
    _groups,
    capabilities,
    cgroup_resources,
    masked_and_readonly,
    rlimits_for,
    seccomp_for,
)

if TYPE_CHECKING:
    from pycri.container import Container
    from pycri.image import Image
    from pycri.sandbox import Sandbox
    from pycri.slots import Slot


@dataclass
class LaunchPlan:
    spec: _native.SpawnSpec
    monitor: list[str]                    # the monitor's argv (launch adds --adopt)
    monitor_fds: list[int]                # ours, for the monitor: sent, then closed here
    child_fds: list[int]                  # ours, for the container: sent, then closed here
    done_r: int                           # read end of the monitor's done pipe: kept
    layer_dirs: list[str] = field(default_factory=list)

    def close_passed(self) -> None:
        """Close this process's copies of what the launch passed on."""
        for fd in self.monitor_fds + self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def plan(ctr: Container, rec: dict[str, Any], sandbox: Sandbox, sb_rec: dict[str, Any],
         image: Image, config: ContainerConfig, slot: Slot | None) -> LaunchPlan:
    """The launch of ``ctr`` (its record ``rec`` gets the user, and the cgroup and
    image volumes are made). On failure every fd made here is closed."""
    rt = ctr.runtime
    layer_dirs = rt.images.layer_dirs(image)
    icfg = image.config
    # The writable layer and the rootfs mount point. In a user namespace the host's
    # root reaches them for the container (csrc/userns.c): no mode here has to let
    # the mapped root through. (Made with the record dir: slots.make_record_dir.)
    fs = os.path.join(ctr.record_dir, "fs")
    upper, work, rootfs = (os.path.join(fs, d) for d in ("upper", "work", "rootfs"))
    if os.path.dirname(rec["log_path"]) != ctr.record_dir:
        os.makedirs(os.path.dirname(rec["log_path"]), exist_ok=True)
    # The monitor opens the log only once started; the file exists from create on, so
    # a reader right after start (CRI clients do) finds it.
    os.close(os.open(rec["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o640))

    argv = _argv(config, icfg.entrypoint, icfg.cmd)
    user = users.resolve(layer_dirs, icfg.user, config.run_as_user, config.run_as_username,
                         config.run_as_group, config.supplemental_groups,
                         strict=config.supplemental_groups_policy == "Strict")
    rec["user"] = {"uid": user.uid, "gid": user.gid, "groups": _groups(user)}
    env = _env(icfg.env, config.env, user)
    sb_cfg = sb_rec["config"]
    userns = sb_cfg.get("user_namespace")
    caps = capabilities(config)

    cgm = rt.cgroups(rec["cgroup_parent"])
    cg = (cgm.configure_container if slot else cgm.create_container)(
        sandbox.id, ctr.id, cgroup_resources(config))
    rec["oom_kills_at_start"] = 0     # a new cgroup
    namespaces = _namespaces(sandbox, sb_rec, config)
    idmaps: list[str] = ["none"] * len(config.mounts)
    if userns:
        namespaces["user"] = _userns_join(sandbox, sb_cfg, config, user)
        u, g = userns["uids"][0], userns["gids"][0]
        # The image layers are id-mapped to the pod's user namespace (csrc/userns.c);
        # the writable layer is plain and owned by the mapped root, so what the
        # container writes is stored on the host under the mapped ids.
        for d in (upper, work, rootfs):
            os.chown(d, u["host_id"], g["host_id"])
        idmaps = [_bind_idmap(m, userns) for m in config.mounts]
    elif any(m.uid_mappings for m in config.mounts):
        raise InvalidArgumentError("a mount with id mappings needs a pod with a user namespace")

    binds = []
    for i, m in enumerate(config.mounts):
        source = ctr._image_volume(rec, i, m) if m.image else m.host_path
        binds.append(_native.BindMount(source, m.container_path, readonly=m.readonly,
                                       recursive_readonly=m.recursive_readonly,
                                       propagation=m.propagation, idmap=idmaps[i]))
    if "image_volumes" in rec:
        # image GC must see the volume images' layers as in use from now on
        ctr._write(rec)
    seccomp = seccomp_for(config, caps)
    setup = _setup_fields(sandbox, sb_rec, config, ctr.record_dir, layer_dirs,
                          cg, namespaces, binds)

    monitor_fds: list[int] = []
    child_fds: list[int] = []
    done_r = -1
    try:
        mon_kw: dict[str, Any] = {}
        stdin_fd = stdout_fd = stderr_fd = -1
        if config.tty:
            # the pty comes from the container's own devpts (tty_new): the child makes
            # it and the launcher hands the master to the monitor (--pty-master-fd)
            mon_kw.update(tty=True)
        else:
            out_r, out_w = os.pipe()
            monitor_fds.append(out_r)
            child_fds.append(out_w)
            err_r, err_w = os.pipe()
            monitor_fds.append(err_r)
            child_fds.append(err_w)
            stdout_fd, stderr_fd = out_w, err_w
            mon_kw.update(stdout_fd=out_r, stderr_fd=err_r)
            if config.stdin:
                in_r, in_w = os.pipe()
                monitor_fds.append(in_w)
                child_fds.append(in_r)
                stdin_fd = in_r
                mon_kw.update(stdin_fd=in_w)
        if config.stdin:
            mon_kw["stdin"] = True
        # the monitor closes done_w once the exit is on disk: this process's wait
        # wakes on that instead of polling for the exit file
        done_r, done_w = os.pipe()
        monitor_fds.append(done_w)
        mon_kw["done_fd"] = done_w
        spec = _native.SpawnSpec(
            argv=argv, env=env, cwd=config.working_dir or icfg.working_dir or "/",
            uid=user.uid, gid=user.gid, groups=_groups(user),
            cap_bounding=caps, cap_effective=caps, cap_permitted=caps,
            no_new_privs=config.no_new_privs or bool(seccomp and user.uid != 0),
            seccomp_bpf=seccomp,
            oom_score_adj=config.oom_score_adj if config.oom_score_adj > 0 else None,
            stdin=stdin_fd, stdout=stdout_fd, stderr=stderr_fd, tty_new=config.tty,
            rlimits=rlimits_for(config), rootfs_readonly=config.readonly_rootfs,
            rootfs_mount_fd=slot.rootfs_fd if slot else -1,
            dev_mount_fd=slot.dev_fd if slot else -1,
            start_wait=True, **setup,
        )
        monitor = _native.monitor_command(
            ctr._exit_file, rec["log_path"], for_launch=True,
            attach_socket=ctr._sock("attach"), oom_file=cg.oom_kill_file(), **mon_kw)
    except BaseException:
        for fd in [*monitor_fds, *child_fds, done_r]:
            if fd >= 0:
                os.close(fd)
        raise
    return LaunchPlan(spec, monitor, monitor_fds, child_fds, done_r, layer_dirs)


# The SpawnSpec fields the setup of a container process reads: its namespaces,
# cgroups and mounts, the sysctls (written once /proc is mounted) and pivot_root;
# everything csrc/ does before a pre-clone pauses (pause_after_setup). A create
# resumes a pre-clone only when its own spec has the same values for all of them
# (setup_key); the rest of the spec (the process: argv, env, user, capabilities,
# seccomp, rlimits, stdio...) comes with the resume.
SETUP_FIELDS = (
    "namespaces", "join_pidfd", "uid_map", "gid_map", "cgroup_procs", "cgroup_late", "rootfs",
    "overlay_lower", "overlay_upper", "overlay_work", "root_propagation", "mount_proc",
    "mount_sys", "sys_writable", "mount_dev", "host_devices", "shm_path", "shm_size",
    "etc_hostname", "etc_hosts", "etc_resolv", "binds", "masked_paths", "readonly_paths",
    "sysctls", "parent_death_signal",
)


def _setup_fields(sandbox: Sandbox, sb_rec: dict[str, Any], config: ContainerConfig,
                  record_dir: str, layer_dirs: list[str], cg: Any,
                  namespaces: dict[str, str], binds: list[_native.BindMount]) -> dict[str, Any]:
    """The setup part of a container's spec (the SETUP_FIELDS that are not left at
    their defaults), for a create and for a pre-clone alike."""
    cgroup_procs, late = cg.procs_files_accounting_last()
    fs = os.path.join(record_dir, "fs")
    upper, work, rootfs = (os.path.join(fs, d) for d in ("upper", "work", "rootfs"))
    masked, readonly = masked_and_readonly(config)
    files = sandbox.container_files(sb_rec)
    return {
        "namespaces": namespaces, "cgroup_procs": cgroup_procs,
        "cgroup_late": late, "rootfs": rootfs,
        "overlay_lower": [*layer_dirs, sandbox.runtime.mount_points],
        "overlay_upper": upper, "overlay_work": work,
        "mount_sys": True, "sys_writable": config.privileged,
        "host_devices": config.privileged, "shm_path": files["shm_path"],
        "etc_hostname": files["etc_hostname"], "etc_hosts": files["etc_hosts"],
        "etc_resolv": files["etc_resolv"], "binds": binds, "masked_paths": list(masked),
        "readonly_paths": list(readonly), "root_propagation": _root_propagation(config.mounts),
        "sysctls": dict(config.sysctls),
    }


def setup_key(spec: _native.SpawnSpec, record_dir: str) -> tuple[Any, ...]:
    """What a spec's setup is, with paths in the record dir made relative to it (a
    slot's dir is renamed when a create takes it)."""
    prefix = record_dir.rstrip("/") + "/"
    out: list[Any] = []
    for name in SETUP_FIELDS:
        v = getattr(spec, name)
        if isinstance(v, str) and v.startswith(prefix):
            v = "<record>/" + v[len(prefix):]
        out.append(v)
    return tuple(out)


def standin(runtime: Any, sandbox: Sandbox, sb_rec: dict[str, Any], config: ContainerConfig,
            slot: Slot, layer_dirs: list[str]) -> _native.SpawnSpec | None:
    """The spec a pre-clone in ``slot`` is set up with: the setup a create with
    ``config`` would have (its process part is a placeholder), or None where a
    held process would be in the way or the setup needs the config's own work: a
    user namespace, bind mounts (image volumes), or a pid namespace shared with
    the pod or the host (it would show there)."""
    if sb_rec["config"].get("user_namespace") or config.mounts or slot.rootfs_fd < 0:
        return None
    namespaces = _namespaces(sandbox, sb_rec, config)
    if namespaces["pid"] != "new":
        return None
    cg = runtime.cgroups(slot.cgroup_parent).container(slot.pod_id, slot.id)
    if cg.accounting_in_v2:
        return None
    setup = _setup_fields(sandbox, sb_rec, config, slot.dir, layer_dirs, cg, namespaces, [])
    return _native.SpawnSpec(argv=["/"], rootfs_mount_fd=slot.rootfs_fd,
                             dev_mount_fd=slot.dev_fd, start_wait=True, **setup)


def _namespaces(sandbox: Sandbox, sb_rec: dict[str, Any],
                config: ContainerConfig) -> dict[str, str]:
    """Each namespace of the container: its own (mount, and pid unless shared), the
    pod's pinned ones, or the host's."""
    namespaces: dict[str, str] = {"mnt": "new", "cgroup": "host"}
    for kind in ("net", "ipc", "uts"):
        namespaces[kind] = sandbox.ns_path(kind) if sb_rec.get(f"{kind}ns") else "host"
    pid_mode = config.pid or sb_rec["config"].get("pid", "container")
    namespaces["pid"] = "host" if pid_mode == NODE else "new"
    if pid_mode == POD:
        shared = sandbox.pid_namespace(sb_rec)
        if shared is None:
            raise InvalidArgumentError(
                "the container wants the pod's pid namespace but the pod was created "
                "without one (SandboxConfig.pid)")
        namespaces["pid"] = shared
    return namespaces


def _userns_join(sandbox: Sandbox, sb_cfg: dict[str, Any], config: ContainerConfig,
                 user: users.User) -> str:
    """The pod's pinned user namespace for a new container, after checking that the
    container's ids exist in it."""
    path = sandbox.user_namespace()
    if path is None:
        raise InvalidStateError(
            f"sandbox {sandbox.id[:12]} has a user namespace in its config but none pinned "
            "(made by an older pycri?): recreate the pod")
    userns = sb_cfg["user_namespace"]
    users.check_mapped(user, userns["uids"][0]["length"], userns["gids"][0]["length"])
    if any(m.propagation == "rshared" for m in config.mounts):
        raise InvalidArgumentError(
            "rshared (bidirectional) mount propagation cannot reach the host from a pod with a "
            "user namespace")
    return path


def _bind_idmap(m: Any, userns: dict[str, Any]) -> str:
    """How a bind into a user-namespace pod is id-mapped: as the mount asks (its
    mappings must be the pod's), else wherever the source's filesystem allows it."""
    if not m.uid_mappings:
        return "auto"
    for kind, maps in (("uid", m.uid_mappings), ("gid", m.gid_mappings)):
        pod = userns[f"{kind}s"][0]
        mine = maps[0]
        if (mine.container_id, mine.host_id, mine.length) != \
                (pod["container_id"], pod["host_id"], pod["length"]):
            raise InvalidArgumentError(
                f"mount {m.container_path}: its {kind} mapping {mine.container_id}:"
                f"{mine.host_id}:{mine.length} differs from the pod's user namespace "
                f"({pod['container_id']}:{pod['host_id']}:{pod['length']})")
    return "require"


def _root_propagation(mounts: tuple[Any, ...]) -> str:
    """The container's "/" must pass host mounts on for an rslave bind (and both ways
    for rshared); otherwise it stays private."""
    props = {m.propagation for m in mounts}
    return "rshared" if "rshared" in props else ("rslave" if "rslave" in props else "private")
