"""Container and sandbox lifecycle through the public API, beside runc (and crun).

  lifecycle   create + start + wait + remove of /bin/true in an existing pod
              (cgroup, overlay rootfs, monitor, log, exit file: everything a
              container gets) vs `runc run` (create + start + wait + delete) on
              a bundle whose rootfs is the same image layer.
  sandbox     run_sandbox + remove, with no network and with the CNI bridge.
  many        100 containers created and started at once (threads), total
              time, then the memory they cost: PSS of all monitors, and the
              Python process's peak RSS.

Reproduce (root):  python3 benchmarks/bench_container.py [-n 30] [--crun] [--many 100]
                   [--lifecycle-only] [--pace MS]
The lifecycle row is followed by its phases (create, start, wait, remove), each
the median of its own timings. pycri and its peers run in alternating rounds of
10. Back to back (the default), pycri's work ahead of the next create (its slot)
competes with the lifecycle being timed on this 2-core machine; --pace MS leaves
MS idle after every lifecycle, pycri's and its peers' alike, as a program with
anything else to do between containers would.
(--crun re-runs everything in a private mount namespace with the empty cgroup v2
mount unmounted, because crun 1.8 refuses this host's hybrid layout.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path[:0] = [TREE, os.path.join(TREE, "tests"), HERE]

import imagebuild as ib  # noqa: E402
from bench_spawn import oci_bundle  # noqa: E402
from conftest import LocalRegistry  # noqa: E402

import pycri  # noqa: E402


ROUND = 10     # lifecycles per runtime per round (see the lifecycle loop)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def row(name: str, t: list[float], base: float | None = None) -> str:
    med = statistics.median(t)
    q = statistics.quantiles(t, n=10) if len(t) >= 2 else [med, med]
    ratio = f"{med / base:>9.2f}x" if base else ""
    return f"{name:<28}{med * 1e3:>10.2f}{q[0] * 1e3:>10.2f}{q[-1] * 1e3:>10.2f}{ratio}"


def report(results: list[tuple[str, list[float]]], phases: dict[str, list[float]],
           args: argparse.Namespace) -> None:
    pace = f", {args.pace:g} ms idle between lifecycles" if args.pace else ", back to back"
    print(f"lifecycle of /bin/true and sandboxes, n={args.n} (ms){pace}")
    print(f"{'what':<28}{'median':>10}{'p10':>10}{'p90':>10}{'pycri/peer':>10}")
    pycri_med = statistics.median(results[0][1])
    print(row(results[0][0], results[0][1]))
    for k, v in phases.items():
        print(row(f"  {k}", v))
    for name, t in results[1:]:
        if name.startswith(("runc", "crun")):
            print(row(name, t) + f"   pycri/{name.split()[0]} = "
                  f"{pycri_med / statistics.median(t):.2f}")
        else:
            print(row(name, t))
    if args.lifecycle_only:
        flag = (" --crun" if args.crun else "") + (f" --pace {args.pace:g}" if args.pace else "")
        print(f"reproduce (root): python3 benchmarks/bench_container.py -n {args.n} "
              f"--lifecycle-only{flag}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--crun", action="store_true")
    ap.add_argument("--many", type=int, default=100)
    ap.add_argument("--pace", type=float, default=0.0, metavar="MS",
                    help="idle MS between lifecycles, for pycri and its peers alike "
                         "(0: back to back)")
    ap.add_argument("--lifecycle-only", action="store_true",
                    help="only the lifecycle rows (no sandboxes, no --many)")
    args = ap.parse_args()
    if args.crun and not os.environ.get("PYCRI_BENCH_INNER"):
        inner = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"'
        os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", "sh", "-c", inner,
                               "sh", sys.executable, *sys.argv],
                   dict(os.environ, PYCRI_BENCH_INNER="1"))
    base = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    reg = LocalRegistry(os.path.join(base, "reg"))
    parent = "pycri-bench-" + uuid.uuid4().hex[:6]
    rt = pycri.Runtime(root=base + "/root", state=base + "/state", cgroup_parent=parent)
    try:
        built = ib.build_image([ib.busybox_layer()], config={"Env": ["PATH=/bin"]})
        ib.push(reg.host, "bench/busybox", "v1", built)
        img = rt.images.pull(f"{reg.host}/bench/busybox:v1")
        results: list[tuple[str, list[float]]] = []

        phases: dict[str, list[float]] = {k: [] for k in ("create", "start", "wait", "remove")}
        with rt.run_sandbox(pycri.SandboxConfig(name="bench")) as sb:
            def lifecycle() -> None:
                t0 = time.perf_counter()
                c = sb.create_container(pycri.ContainerConfig(
                    name="t" + uuid.uuid4().hex[:8], image=img.id, command=("/bin/true",)))
                t1 = time.perf_counter()
                c.start()
                t2 = time.perf_counter()
                c.wait()
                t3 = time.perf_counter()
                c.remove()
                t4 = time.perf_counter()
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[k].append(v)

            lower = rt.images.layer_dirs(img)[0]
            work = os.path.join(base, "oci")
            os.makedirs(work)
            peers = ["runc", "crun"] if args.crun else ["runc"]
            times: dict[str, list[float]] = {k: [] for k in ["pycri", *peers]}
            with contextlib.ExitStack() as bundles:
                run_peer = {p: bundles.enter_context(oci_bundle(p, work, lower)) for p in peers}
                for _ in range(3):
                    lifecycle()
                    for p in peers:
                        run_peer[p]()
                for v in phases.values():
                    v.clear()
                # In rounds of ROUND runs each, so that pycri and its peers see the
                # machine in the same state: this host's file system gets slower
                # for everyone the more files were made and deleted in the last
                # minutes (journal-less ext4 skips recently freed inodes one by one).
                pace = args.pace / 1000

                def paced(fn: Callable[[], float]) -> float:
                    t = fn()
                    if pace:
                        time.sleep(pace)    # (not timed)
                    return t

                for i in range(0, args.n, ROUND):
                    k = min(ROUND, args.n - i)
                    times["pycri"] += [paced(lambda: timed(lifecycle)) for _ in range(k)]
                    for p in peers:
                        times[p] += [paced(run_peer[p]) for _ in range(k)]
            results.append(("pycri lifecycle", times["pycri"]))
            results += [(f"{p} run", times[p]) for p in peers]

        def sandbox_cycle(rt_: pycri.Runtime) -> None:
            s = rt_.run_sandbox(pycri.SandboxConfig(name="s" + uuid.uuid4().hex[:8]))
            s.stop()
            s.remove()

        if args.lifecycle_only:
            report(results, phases, args)
            return
        results.append(("pycri sandbox (no network)",
                        [timed(lambda: sandbox_cycle(rt)) for _ in range(args.n)]))
        conf = os.path.join(base, "net.d")
        os.makedirs(conf)
        with open(os.path.join(conf, "10.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "bench", "plugins": [
                {"type": "bridge", "bridge": "pycribench0", "isGateway": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.214.0.0/16"}]],
                          "dataDir": os.path.join(base, "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}, f)
        rt_cni = pycri.Runtime(root=base + "/root", state=base + "/state",
                               cgroup_parent=parent, cni_conf_dir=conf)
        try:
            results.append(("pycri sandbox (CNI bridge)",
                            [timed(lambda: sandbox_cycle(rt_cni)) for _ in range(args.n)]))
        finally:
            subprocess.run(["ip", "link", "del", "pycribench0"], capture_output=True)

        report(results, phases, args)

        # many containers at once
        with rt.run_sandbox(pycri.SandboxConfig(name="many")) as sb:
            def start_one(i: int) -> pycri.Container:
                c = sb.create_container(pycri.ContainerConfig(
                    name=f"m{i}", image=img.id, command=("sleep", "600")))
                c.start()
                return c

            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                cs = list(pool.map(start_one, range(args.many)))
            total = time.perf_counter() - t0
            monitors = [c.record()["monitor_pid"] for c in cs]
            pss = sum(pss_kb(p) for p in monitors)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"\n{args.many} containers created+started concurrently: {total:.2f} s "
                  f"({total / args.many * 1e3:.1f} ms each); monitors' PSS total "
                  f"{pss / 1024:.1f} MiB ({pss / len(monitors):.0f} kB each); "
                  f"Python peak RSS {peak / 1024:.0f} MiB")
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda c: c.remove(), cs))
            print(f"removed in {time.perf_counter() - t0:.2f} s")
        flag = " --crun" if args.crun else ""
        print(f"reproduce (root): python3 benchmarks/bench_container.py -n {args.n} "
              f"--many {args.many}{flag}")
    finally:
        for s in rt.sandboxes():
            s.remove()
        rt.cgroups().remove_parent()
        reg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
