"""cffi build of csrc/ into pycri._core.

The cdef is the text of csrc/pycri.h with the headers it includes from csrc/api/
inlined, so the boundary is written once. Preprocessor lines other than simple
integer #defines are dropped for cffi's parser.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
_INCLUDE = re.compile(r'^#include "(api/[\w.]+)"')
_DEFINE = re.compile(r"^#define\s+[A-Z_][A-Z0-9_]*\s+(-?\d+|0x[0-9a-fA-F]+)\s*$")


def _cdef_text(name: str) -> str:
    out = []
    with open(os.path.join(HERE, name)) as f:
        for line in f:
            m = _INCLUDE.match(line)
            if m:
                out.append(_cdef_text(m.group(1)))
            elif line.startswith("#"):
                if _DEFINE.match(line):
                    out.append(line)
            else:
                out.append(line)
    return "".join(out)


def _sources() -> list[str]:
    return sorted(
        os.path.join("csrc", f)
        for f in os.listdir(HERE)
        if f.endswith(".c") and not f.startswith("main_")
    )


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text("pycri.h"))
ffibuilder.set_source(
    "pycri._core",
    '#include "pycri.h"',
    sources=_sources(),
    include_dirs=[HERE],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-fvisibility=hidden", "-D_GNU_SOURCE"],
    # OpenSSL's libcrypto is on every Debian machine (python links it); linking the
    # soname directly means no -dev package is needed to build.
    # libnghttp2 (Debian libnghttp2-dev) carries the HTTP/2 of the gRPC transport (h2srv.c).
    extra_link_args=["-l:libcrypto.so.3", "-lnghttp2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
