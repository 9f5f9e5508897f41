#!/usr/bin/env bash
# A/B of the petops CUDA kernels on an NVIDIA GPU host: this tree against a baseline tree
# (e.g. the previous commit, unpacked with `git archive REV CMakeLists.txt build cuda_ops |
# tar -x -C DIR`). Both libraries are built for the GPU's architecture; the same benchmark
# code drives both, the baseline's petops package (and so its library, BASE/build/out) put
# first on PYTHONPATH. Writes per-kernel times (op_kernels), grouped-op times (bench_ops) and
# engine throughput (bench_engine), each a dated run folder under OUT/base or OUT/new.
#
# usage: clients/bench/gpu/kernel_ab.sh OUT BASE_DIR [steps]
#   steps: tests kernels bench engine profile (default all); SITES=a,b limits the op_kernels
#   runs to those sites (op_kernels --sites).
set -uo pipefail
out=${1:?usage: kernel_ab.sh OUT BASE_DIR [steps]}
base=${2:?usage: kernel_ab.sh OUT BASE_DIR [steps]}; shift 2
steps=${*:-tests kernels bench engine profile}
has() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
base=$(cd "$base" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)  # e.g. 9.0
build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} \
    PETOPS_CMAKE_ARGS=${PETOPS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=${cap/./}} PYTHON=$py \
    timeout 300 bash "$1/build/build_ops.sh" 2>&1 | tail -1
}
# PYTHONPATH per library: the petops package loads <its tree>/build/out/libpetops.so.
declare -A path=([new]=$PWD/backend:$PWD/cuda_ops [base]=$PWD/backend:$base/cuda_ops)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
build "$PWD" & build "$base" & wait
ls -la "$PWD/build/out/libpetops.so" "$base/build/out/libpetops.so" || exit 1
if has tests; then
  PYTHONPATH=${path[new]} timeout 300 $py -m pytest tests/ops -q -x 2>&1 | tail -5 \
    | tee "$out/ops_tests.txt"
fi
if has kernels; then
  for v in base new; do
    PYTHONPATH=${path[$v]} timeout 200 $py -m clients.bench.op_kernels --segments 1,64,256 \
      ${SITES:+--sites "$SITES"} --out "$out/$v" > /dev/null || echo "op_kernels $v failed"
  done
fi
if has bench; then
  PYTHONPATH=${path[new]} timeout 400 $py -m clients.bench.bench_ops --segments 1,8,64,256 \
    --out "$out/new" > /dev/null 2>&1 || echo "bench_ops failed"
fi
if has engine; then
  for v in base new; do
    PYTHONPATH=${path[$v]} timeout 300 $py -m clients.bench.bench_engine --backbone bert-base \
      --dtype float16 --tasks 11 --batch 64 --seq-len 64 --streams 0 --out "$out/$v" \
      2>&1 | grep -v Warning
  done
fi
if has profile; then  # kernel breakdown of the new library's forwards (a separate pass: the
  # profiler slows the forwards it does not record)
  PYTHONPATH=${path[new]} timeout 300 $py -m clients.bench.bench_engine --backbone bert-base \
    --dtype float16 --tasks 11 --batch 64 --seq-len 64 --streams 0 --iters 3 --profile \
    --out "$out/new" 2>&1 | grep -v Warning
fi
