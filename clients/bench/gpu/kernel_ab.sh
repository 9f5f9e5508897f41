#!/usr/bin/env bash
# A/B of a kernel change on an NVIDIA GPU host: this tree against a baseline tree, with the
# new tree's GPU correctness checks first. Both trees' op libraries are built for the GPU's
# architecture. By default the same benchmark code (this tree's) drives both, the baseline's
# petops package (and so its library, BASE/build/out) put first on PYTHONPATH; with
# BASE_CODE=own the baseline runs its own backend and clients from its own folder, which an
# A/B needs when the change alters an op's arguments or a store's layout (unpack the whole
# tree: `git archive REV | tar -x -C DIR`). Each benchmark writes a dated run folder under
# OUT/base or OUT/new; the step logs go to OUT/<step>_<version>.txt.
#
# usage: clients/bench/gpu/kernel_ab.sh OUT BASE_DIR [steps]
#   steps (default tests parity fig9 overhead kernels engine):
#     tests     petops CUDA op tests and the CUDA-graph tests, new tree
#     parity    every PET type served on the GPU vs the CPU fp32 reference, new tree
#     fig9      Fig. 9's GPU time per forward by op, both (FIG9="--configs ...")
#     overhead  forward_overhead wall vs GPU time, 64 tasks, both
#     kernels   per-kernel device time of each grouped site (op_kernels; SITES=a,b), both
#     bench     grouped ops vs per-task loops (bench_ops), new tree
#     masked    MaskBERT's masked product: seg_masked_mm, the Triton candidate and cuBLAS on
#               the same rows (masked_gemm), new tree
#     epilogue  per-segment bias/GELU/scale in a Triton GEMM vs cuBLAS + bias_act and vs the
#               cuBLASLt epilogue (epilogue_gemm, without and with IA3 scales), new tree
#     engine    bench_engine throughput, both; profile: its kernel breakdown, new tree
set -uo pipefail
out=${1:?usage: kernel_ab.sh OUT BASE_DIR [steps]}
base=${2:?usage: kernel_ab.sh OUT BASE_DIR [steps]}; shift 2
steps=${*:-tests parity fig9 overhead kernels engine}
has() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p "$out"
out=$(cd "$out" && pwd) base=$(cd "$base" && pwd)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)  # e.g. 9.0
build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} \
    PETOPS_CMAKE_ARGS=${PETOPS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=${cap/./}} PYTHON=$py \
    timeout 400 bash "$1/build/build_ops.sh" 2>&1 | tail -1
}
# Per version: PYTHONPATH (the petops package loads <its tree>/build/out/libpetops.so) and
# the folder its benchmarks run from.
declare -A path=([new]=$PWD/backend:$PWD/cuda_ops:$PWD [base]=$PWD/backend:$base/cuda_ops:$PWD)
declare -A dir=([new]=$PWD [base]=$PWD)
if [[ ${BASE_CODE:-shared} == own ]]; then
  path[base]=$base/backend:$base/cuda_ops:$base dir[base]=$base
fi
# ab VERSION STEP LIMIT ARGS...: `python3 ARGS --out OUT/VERSION` in VERSION's tree.
ab() {
  local v=$1 step=$2 lim=$3; shift 3
  (cd "${dir[$v]}" && PYTHONPATH=${path[$v]} timeout "$lim" $py "$@" --out "$out/$v" 2>&1) \
    | grep -v "Warning\|USDT" | tail -20 | tee "$out/${step}_$v.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
build "$PWD" & build "$base" & wait
ls -la "$PWD/build/out/libpetops.so" "$base/build/out/libpetops.so" || exit 1
if has tests; then
  (PYTHONPATH=${path[new]} timeout 300 $py -m pytest tests/ops tests/test_graphs.py -q -x \
    -p no:cacheprovider 2>&1) | tail -5 | tee "$out/tests_new.txt"
fi
if has parity; then
  ab new parity 200 -m clients.bench.check_device_parity --backbone bert-base --device cuda:0 \
    --dtype float16
fi
if has fig9; then
  for v in base new; do
    ab $v fig9 240 -m clients.paper fig9 --model bert-base ${FIG9:-}
  done
fi
if has overhead; then
  for v in new base; do
    ab $v overhead 240 -m clients.bench.forward_overhead --backbone bert-base --dtype float16 \
      --tasks 64 --mixes backbone,mixed --shapes 256x64,64x64,1x128
  done
fi
if has kernels; then
  for v in base new; do
    ab $v kernels 200 -m clients.bench.op_kernels --segments 1,64,256 ${SITES:+--sites "$SITES"}
  done
fi
if has bench; then
  ab new bench 400 -m clients.bench.bench_ops --segments 1,8,64,256
fi
if has masked; then
  ab new masked 300 -m clients.bench.masked_gemm --groups 16x1024,64x64,256x64,8x64,1x128
fi
if has epilogue; then
  ab new epilogue 300 -m clients.bench.epilogue_gemm --points 256x64,64x64,8x64,1x128
  ab new epilogue_ia3 300 -m clients.bench.epilogue_gemm --points 256x64,64x64 --scales
fi
if has engine; then
  for v in base new; do
    ab $v engine 300 -m clients.bench.bench_engine --backbone bert-base --dtype float16 \
      --tasks 11 --batch 64 --seq-len 64 --streams 0
  done
fi
if has profile; then  # kernel breakdown of the new library's forwards (a separate pass: the
  # profiler slows the forwards it does not record)
  ab new profile 300 -m clients.bench.bench_engine --backbone bert-base --dtype float16 \
    --tasks 11 --batch 64 --seq-len 64 --streams 0 --iters 3 --profile
fi
