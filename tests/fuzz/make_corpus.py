"""Write seed archives for fuzz_layer: the plain-tar hostile cases and format samples.

    python tests/fuzz/make_corpus.py tests/fuzz/corpus
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import test_layer
import test_layer_hostile as hostile

# the harness's sentinel dir: seeds that aim symlinks at it by absolute path
FUZZ_OUT = "/tmp/pycri-fuzz/outside"


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for case in hostile.CASES:
        if case.media_type != hostile.TAR:
            continue
        blob = case.build(FUZZ_OUT)
        # hostile.OUT is baked into some members; the harness uses its own path
        if hostile.OUT.encode() in blob:
            continue
        with open(os.path.join(out_dir, case.id), "wb") as f:
            f.write(blob)
        n += 1
    with open(os.path.join(out_dir, "seed-formats"), "wb") as f:
        f.write(test_layer._SEED)
    with open(os.path.join(out_dir, "symlink-to-fuzz-outside"), "wb") as f:
        f.write(test_layer.tar_of(
            test_layer.member("l", type=b"2", linkname=FUZZ_OUT),
            test_layer.member("l/pwn", b"x"),
            test_layer.member("r", type=b"2", linkname="../outside"),
            test_layer.member("h", type=b"1", linkname=FUZZ_OUT + "/sentinel"),
            test_layer.member("s", type=b"2", linkname=FUZZ_OUT + "/sentinel", mode=0o777),
        ))
    with open(os.path.join(out_dir, "hardlinks-into-lower"), "wb") as f:
        f.write(test_layer.tar_of(
            test_layer.member("a", type=b"1", linkname="usr/big"),
            test_layer.member("b", type=b"1", linkname="esc/sentinel"),
            test_layer.member("c", type=b"1", linkname="usr/gone"),
        ))
    print(f"wrote {n + 3} seeds to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus"))
