"""What a container's processes get: capabilities, seccomp, resource limits, and
what privileged mode changes. Policy only; container.py turns it into a spawn spec.

Privileged (``ContainerConfig.privileged``, as the CRI defines it): every
capability the host's bounding set holds, no seccomp filter, no masked or
read-only paths, /sys read-write, every char and block device node of the host's
/dev, and a devices cgroup that allows all ("a *:* rwm"). It needs a privileged
sandbox (containerd and CRI-O refuse it otherwise, as pycri does) and no user
namespace (Kubernetes refuses that pairing too).

Resource limits: a container gets ``RLIMIT_NOFILE`` 1048576 (soft and hard, the
figure CRI-O and Podman give), lowered to pycri's own hard limit when that is
smaller and pycri lacks ``CAP_SYS_RESOURCE`` to raise it; every other limit is
inherited from the process that creates the container. ``ContainerConfig.rlimits``
replaces these per name. Exec'd processes get the same limits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
from collections.abc import Mapping
from typing import Any

from pycri import users
from pycri.cgroup import DeviceRule, Resources
from pycri.config import RLIM_UNLIMITED, RLIMITS, ContainerConfig, validate_sysctls
from pycri.errors import InvalidArgumentError

CAPS = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# The usual default set of container runtimes.
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                "AUDIT_WRITE")
DEFAULT_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                  "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                  "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                  "/sys/devices/virtual/powercap")
DEFAULT_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEFAULT_NOFILE = 1048576
_CAP_SYS_RESOURCE = 24


def _status_mask(field: str) -> int | None:
    fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    at = data.find(b"\n" + field.encode() + b":")
    if at < 0:
        return None
    return int(data[at + len(field) + 2:data.index(b"\n", at + 1)], 16)


@functools.cache
def _host_bounding() -> int:
    # (read once: this process's bounding set only ever shrinks, and pycri never
    # shrinks it)
    mask = _status_mask("CapBnd")
    return (1 << len(CAPS)) - 1 if mask is None else mask


def cap_mask(names: tuple[str, ...] | list[str]) -> int:
    mask = 0
    for n in names:
        n = n.upper().removeprefix("CAP_")
        if n == "ALL":
            mask |= (1 << len(CAPS)) - 1
            continue
        if n not in CAPS:
            raise InvalidArgumentError(f"unknown capability {n!r}")
        mask |= 1 << CAPS.index(n)
    return mask


@functools.cache
def _default_mask() -> int:
    return cap_mask(DEFAULT_CAPS)


def capabilities(config: ContainerConfig) -> int:
    """The capability set of the container process (bounding, effective, permitted)."""
    if config.privileged:
        caps = (1 << len(CAPS)) - 1
    else:
        caps = _default_mask()
        drop = [c.upper().removeprefix("CAP_") for c in config.cap_drop]
        if "ALL" in drop:
            caps = 0
        caps |= cap_mask(config.cap_add)
        caps &= ~cap_mask([c for c in drop if c != "ALL"])
    return caps & _host_bounding()


def seccomp_for(config: ContainerConfig, caps: int) -> bytes | None:
    """The seccomp program of a container's processes (none when privileged)."""
    if config.privileged:
        return None
    from pycri import seccomp

    return seccomp.profile_bpf(config.seccomp, caps)


def masked_and_readonly(config: ContainerConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The masked and read-only paths: the defaults unless given; none when privileged."""
    if config.privileged:
        return (), ()
    masked = DEFAULT_MASKED if config.masked_paths is None else config.masked_paths
    readonly = DEFAULT_READONLY if config.readonly_paths is None else config.readonly_paths
    return tuple(masked), tuple(readonly)


def cgroup_resources(config: ContainerConfig) -> Resources:
    """The resources the container cgroup is made with: a privileged container may
    use every device (v1 devices cgroup: "a *:* rwm")."""
    if not config.privileged:
        return config.resources
    return dataclasses.replace(config.resources,
                               devices=(*config.resources.devices, DeviceRule(True, "a")))


# --- resource limits ----------------------------------------------------------------


def _rlimit_number(name: str) -> int:
    key = name.removeprefix("RLIMIT_")
    return int(getattr(resource, "RLIMIT_" + key, RLIMITS[key]))


@functools.cache
def _can_raise_hard_limits() -> bool:
    """CAP_SYS_RESOURCE in this process's effective set (the launcher inherits it)."""
    eff = _status_mask("CapEff")
    return bool(eff and eff >> _CAP_SYS_RESOURCE & 1)


@functools.cache
def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_NOFILE


def _ceiling(number: int) -> int:
    """The highest hard limit this process can hand out for resource ``number``
    (-1: unlimited)."""
    if _can_raise_hard_limits():
        return _nr_open() if number == resource.RLIMIT_NOFILE else RLIM_UNLIMITED
    hard = resource.getrlimit(number)[1]
    return RLIM_UNLIMITED if hard == resource.RLIM_INFINITY else hard


def _above(v: int, ceiling: int) -> bool:
    if ceiling == RLIM_UNLIMITED:
        return False
    return v == RLIM_UNLIMITED or v > ceiling


def default_rlimits() -> dict[str, tuple[int, int]]:
    """What a container gets without ContainerConfig.rlimits (see the module doc)."""
    ceiling = _ceiling(resource.RLIMIT_NOFILE)
    nofile = DEFAULT_NOFILE if not _above(DEFAULT_NOFILE, ceiling) else ceiling
    return {"RLIMIT_NOFILE": (nofile, nofile)}


def rlimits_for(config: ContainerConfig) -> list[tuple[int, int, int]]:
    """(resource number, soft, hard) for the spawn spec; a hard limit above what this
    process may grant is refused here, before anything is created."""
    merged: dict[str, tuple[int, int]] = {**default_rlimits(), **config.rlimits}
    out = []
    for name, (soft, hard) in merged.items():
        number = _rlimit_number(name)
        ceiling = _ceiling(number)
        if name in config.rlimits and _above(hard, ceiling):
            shown = "unlimited" if hard == RLIM_UNLIMITED else hard
            why = ("fs.nr_open" if _can_raise_hard_limits()
                   else "pycri's own hard limit; raising it needs CAP_SYS_RESOURCE")
            raise InvalidArgumentError(
                f"rlimit {name}: hard limit {shown} is above {ceiling} ({why})")
        out.append((number, soft, hard))
    return out


# --- checks against the pod -----------------------------------------------------------


def check_in_sandbox(config: ContainerConfig, sandbox_config: Mapping[str, Any]) -> None:
    """What the container asks for that its pod does not allow; raised before anything
    of the container exists."""
    userns = sandbox_config.get("user_namespace")
    if config.privileged:
        if not sandbox_config.get("privileged"):
            raise InvalidArgumentError(
                f"container {config.name!r} is privileged but its sandbox is not: no "
                "privileged container allowed in a non-privileged sandbox (set "
                "SandboxConfig.privileged)")
        if userns:
            raise InvalidArgumentError(
                f"container {config.name!r}: a privileged container cannot run in a pod "
                "with a user namespace")
    if config.sysctls:
        validate_sysctls(config.sysctls, sandbox_config.get("network", ""),
                         sandbox_config.get("ipc", ""))
        if userns:
            raise InvalidArgumentError(
                f"container {config.name!r}: sysctls cannot be set from inside a user "
                "namespace on namespaces the pod owns; set them on the pod "
                "(SandboxConfig.sysctls)")


__all__ = ["CAPS", "DEFAULT_CAPS", "DEFAULT_MASKED", "DEFAULT_NOFILE", "DEFAULT_READONLY",
           "cap_mask", "capabilities", "cgroup_resources", "check_in_sandbox",
           "default_rlimits", "masked_and_readonly", "rlimits_for", "seccomp_for"]


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _groups(user: users.User) -> list[int]:
    """The process's group list: its primary group first, then the others."""
    return [user.gid] + [g for g in user.groups if g != user.gid]


def _argv(config: ContainerConfig, entrypoint: tuple[str, ...], cmd: tuple[str, ...]) -> list[str]:
    """CRI rules: command replaces the entrypoint, args replace the image's cmd."""
    if config.command:
        argv = list(config.command) + list(config.args)
    else:
        argv = list(entrypoint) + list(config.args or cmd)
    if not argv:
        raise InvalidArgumentError("no command: the config and the image give none")
    return argv


def _env(image_env: tuple[str, ...], env: tuple[tuple[str, str], ...], user: users.User) -> list[str]:
    merged: dict[str, str] = {}
    for e in image_env:
        k, _, v = e.partition("=")
        merged[k] = v
    for k, v in env:
        merged[k] = v
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", user.home or "/")
    return [f"{k}={v}" for k, v in merged.items()]
