"""Seccomp profiles (the OCI ``linux.seccomp`` shape) compiled to BPF.

The compiled program is the ``struct sock_filter[]`` bytes that
``SpawnSpec.seccomp_bpf`` takes; the child loads it with
SECCOMP_SET_MODE_FILTER. Compilation uses the system's libseccomp (libseccomp2,
present wherever runc or systemd is) through ctypes, loaded on first use.

Profile fields understood: defaultAction, defaultErrnoRet, architectures,
syscalls[].names / action / errnoRet / args[] (index, value, valueTwo, op).
Syscall names this kernel/libseccomp does not know are skipped, as the OCI
runtimes do; a rule whose action equals the default is redundant and skipped.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
_OPS = {
    "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
}
_ARCHES = {
    "SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X86": "x86", "SCMP_ARCH_X32": "x32",
    "SCMP_ARCH_AARCH64": "aarch64", "SCMP_ARCH_ARM": "arm", "SCMP_ARCH_PPC64LE": "ppc64le",
    "SCMP_ARCH_S390X": "s390x", "SCMP_ARCH_RISCV64": "riscv64",
}


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_lib: Any = None


def _libseccomp() -> Any:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def _action(name: str, errno_ret: int | None) -> int:
    try:
        base = _ACTIONS[name]
    except KeyError:
        raise ValueError(f"unsupported seccomp action {name!r}") from None
    if name == "SCMP_ACT_ERRNO":
        return base | ((_errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    if name == "SCMP_ACT_TRACE":
        return base | ((_errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF)
    return base


def compile_profile(profile: Mapping[str, Any]) -> bytes:
    """Compile an OCI-shaped seccomp profile to BPF bytes (8 per instruction)."""
    lib = _libseccomp()
    default = _action(profile.get("defaultAction", "SCMP_ACT_ALLOW"),
                      profile.get("defaultErrnoRet"))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError(ctypes.get_errno(), "seccomp_init failed")
    try:
        for arch in profile.get("architectures") or ():
            token = lib.seccomp_arch_resolve_name(_ARCHES.get(arch, arch).encode())
            if token == 0:
                raise ValueError(f"unknown seccomp architecture {arch!r}")
            rc = lib.seccomp_arch_add(ctx, token)
            if rc < 0 and rc != -_errno.EEXIST:
                raise OSError(-rc, f"seccomp_arch_add {arch}")
        for rule in profile.get("syscalls") or ():
            action = _action(rule["action"], rule.get("errnoRet"))
            if action == default:
                continue
            args: Sequence[Mapping[str, Any]] = rule.get("args") or ()
            cmps = (_ArgCmp * max(1, len(args)))()
            for i, a in enumerate(args):
                cmps[i] = _ArgCmp(a["index"], _OPS[a["op"]], a.get("value", 0),
                                  a.get("valueTwo", 0))
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:
                    continue  # unknown here: skipped, as OCI runtimes do
                rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmps)
                if rc < 0:
                    raise OSError(-rc, f"seccomp rule for {name}")
        with tempfile.TemporaryFile() as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
            if rc < 0:
                raise OSError(-rc, "seccomp_export_bpf")
            f.seek(0)
            prog = f.read()
    finally:
        lib.seccomp_release(ctx)
    if not prog or len(prog) % 8:
        raise OSError(_errno.EINVAL, "seccomp_export_bpf gave no program")
    return prog


def errno_for(names: Sequence[str], err: int = _errno.EPERM) -> bytes:
    """A program that allows everything except names, which fail with err."""
    return compile_profile({"defaultAction": "SCMP_ACT_ALLOW",
                            "syscalls": [{"names": list(names), "action": "SCMP_ACT_ERRNO",
                                          "errnoRet": err}]})


__all__ = ["compile_profile", "errno_for"]



# --- CRI profiles: RuntimeDefault, Unconfined, or a profile file ----------------

# RuntimeDefault is a deny list: it refuses the calls that reach kernel-wide
# state or widen a container's view (module loading, kexec, reboot, clock
# setting, keyrings, bpf, perf, userfaultfd, io_uring, the new mount API, and
# namespace/mount calls unless the container holds CAP_SYS_ADMIN, cross-process
# memory access unless it holds CAP_SYS_PTRACE). libseccomp adds the native
# architecture check, so other ABIs are killed.
_DENY = ("acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
         "delete_module", "finit_module", "get_kernel_syms", "init_module", "ioperm", "iopl",
         "kexec_file_load", "kexec_load", "keyctl", "move_pages", "nfsservctl",
         "open_by_handle_at", "query_module", "reboot", "request_key", "settimeofday", "stime",
         "swapon", "swapoff", "sysfs", "_sysctl", "uselib", "userfaultfd", "ustat",
         "io_uring_setup", "io_uring_enter", "io_uring_register", "afs_syscall", "tuxcall",
         "vserver", "syslog", "name_to_handle_at")
_NEEDS_SYS_ADMIN = ("mount", "umount", "umount2", "unshare", "setns", "pivot_root", "fsopen",
                    "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
                    "quotactl", "lookup_dcookie", "perf_event_open")
_NEEDS_SYS_PTRACE = ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp")
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYSLOG = 34
MAX_PROFILE = 4 << 20


def runtime_default(caps: int) -> bytes:
    """The RuntimeDefault program for a container holding capability mask ``caps``."""
    return _runtime_default(bool(caps & (1 << CAP_SYSLOG)), bool(caps & (1 << CAP_SYS_ADMIN)),
                            bool(caps & (1 << CAP_SYS_PTRACE)))


@functools.lru_cache(maxsize=8)
def _runtime_default(syslog: bool, sys_admin: bool, sys_ptrace: bool) -> bytes:
    # Only these three capabilities change the program, and compiling it with
    # libseccomp takes a third of a millisecond: once per combination is enough.
    denied = [n for n in _DENY if not (n == "syslog" and syslog)]
    if not sys_admin:
        denied += _NEEDS_SYS_ADMIN
    if not sys_ptrace:
        denied += _NEEDS_SYS_PTRACE
    return errno_for(denied)


def profile_bpf(profile: str, caps: int = 0) -> bytes | None:
    """BPF for a CRI seccomp setting: "RuntimeDefault", "Unconfined", or the path of
    an OCI/Docker JSON profile (optionally written "localhost/<path>")."""
    import json

    from pycri.errors import InvalidArgumentError

    if profile in ("", "Unconfined", "unconfined"):
        return None
    if profile in ("RuntimeDefault", "runtime/default", "docker/default"):
        return runtime_default(caps)
    path = profile.removeprefix("localhost/")
    if not path.startswith("/"):
        raise InvalidArgumentError(f"seccomp profile {profile!r}: give an absolute file path")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE + 1)
    except OSError as e:
        raise InvalidArgumentError(f"seccomp profile {path}: {e.strerror}") from None
    if len(data) > MAX_PROFILE:
        raise InvalidArgumentError(f"seccomp profile {path} is over {MAX_PROFILE} bytes")
    try:
        prof = json.loads(data)
        if not isinstance(prof, dict):
            raise ValueError("not an object")
        return compile_profile(prof)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise InvalidArgumentError(f"seccomp profile {path}: {e}") from None
