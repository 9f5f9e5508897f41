#!/usr/bin/env bash
# The PetS paper's whole evaluation on an NVIDIA GPU host with no package access (issue 19):
# `python -m clients.paper all --model bert-base`, every experiment in turn with its wall time,
# then summary.csv / summary.md. Needs the packed runtime at .runtime/triton-runtime.tar.xz
# (shared/tools/pack-triton-runtime.sh) and the wheels of build/offline_wheels.sh in .whl/.
# host_setup.sh builds .venv (numpy 1.26 for Triton's stub: tritonserver for fig8_online runs
# from it) and petops; the harness itself runs on the host's python3, whose transformers
# needs its numpy 2, with the carried tritonclient and its imports put first on its path.
# The run folders and paper_all.log land under OUT.
#
# usage: clients/bench/gpu/paper_all.sh OUT [more `paper all` flags, e.g. --no-online]
set -uo pipefail
out=${1:?usage: paper_all.sh OUT [paper all flags]}; shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
# shellcheck source=clients/bench/gpu/host_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/host_setup.sh"
site=$(mktemp -d)
wheels=()
for name in tritonclient grpcio protobuf python_rapidjson; do
  wheels+=(.whl/"$name"-*.whl)
done
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" \
  || { echo "paper_all.sh: could not install ${wheels[*]} for python3"; exit 1; }
export PYTHONPATH=$site:$PWD/backend:$PWD/cuda_ops:$PWD
python3 -c "import tritonclient.grpc, transformers" || exit 1
start=$(date +%s)
python3 -m clients.paper all --model bert-base --out "$out" "$@" 2>&1 | grep -v Warning \
  | tee "$out/paper_all.log"
rc=${PIPESTATUS[0]}
echo "paper_all.sh: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/paper_all.log"
exit "$rc"
