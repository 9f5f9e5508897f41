#!/usr/bin/env bash
# A/B of the petops CUDA kernels on a GPU host: this tree against a baseline tree (e.g. the
# previous commit, unpacked with `git archive REV CMakeLists.txt build cuda_ops | tar -x -C
# DIR`). Both libraries are built for sm_90; the same Python drives both (the op schemas are
# the same), the baseline loaded through PETOPS_LIBRARY. Writes per-kernel times
# (op_kernels.py), grouped-op times (bench_ops.py) and engine throughput (bench_engine.py).
#
# usage: clients/h100/kernel_ab.sh OUT BASE_DIR [steps]
#   steps: tests kernels bench engine profile (default all); KNOBS="A=1 B=2,C=3" adds
#   op_kernels runs of the new library with those environment settings; SITES=a,b limits
#   the op_kernels runs to those sites (op_kernels.py --sites).
set -uo pipefail
out=${1:?usage: kernel_ab.sh OUT BASE_DIR [steps]}
base=${2:?usage: kernel_ab.sh OUT BASE_DIR [steps]}; shift 2
steps=${*:-tests kernels bench engine profile}
has() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
export PYTHONPATH=$PWD/backend:$PWD/cuda_ops:$PWD/clients PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
build() {
  TORCH_CUDA_ARCH_LIST=9.0 PETOPS_CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=90 PYTHON=$py \
    timeout 300 bash "$1/build/build_ops.sh" 2>&1 | tail -1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
build "$PWD" & build "$base" & wait
new_lib=$PWD/build/out/libpetops.so base_lib=$(cd "$base" && pwd)/build/out/libpetops.so
ls -la "$new_lib" "$base_lib" || exit 1
if has tests; then
  timeout 300 $py -m pytest tests/ops -q -x 2>&1 | tail -5 | tee "$out/ops_tests.txt"
fi
if has kernels; then
  for v in base new; do
    lib=${v}_lib
    PETOPS_LIBRARY=${!lib} timeout 200 $py clients/op_kernels.py --segments 1,64,256 \
      ${SITES:+--sites "$SITES"} --out "$out/op_kernels_$v.csv" > /dev/null ||
      echo "op_kernels $v failed"
  done
  for knob in ${KNOBS:-}; do
    env ${knob//,/ } timeout 200 $py clients/op_kernels.py --segments 64,256 \
      ${SITES:+--sites "$SITES"} --out "$out/op_kernels_new_${knob//[=,]/_}.csv" \
      > /dev/null || echo "op_kernels $knob failed"
  done
fi
if has bench; then
  timeout 400 $py clients/bench_ops.py --segments 1,8,64,256 --out "$out/bench_ops" \
    > /dev/null 2>&1 || echo "bench_ops failed"
fi
if has engine; then
  for v in base new; do
    lib=${v}_lib
    PETOPS_LIBRARY=${!lib} timeout 300 $py clients/bench_engine.py --backbone bert-base \
      --dtype float16 --tasks 11 --batch 64 --seq-len 64 --streams 0 --out "$out/engine_$v" \
      2>&1 | grep -v Warning
  done
fi
if has profile; then  # kernel breakdown of the new library's forwards (a separate pass: the
  # profiler slows the forwards it does not record)
  timeout 300 $py clients/bench_engine.py --backbone bert-base --dtype float16 --tasks 11 \
    --batch 64 --seq-len 64 --streams 0 --iters 3 --profile --out "$out/engine_profile" \
    2>&1 | grep -v Warning
fi
