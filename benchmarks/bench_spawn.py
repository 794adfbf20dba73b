"""Spawn + wait of /bin/true: pycri_spawn beside `runc run`, same rootfs.

All get new mnt/pid/uts/ipc/net/cgroup namespaces, /proc, /sys, /dev and an
overlay rootfs (busybox-static). pycri mounts the overlay inside each container's
mount namespace; runc (and crun) get a bundle whose rootfs is that same overlay
mounted once. --crun adds crun; crun 1.8 refuses this host's hybrid cgroup layout,
so the whole run then happens in a private mount namespace with
/sys/fs/cgroup/unified unmounted (all three runtimes measured in it).

Reproduce (root):  python benchmarks/bench_spawn.py [-n 50] [--crun]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pycri import _native as n

NS = ("mnt", "pid", "uts", "ipc", "net", "cgroup")
CAPS = sum(1 << c for c in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READONLY = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
            "/proc/sysrq-trigger"]


def make_lower(d: str) -> str:
    lower = os.path.join(d, "lower")
    for sub in ("bin", "proc", "sys", "dev", "etc", "tmp"):
        os.makedirs(os.path.join(lower, sub))
    shutil.copy2("/bin/busybox", os.path.join(lower, "bin", "busybox"))
    for a in ("sh", "true"):
        os.symlink("busybox", os.path.join(lower, "bin", a))
    return lower


def fresh_overlay(d: str, i: int | str) -> tuple[str, str, str]:
    base = os.path.join(d, f"c{i}")
    up, wk, mp = (os.path.join(base, x) for x in ("upper", "work", "merged"))
    for p in (up, wk, mp):
        os.makedirs(p)
    return up, wk, mp


def bench_pycri(d: str, lower: str, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        up, wk, mp = fresh_overlay(d, i)
        spec = n.SpawnSpec(argv=["/bin/true"], env=["PATH=/bin"], rootfs=mp,
                           overlay_lower=[lower], overlay_upper=up, overlay_work=wk,
                           namespaces={k: "new" for k in NS}, hostname="bench",
                           cap_bounding=CAPS, cap_effective=CAPS, cap_permitted=CAPS,
                           no_new_privs=True, masked_paths=MASKED, readonly_paths=READONLY)
        t0 = time.perf_counter()
        res = n.spawn(spec)
        _, status = os.waitpid(res.pid, 0)
        times.append(time.perf_counter() - t0)
        os.close(res.pidfd)
        assert status == 0, status
    return times




def bench_oci(runtime: str, d: str, lower: str, runs: int) -> list[float]:
    with oci_bundle(runtime, d, lower) as run_once:
        return [run_once() for _ in range(runs)]


@contextlib.contextmanager
def oci_bundle(runtime: str, d: str, lower: str) -> Iterator[Callable[[], float]]:
    """A bundle for ``runtime`` on an overlay of ``lower``; yields a function that
    times one ``RUNTIME run`` of /bin/true in it (s)."""
    bundle = os.path.join(d, "bundle-" + runtime)
    os.makedirs(bundle)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        cfg = json.load(f)
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/true"]
    cfg["root"] = {"path": "rootfs", "readonly": False}
    cfg["hostname"] = "bench"
    nss = cfg["linux"]["namespaces"]
    if not any(x["type"] == "cgroup" for x in nss):
        nss.append({"type": "cgroup"})
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(cfg, f)
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(rootfs)
    up, wk, _ = fresh_overlay(d, runtime)
    n.mount_overlay(rootfs, [lower], up, wk)
    count = itertools.count()

    def run_once() -> float:
        t0 = time.perf_counter()
        subprocess.run([runtime, "run", "--bundle", bundle,
                        f"pycri-bench-{os.getpid()}-{next(count)}"],
                       check=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t0

    try:
        yield run_once
    finally:
        n.mount_unmount(rootfs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50, help="runs per runtime")
    ap.add_argument("--crun", action="store_true", help="also measure crun (see above)")
    args = ap.parse_args()
    if args.crun and not os.environ.get("PYCRI_BENCH_INNER"):
        # re-run this script in a private mount namespace without the empty v2 mount
        inner = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"'
        os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", "sh", "-c", inner,
                               "sh", sys.executable, *sys.argv],
                   dict(os.environ, PYCRI_BENCH_INNER="1"))
    d = tempfile.mkdtemp(prefix="pycri-bench-")
    try:
        lower = make_lower(d)
        os.makedirs(d + "/warm")
        bench_pycri(d + "/warm", lower, 3)
        results = [("pycri", bench_pycri(d, lower, args.n)),
                   ("runc run", bench_oci("runc", d, lower, args.n))]
        if args.crun:
            results.append(("crun run", bench_oci("crun", d, lower, args.n)))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    base = statistics.median(results[0][1])
    print(f"spawn + wait /bin/true, all namespaces + overlay rootfs + /proc /sys /dev, n={args.n}")
    print(f"{'runtime':<12}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}{'vs pycri':>10}")
    for name, t in results:
        q = statistics.quantiles(t, n=10)
        med = statistics.median(t)
        print(f"{name:<12}{med * 1e3:>12.2f}{q[0] * 1e3:>10.2f}{q[-1] * 1e3:>10.2f}"
              f"{med / base:>9.1f}x")
    print("note: runc/crun also create and remove a cgroup per container and exec their own"
          " binary; pycri joins no cgroup here (cgroup setup is csrc/cgroup.c's) and runs"
          " in-process")
    flag = " --crun" if args.crun else ""
    print(f"reproduce (root): python {os.path.relpath(__file__)} -n {args.n}{flag}")


if __name__ == "__main__":
    main()
