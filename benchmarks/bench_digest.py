"""SHA-256 throughput: pycri (C over libcrypto) against `openssl dgst -sha256`,
and what the diff_id costs while a layer is being extracted.

Part 1 hashes one file (default 1 GiB, random, under --workdir, page-cached by a
first untimed read) three ways, alternating, median of N:
  openssl dgst -sha256 FILE          the peer
  pycri sha256_fd(fd)                C reads and hashes
  pycri Sha256.update(1 MiB chunks)  Python reads, C hashes (what apply_layer does)

Part 2 extracts a plain tar layer (default ~130 MB, ~12k entries) three ways:
  tar -xf                            no digest at all
  LayerWriter, hash inside feed      one thread parses, writes and hashes
  LayerWriter, hash_separately       the producer thread hashes while feed writes
                                     (what apply_layer does)

    python benchmarks/bench_digest.py                       # 1 GiB, 3 runs
    python benchmarks/bench_digest.py --size-mb 64 -n 1     # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from pycri import _native

CHUNK = 1 << 20


def make_file(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path + ".tmp", "wb") as f:
        block = os.urandom(CHUNK)
        f.writelines(block[i % 251:] + block[:i % 251] for i in range(size // CHUNK))  # not one repeated block
    os.rename(path + ".tmp", path)


def time_openssl(path: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(["openssl", "dgst", "-sha256", "-r", path], check=True,
                         capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out.split()[0]


def time_fd(path: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        digest, _ = _native.sha256_fd(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0, digest


def time_chunks(path: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    h = _native.Sha256()
    with open(path, "rb", buffering=0) as f:
        while b := f.read(CHUNK):
            h.update(b)
    return time.perf_counter() - t0, h.hexdigest()


def extract(data: bytes, dest: str, separately: bool) -> float:
    os.mkdir(dest)
    os.sync()
    mv = memoryview(data)
    t0 = time.perf_counter()
    with _native.LayerWriter(dest, hash_separately=separately) as w:
        if not separately:
            for i in range(0, len(mv), CHUNK):
                w.feed(mv[i:i + CHUNK])
        else:
            # producer hashes, a second thread feeds: the apply_layer arrangement
            import queue
            q: queue.Queue[memoryview | None] = queue.Queue(8)

            def run() -> None:
                while (piece := q.get()) is not None:
                    w.feed(piece)
            th = threading.Thread(target=run)
            th.start()
            for i in range(0, len(mv), CHUNK):
                w.hash(mv[i:i + CHUNK])
                q.put(mv[i:i + CHUNK])
            q.put(None)
            th.join()
        w.finish()
    return time.perf_counter() - t0


def extract_tar(path: str, dest: str) -> float:
    os.mkdir(dest)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", path, "-C", dest], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=1024, help="hashed file size (part 1)")
    ap.add_argument("--layer-scale", type=float, default=0.2,
                    help="bench_layer scale of the tar in part 2 (0 skips part 2)")
    ap.add_argument("--workdir", default="/var/tmp/pycri-bench-digest")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"random-{args.size_mb}m")
    make_file(path, args.size_mb << 20)
    time_chunks(path)  # warm the page cache

    runs: dict[str, list[float]] = {"openssl": [], "fd": [], "chunks": []}
    digests = set()
    for _ in range(args.runs):
        for name, fn in (("openssl", time_openssl), ("fd", time_fd), ("chunks", time_chunks)):
            t, d = fn(path)
            runs[name].append(t)
            digests.add(d)
    assert len(digests) == 1, f"digests disagree: {digests}"
    mb = args.size_mb * (1 << 20) / 1e6
    ref = statistics.median(runs["openssl"])
    print(f"\nSHA-256 of {args.size_mb} MiB (page-cached), median of {args.runs}")
    print(f"{'tool':28} {'s':>7} {'MB/s':>8} {'vs openssl':>11}")
    for name, label in (("openssl", "openssl dgst -sha256"), ("fd", "pycri sha256_fd"),
                        ("chunks", "pycri Sha256.update 1 MiB")):
        t = statistics.median(runs[name])
        print(f"{label:28} {t:7.3f} {mb / t:8.0f} {ref / t:10.2f}x")
    os.unlink(path)

    if args.layer_scale > 0:
        import bench_layer

        tar_path = os.path.join(args.workdir, f"layer-{args.layer_scale:g}.tar")
        if not os.path.exists(tar_path):
            bench_layer.generate(tar_path, args.layer_scale)
        data = Path(tar_path).read_bytes()
        out = os.path.join(args.workdir, f"out-{os.getpid()}")
        os.makedirs(out)
        ext: dict[str, list[float]] = {"tar": [], "inline": [], "separate": []}
        try:
            for i in range(args.runs):
                ext["tar"].append(extract_tar(tar_path, f"{out}/t{i}"))
                ext["inline"].append(extract(data, f"{out}/i{i}", False))
                ext["separate"].append(extract(data, f"{out}/s{i}", True))
        finally:
            shutil.rmtree(out, ignore_errors=True)
            os.unlink(tar_path)
        ref = statistics.median(ext["tar"])
        print(f"\nextracting a {len(data) / 1e6:.0f} MB plain tar (in memory for pycri), "
              f"median of {args.runs}")
        print(f"{'how':40} {'s':>7} {'vs tar -xf':>11}")
        for name, label in (("tar", "tar -xf (no digest)"),
                            ("inline", "pycri, diff_id hashed inside feed"),
                            ("separate", "pycri, diff_id hashed by the producer")):
            t = statistics.median(ext[name])
            print(f"{label:40} {t:7.3f} {t / ref:10.2f}x")
    print(f"\nreproduce: python benchmarks/bench_digest.py -n {args.runs} --size-mb "
          f"{args.size_mb} --layer-scale {args.layer_scale:g}")


if __name__ == "__main__":
    main()
