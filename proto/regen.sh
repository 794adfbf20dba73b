#!/bin/sh
# Regenerate the Python stubs for api.proto with grpcio-tools.
# Usage: proto/regen.sh [OUTDIR]   (default: pycri/cri/_gen)
# The output depends only on api.proto and the grpcio-tools version (the version
# is written into the files), so tests/test_cri_proto.py can compare byte for byte.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../pycri/cri/_gen"}
python=${PYTHON:-python3}
mkdir -p "$out"
# -I "$here" with a bare file name: the descriptor is registered as "api.proto",
# and no absolute path of this machine ends up in the generated files.
cd "$here"
"$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" api.proto
# protoc writes a top-level "import api_pb2"; the stubs live in a package.
sed -i 's/^import api_pb2 as api__pb2$/from pycri.cri._gen import api_pb2 as api__pb2/' \
    "$out/api_pb2_grpc.py"
grep -q '^from pycri.cri._gen import api_pb2 as api__pb2$' "$out/api_pb2_grpc.py"
