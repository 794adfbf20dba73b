"""Layer apply: pycri.layer.apply_layer_file against GNU tar on the same blobs.

Generates a deterministic layer (default ~600 MB, ~60k entries: many small files,
a few large ones, nested directories, some symlinks), stores it as plain tar,
gzip (``gzip -6``, what most registries serve) and zstd (``zstd -3``), then
extracts each with pycri and with ``tar -xzf`` / ``tar --zstd -xf`` / ``tar -xf``
into fresh directories, alternating the tools, and prints the median wall times.

    python benchmarks/bench_layer.py                  # full size, 3 runs each
    python benchmarks/bench_layer.py --scale 0.05 -n 1  # a quick smoke run

Outputs go under --workdir (default /var/tmp/pycri-bench-layer, same disk as
real layers). They are deleted only at the end: on this ext4-without-journal
disk, creating files right after deleting a big tree is several times slower
for minutes, which would skew whichever run came next. Everything is synced
(untimed) before each run so earlier writeback does not land in a timing.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pycri.layer import apply_layer_file

MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "plain": "application/vnd.oci.image.layer.v1.tar",
}
TAR_CMD = {
    "gzip": ["tar", "-xzf"],
    "zstd": ["tar", "--zstd", "-xf"],
    "plain": ["tar", "-xf"],
}
TARGET = {"gzip": 0.6, "zstd": 1.0, "plain": 1.0}


def _pool(rng: random.Random, size: int) -> bytes:
    """Bytes that compress about 2-3x, like binaries and text in real layers."""
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(2, 10)))
             for _ in range(4000)]
    out = bytearray()
    while len(out) < size * 3 // 4:
        out += b" ".join(rng.choices(words, k=512)) + b"\n"
    out += rng.randbytes(size - len(out))
    return bytes(out)


def generate(path: str, scale: float, seed: int = 1) -> tuple[int, int]:
    rng = random.Random(seed)
    pool = _pool(rng, 8 << 20)
    n_small = int(57000 * scale)
    n_dirs = max(int(3000 * scale), 1)
    n_large = max(int(70 * scale), 1)
    entries = 0
    dirs: list[str] = []
    for i in range(n_dirs):
        parent = rng.choice(dirs) if dirs and rng.random() < 0.7 else "usr"
        dirs.append(f"{parent}/d{i}")
    # (dir, kind, index): emitted grouped by directory, as `tar -c` walks a tree
    plan = [(rng.choice(dirs), "f", i) for i in range(n_small)]
    plan += [(rng.choice(dirs), "l", i) for i in range(0, n_small, 50)]
    plan += [(rng.choice(dirs), "b", i) for i in range(n_large)]
    plan += [(d, "", 0) for d in dirs]
    plan.sort(key=lambda p: (p[0].split("/"), p[1], p[2]))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        def add_dir(name: str) -> None:
            nonlocal entries
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000 + entries
            t.addfile(ti)
            entries += 1

        def add_file(name: str, size: int, mode: int = 0o644) -> None:
            nonlocal entries
            off = rng.randrange(0, len(pool) - 1)
            data = (pool[off:] + pool)[:size] if size <= len(pool) else (
                pool * (size // len(pool) + 1))[off:off + size]
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = size, mode, 1_650_000_000 + entries
            ti.uid, ti.gid = rng.choice([(0, 0), (0, 0), (1000, 1000)])
            t.addfile(ti, io.BytesIO(data))
            entries += 1

        for d, kind, i in plan:
            if kind == "":
                add_dir(d)
            elif kind == "f":
                size = int(rng.lognormvariate(7.2, 1.3))  # median ~1.3 KB, long tail
                add_file(f"{d}/f{i}.dat", min(size, 1 << 20), 0o755 if i % 10 == 0 else 0o644)
            elif kind == "l":
                ti = tarfile.TarInfo(f"{d}/l{i}")
                ti.type, ti.linkname = tarfile.SYMTYPE, f"../f{i}.dat"
                t.addfile(ti)
                entries += 1
            else:
                add_file(f"{d}/big{i}.bin", int(rng.uniform(2, 8) * (1 << 20)))
    return entries, os.path.getsize(path)


def prepare(work: str, scale: float) -> dict[str, str]:
    os.makedirs(work, exist_ok=True)
    tag = f"s{scale:g}"
    plain = os.path.join(work, f"layer-{tag}.tar")
    blobs = {"plain": plain, "gzip": plain + ".gz", "zstd": plain + ".zst"}
    if not os.path.exists(plain):
        t0 = time.monotonic()
        entries, size = generate(plain + ".tmp", scale)
        os.rename(plain + ".tmp", plain)
        print(f"generated {plain}: {entries} entries, {size / 1e6:.0f} MB "
              f"({time.monotonic() - t0:.0f} s)")
    if not os.path.exists(blobs["gzip"]):
        subprocess.run(f"gzip -6 -c {plain} > {blobs['gzip']}.tmp", shell=True, check=True)
        os.rename(blobs["gzip"] + ".tmp", blobs["gzip"])
    if not os.path.exists(blobs["zstd"]):
        subprocess.run(["zstd", "-q", "-3", "-f", plain, "-o", blobs["zstd"] + ".tmp"],
                       check=True)
        os.rename(blobs["zstd"] + ".tmp", blobs["zstd"])
    return blobs


def run_pycri(blob: str, fmt: str, dest: str) -> float:
    os.mkdir(dest)
    os.sync()
    t0 = time.perf_counter()
    apply_layer_file(blob, MEDIA[fmt], dest)
    return time.perf_counter() - t0


def run_tar(blob: str, fmt: str, dest: str) -> float:
    os.mkdir(dest)
    os.sync()
    t0 = time.perf_counter()
    subprocess.run([*TAR_CMD[fmt], blob, "-C", dest], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=3, help="runs per tool and format")
    ap.add_argument("--scale", type=float, default=1.0, help="1.0 = ~600 MB, ~60k entries")
    ap.add_argument("--workdir", default="/var/tmp/pycri-bench-layer")
    ap.add_argument("--formats", default="gzip,zstd,plain")
    ap.add_argument("--keep-blobs", action="store_true", help="keep the generated blobs")
    ap.add_argument("--keep-output", action="store_true",
                    help="leave the extracted trees (delete WORKDIR yourself later), so that "
                    "back-to-back runs do not start right after a big delete")
    args = ap.parse_args()

    blobs = prepare(args.workdir, args.scale)
    out_root = os.path.join(args.workdir, f"out-{os.getpid()}")
    os.makedirs(out_root)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for fmt in args.formats.split(","):
            times: dict[str, list[float]] = {"pycri": [], "tar": []}
            for i in range(args.runs):
                order = [("pycri", run_pycri), ("tar", run_tar)]
                if i % 2:
                    order.reverse()
                for name, fn in order:
                    times[name].append(fn(blobs[fmt], fmt, os.path.join(out_root,
                                                                        f"{fmt}-{name}-{i}")))
            results[fmt] = times
    finally:
        if not args.keep_output:
            print(f"removing {out_root} ...", file=sys.stderr)
            shutil.rmtree(out_root, ignore_errors=True)
        if not args.keep_blobs:
            for p in blobs.values():
                os.unlink(p)

    size = os.path.getsize(blobs["plain"]) if args.keep_blobs else None
    print()
    print(f"layer apply, scale {args.scale:g}, median of {args.runs} alternating runs"
          + (f", {size / 1e6:.0f} MB tar" if size else ""))
    print(f"{'format':7} {'pycri s':>9} {'tar s':>9} {'pycri/tar':>10} {'target':>7}      "
          f"{'(best runs)':>11}  tar command")
    for fmt, times in results.items():
        p, t = statistics.median(times["pycri"]), statistics.median(times["tar"])
        ok = "ok" if p / t <= TARGET[fmt] else "MISS"
        best = min(times["pycri"]) / min(times["tar"])
        print(f"{fmt:7} {p:9.2f} {t:9.2f} {p / t:10.2f} {'<=' + str(TARGET[fmt]):>7} {ok:4} "
              f"{best:11.2f}  {' '.join(TAR_CMD[fmt])} BLOB -C DIR")
    print("runs (s): " + "; ".join(
        f"{fmt} pycri {'/'.join(f'{x:.2f}' for x in tm['pycri'])} tar "
        f"{'/'.join(f'{x:.2f}' for x in tm['tar'])}" for fmt, tm in results.items()))
    print(f"\nreproduce: python benchmarks/bench_layer.py -n {args.runs} --scale {args.scale:g}")


if __name__ == "__main__":
    main()
