"""Seccomp profiles compiled to classic BPF for the spawner.

``RuntimeDefault`` here is a deny list: it returns EPERM for the system calls
that reach kernel-wide state or widen a container's view (module loading,
kexec, reboot, clock setting, keyrings, bpf, perf, userfaultfd, io_uring, the
new mount API, namespace and mount calls unless the container has
CAP_SYS_ADMIN, ptrace of other processes' memory without CAP_SYS_PTRACE), and
everything outside the native ABI (x32, a foreign architecture) fails too.
A profile file in the OCI/Docker JSON format is also accepted, for the common
subset: ``defaultAction`` and ``syscalls`` entries with ``names`` and ``action``
(no argument filters), with names taken from the kernel headers.
"""

from __future__ import annotations

import errno
import json
import platform
import re
import struct

from pycri.errors import InvalidArgumentError, UnsupportedError

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
RET_LOG = 0x7FFC0000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06

# x86_64 numbers of the calls the default profile refuses (kernel ABI facts).
_X86_64 = {
    "acct": 163, "add_key": 248, "bpf": 321, "clock_adjtime": 305, "clock_settime": 227,
    "create_module": 174, "delete_module": 176, "finit_module": 313, "get_kernel_syms": 177,
    "init_module": 175, "ioperm": 173, "iopl": 172, "kcmp": 312, "kexec_file_load": 320,
    "kexec_load": 246, "keyctl": 250, "lookup_dcookie": 212, "mount": 165, "move_pages": 279,
    "name_to_handle_at": 303, "nfsservctl": 180, "open_by_handle_at": 304,
    "perf_event_open": 298, "pivot_root": 155, "process_vm_readv": 310,
    "process_vm_writev": 311, "ptrace": 101, "query_module": 178, "quotactl": 179,
    "reboot": 169, "request_key": 249, "setns": 308, "settimeofday": 164, "swapon": 167,
    "swapoff": 168, "sysfs": 139, "_sysctl": 156, "umount2": 166, "unshare": 272,
    "uselib": 134, "userfaultfd": 323, "ustat": 136, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "mount_setattr": 442, "afs_syscall": 183, "tuxcall": 184, "vserver": 236, "syslog": 103,
}
# Allowed again when the container holds the capability that governs them.
_WITH_SYS_ADMIN = {"mount", "umount2", "unshare", "setns", "pivot_root", "fsopen", "fsconfig",
                   "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "quotactl",
                   "lookup_dcookie", "perf_event_open"}
_WITH_SYS_PTRACE = {"ptrace", "process_vm_readv", "process_vm_writev", "kcmp"}
CAP_SYS_ADMIN = 21
CAP_SYS_PTRACE = 19
CAP_SYSLOG = 34
MAX_PROFILE = 4 << 20


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _check_arch() -> None:
    if platform.machine() not in ("x86_64", "amd64"):
        raise UnsupportedError(f"seccomp profiles are built for x86_64 only, not {platform.machine()}")


def compile_filter(numbers: dict[int, int], default: int) -> bytes:
    """BPF: kill a foreign arch, refuse x32, then per-syscall actions, else ``default``."""
    _check_arch()
    prog = [
        _ins(_LD_W_ABS, 0, 0, 4),                        # A = arch
        _ins(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _ins(_RET_K, 0, 0, RET_KILL_PROCESS),
        _ins(_LD_W_ABS, 0, 0, 0),                        # A = syscall number
        _ins(_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _ins(_RET_K, 0, 0, RET_ERRNO | errno.EPERM),
    ]
    for nr, action in sorted(numbers.items()):
        prog.append(_ins(_JEQ_K, 0, 1, nr))
        prog.append(_ins(_RET_K, 0, 0, action))
    prog.append(_ins(_RET_K, 0, 0, default))
    if len(prog) > 4096:
        raise InvalidArgumentError("seccomp profile is too large")
    return b"".join(prog)


def runtime_default(caps: int) -> bytes:
    denied = set(_X86_64)
    if caps & (1 << CAP_SYS_ADMIN):
        denied -= _WITH_SYS_ADMIN
    if caps & (1 << CAP_SYS_PTRACE):
        denied -= _WITH_SYS_PTRACE
    if caps & (1 << CAP_SYSLOG):
        denied.discard("syslog")
    return compile_filter({_X86_64[n]: RET_ERRNO | errno.EPERM for n in denied}, RET_ALLOW)


def _syscall_table() -> dict[str, int]:
    table = dict(_X86_64)
    try:
        with open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") as f:
            for line in f:
                m = re.match(r"#define __NR_(\w+) (\d+)", line)
                if m:
                    table[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return table


_ACTIONS = {"SCMP_ACT_ALLOW": RET_ALLOW, "SCMP_ACT_ERRNO": RET_ERRNO | errno.EPERM,
            "SCMP_ACT_KILL": RET_KILL_PROCESS, "SCMP_ACT_KILL_PROCESS": RET_KILL_PROCESS,
            "SCMP_ACT_LOG": RET_LOG}


def from_profile(path: str) -> bytes:
    """Compile an OCI/Docker JSON profile (names and actions, no argument filters)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE + 1)
    except OSError as e:
        raise InvalidArgumentError(f"seccomp profile {path}: {e.strerror}") from None
    if len(data) > MAX_PROFILE:
        raise InvalidArgumentError(f"seccomp profile {path} is over {MAX_PROFILE} bytes")
    try:
        prof = json.loads(data)
        default = _ACTIONS[prof["defaultAction"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidArgumentError(f"seccomp profile {path}: malformed ({e})") from None
    table = _syscall_table()
    numbers: dict[int, int] = {}
    for entry in prof.get("syscalls") or []:
        if entry.get("args"):
            raise UnsupportedError(f"seccomp profile {path}: argument filters are not supported")
        action = _ACTIONS.get(entry.get("action", ""))
        if action is None:
            raise InvalidArgumentError(f"seccomp profile {path}: unknown action {entry.get('action')!r}")
        for name in entry.get("names") or []:
            if name in table:  # names this kernel does not have are skipped, as runc does
                numbers[table[name]] = action
    return compile_filter(numbers, default)


def profile_bpf(profile: str, caps: int = 0) -> bytes | None:
    """BPF for a CRI seccomp setting: "RuntimeDefault", "Unconfined" or a file path
    (optionally "localhost/<path>")."""
    if profile in ("", "Unconfined", "unconfined"):
        return None
    if profile in ("RuntimeDefault", "runtime/default", "docker/default"):
        return runtime_default(caps)
    path = profile.removeprefix("localhost/")
    if not path.startswith("/"):
        raise InvalidArgumentError(f"seccomp profile {profile!r}: give an absolute file path")
    return from_profile(path)
