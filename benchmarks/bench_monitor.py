"""Memory of pycri-monitor beside conmon, each watching an idle container process.

    python benchmarks/bench_monitor.py [--n 1,10,50]

For each N: start N pycri-monitors (detached, attach socket on, each running
``busybox sleep``), and N conmons (each with runc running the same ``busybox sleep``
from a tiny read-only bundle), all at once; then read Pss/Rss of every monitor
process from /proc/PID/smaps_rollup. PSS divides shared pages among the processes
that map them, so it is the fair "what does one more container cost" figure.
Everything started here is killed and reaped (runc kill/delete for conmon).

Needs root, conmon and runc (Debian: apt-get install conmon runc busybox-static).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pycri import _native

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CONMON = shutil.which("conmon") or "/usr/bin/conmon"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def mem_kb(pid: int) -> tuple[int, int]:
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def start_pycri(work: str, n: int) -> list[tuple[int, int]]:
    out = []
    for i in range(n):
        d = os.path.join(work, f"p{i}")
        os.mkdir(d)
        out.append(_native.launch_monitor(
            os.path.join(d, "exit.json"), os.path.join(d, "ctr.log"),
            [BUSYBOX, "sleep", "600"], attach_socket=os.path.join(d, "attach.sock")))
    return out


def stop_pycri(procs: list[tuple[int, int]]) -> None:
    for _mon, ctr in procs:
        try:
            os.kill(ctr, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for mon, _ctr in procs:
        wait_gone(mon)


def make_rootfs(work: str) -> str:
    root = os.path.join(work, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    for sub in ("proc", "dev", "sys", "tmp"):
        os.makedirs(os.path.join(root, sub))
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    return root


def start_conmon(work: str, rootfs: str, n: int, tag: str) -> list[tuple[str, int, str]]:
    out = []
    for i in range(n):
        cid = f"pycri-bench-{tag}-{i}"
        b = os.path.join(work, f"c{i}")
        os.mkdir(b)
        subprocess.run([RUNC, "spec"], cwd=b, check=True)
        with open(os.path.join(b, "config.json")) as f:
            cfg = json.load(f)
        cfg["process"]["args"] = ["/bin/busybox", "sleep", "600"]
        cfg["process"]["terminal"] = False
        cfg["root"] = {"path": rootfs, "readonly": True}
        with open(os.path.join(b, "config.json"), "w") as f:
            json.dump(cfg, f)
        subprocess.run([CONMON, "--api-version", "1", "-c", cid, "-u", cid, "-n", cid,
                        "-r", RUNC, "-b", b, "-p", os.path.join(b, "pidfile"),
                        "-l", "k8s-file:" + os.path.join(b, "ctr.log"), "--exit-dir", b,
                        "--socket-dir-path", b, "-P", os.path.join(b, "conmon.pid"),
                        "--log-level", "error"], check=True, timeout=30)
        # conmon returns before `runc create` has finished: wait for the pid file.
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(b, "pidfile")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runc create of {cid} did not finish")
            time.sleep(0.01)
        subprocess.run([RUNC, "start", cid], check=True, timeout=30)
        with open(os.path.join(b, "conmon.pid")) as f:
            out.append((cid, int(f.read()), b))
    return out


def stop_conmon(procs: list[tuple[str, int, str]]) -> None:
    for cid, _pid, _b in procs:
        subprocess.run([RUNC, "kill", cid, "KILL"], check=False, capture_output=True)
    for cid, pid, _b in procs:
        wait_gone(pid)
        subprocess.run([RUNC, "delete", "--force", cid], check=False,
                       capture_output=True)


def summarize(pids: list[int]) -> tuple[float, float, int]:
    figures = [mem_kb(p) for p in pids]
    pss = sum(f[0] for f in figures)
    rss = sum(f[1] for f in figures)
    return pss / len(pids), rss / len(pids), pss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1,10,50", help="comma-separated container counts")
    args = ap.parse_args()
    have_conmon = os.path.exists(CONMON) and os.path.exists(RUNC)
    print(f"# {' '.join([sys.executable] + sys.argv)}")
    print(f"# pycri-monitor: {_native.monitor_path()} "
          f"({os.path.getsize(_native.monitor_path())} bytes)")
    if have_conmon:
        ver = subprocess.run([CONMON, "--version"], check=False, capture_output=True,
                             text=True).stdout
        print(f"# conmon: {CONMON} ({ver.splitlines()[0]}), runtime {RUNC}")
    else:
        print("# conmon or runc missing: only pycri-monitor is measured")
    print()
    header = (f"{'N':>4} | {'pycri PSS/proc':>14} {'RSS/proc':>9} | {'conmon PSS/proc':>15} "
              f"{'RSS/proc':>9} | {'PSS ratio':>9}")
    print(header)
    print("-" * len(header))
    for n in (int(x) for x in args.n.split(",")):
        with tempfile.TemporaryDirectory(prefix="pycri-bench-") as work:
            pyc: list[tuple[int, int]] = []
            con: list[tuple[str, int, str]] = []
            try:
                pyc = start_pycri(work, n)
                if have_conmon:
                    con = start_conmon(work, make_rootfs(work), n, str(n))
                time.sleep(0.5)
                p_pss, p_rss, _ = summarize([m for m, _c in pyc])
                if con:
                    c_pss, c_rss, _ = summarize([p for _cid, p, _b in con])
                    print(f"{n:>4} | {p_pss:>11.0f} kB {p_rss:>6.0f} kB | {c_pss:>12.0f} kB "
                          f"{c_rss:>6.0f} kB | {p_pss / c_pss:>9.2f}")
                else:
                    print(f"{n:>4} | {p_pss:>11.0f} kB {p_rss:>6.0f} kB | {'-':>15} {'-':>9} | "
                          f"{'-':>9}")
            finally:
                stop_pycri(pyc)
                stop_conmon(con)
    print("\nPSS ratio = pycri-monitor / conmon (lower is better).")


if __name__ == "__main__":
    main()
