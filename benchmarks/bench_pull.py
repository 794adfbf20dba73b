"""Pull + unpack of a 5-layer gzip image from a local registry: pycri vs peers.

Peers, on the same registry, disk and image in the same run:
  skopeo copy docker://... oci:DIR  +  umoci unpack      (Debian packages)
  containerd 1.6 `ctr images pull` (fetch + unpack into the overlayfs snapshotter),
    with a private containerd started on a temp root (skipped if not installed)

Each tool pulls into a fresh directory every run (outputs are deleted only at the
end: on this ext4 disk file creation slows down for minutes after a large delete).
Runs alternate between tools; the table shows the median wall time and the
ratio pycri/peer.

    python3 benchmarks/bench_pull.py [--runs 3] [--layer-mb 60] [--workdir /var/tmp/pycri-bench-pull]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path[:0] = [TREE, os.path.join(TREE, "tests")]

import imagebuild as ib
from conftest import LocalRegistry

import pycri


def make_layer(seed: int, total: int) -> bytes:
    """A layer of ~total bytes: many small text-ish files and a few big mixed ones."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(2000)]
    entries: list = []
    size = 0
    n = 0
    while size < total:
        n += 1
        if n % 50 == 0:
            data = rnd.randbytes(1 << 20) + b" ".join(rnd.choices(words, k=150_000))
        else:
            data = b" ".join(rnd.choices(words, k=rnd.randint(10, 3000)))
        entries.append(ib.File(f"d{seed}/{n % 97}/f{n}", data))
        size += len(data)
    dirs = sorted({os.path.dirname(e.path) for e in entries} | {f"d{seed}"})
    return ib.layer_tar([ib.Dir(d) for d in dirs] + entries)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layer-mb", type=int, default=60)
    ap.add_argument("--workdir", default="/var/tmp/pycri-bench-pull")
    ap.add_argument("--no-containerd", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.workdir)
    reg = LocalRegistry(os.path.join(work, "registry"))
    try:
        t0 = time.perf_counter()
        layers = [make_layer(i, args.layer_mb << 20) for i in range(5)]
        built = ib.build_image(layers, compression="gzip")
        ref = f"{reg.host}/bench/pull:v1"
        ib.push(reg.host, "bench/pull", "v1", built)
        gz = sum(len(b) for d, b in built.blobs.items() if d in built.layer_digests)
        print(f"# image: 5 layers, {sum(map(len, layers)) >> 20} MiB tar, {gz >> 20} MiB gzip "
              f"(built and pushed in {time.perf_counter() - t0:.1f}s)")

        def run_pycri(i: int) -> None:
            d = os.path.join(work, f"pycri-{i}")
            pycri.Runtime(root=d + "/root", state=d + "/state").images.pull(ref)

        def run_skopeo(i: int) -> None:
            d = os.path.join(work, f"skopeo-{i}")
            os.makedirs(d)
            subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                            f"oci:{d}/layout:v1"], check=True)
            subprocess.run(["umoci", "unpack", "--image", f"{d}/layout:v1", f"{d}/bundle"],
                           check=True, stdout=subprocess.DEVNULL)

        tools = {"pycri": run_pycri, "skopeo+umoci": run_skopeo}
        if not args.no_containerd and shutil.which("containerd") and shutil.which("ctr"):
            tools["containerd"] = None  # type: ignore[assignment]
        times: dict[str, list[float]] = {k: [] for k in tools}
        for i in range(args.runs):
            for name, fn in tools.items():
                os.sync()
                if name == "containerd":
                    # a fresh containerd root per run (its start is not timed), so
                    # nothing fetched or unpacked before is reused
                    ctrd = Containerd(os.path.join(work, f"containerd-{i}"))
                    try:
                        times[name].append(timed(lambda c=ctrd: c.pull(ref)))
                    finally:
                        ctrd.stop()
                else:
                    times[name].append(timed(lambda f=fn, n=i: f(n)))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'tool':<14} {'median s':>9}  runs")
        for k, v in times.items():
            print(f"{k:<14} {med[k]:>9.3f}  " + " ".join(f"{x:.3f}" for x in v))
        for k in med:
            if k != "pycri":
                print(f"ratio pycri/{k}: {med['pycri'] / med[k]:.2f}")
        print("reproduce: python3 benchmarks/bench_pull.py "
              f"--runs {args.runs} --layer-mb {args.layer_mb}")
    finally:
        reg.stop()
        subprocess.run(["umount", "-R", work], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


class Containerd:
    """A private containerd (no CRI plugin) on a temp root and socket."""

    def __init__(self, d: str) -> None:
        self.d = d
        os.makedirs(d, exist_ok=True)
        self.sock = os.path.join(d, "c.sock")
        cfg = os.path.join(d, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                    f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n')
        self.log = open(os.path.join(d, "log"), "wb")
        self.proc = subprocess.Popen(["containerd", "--config", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        for _ in range(100):
            if subprocess.run(["ctr", "--address", self.sock, "version"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.1)

    def pull(self, ref: str) -> None:
        subprocess.run(["ctr", "--address", self.sock, "-n", "bench", "images", "pull",
                        "--plain-http", ref], check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


if __name__ == "__main__":
    main()
