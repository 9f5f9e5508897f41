#!/usr/bin/env bash
# Compile the petops CUDA kernels without a GPU or a CUDA torch: every cuda_ops/csrc/cuda/*.cu
# (or the files given) to an object with nvcc against the installed torch's headers, with
# ptxas' per-kernel report. Catches compile errors, and shows each kernel's registers and
# spills, on a machine that has nvcc but only a CPU torch (the CPU wheel ships the CUDA
# headers of ATen and c10; the few cuBLAS / cuSPARSE / cuSOLVER types they name are declared
# by stand-ins here, since no kernel of ours calls those libraries). Nothing is linked or run:
# build/build_ops.sh on a GPU host is the real build.
#
# usage: build/check_kernels.sh [FILE.cu ...]     ARCH=sm_80 to target another GPU (sm_90)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v nvcc >/dev/null || { echo "check_kernels: no nvcc on PATH; install the CUDA toolkit" >&2; exit 2; }
py="$ROOT/.venv/bin/python"
[[ -x "$py" ]] || py=python3
inc=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
abi=$("$py" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
arch=${ARCH:-sm_90}
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
# A CUDA torch generates this header at build time; its one macro only matters for linking.
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
printf 'typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' >"$stub/cublas_v2.h"
echo 'typedef struct cublasLtContext* cublasLtHandle_t;' >"$stub/cublasLt.h"
printf 'typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' >"$stub/cusparse.h"
echo 'typedef int cusolverStatus_t;' >"$stub/cusolver_common.h"
echo 'typedef struct cusolverDnContext* cusolverDnHandle_t;' >"$stub/cusolverDn.h"
files=("$@")
((${#files[@]})) || files=("$ROOT"/cuda_ops/csrc/cuda/*.cu)
rc=0
for f in "${files[@]}"; do
  log="$stub/$(basename "$f").log"
  # the flags of CMakeLists.txt's CUDA sources (ABI, half-operator policy, relaxed constexpr)
  if nvcc -std=c++17 -O3 -arch="$arch" --expt-relaxed-constexpr -Xptxas -v \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -I"$stub" -I"$inc" -I"$inc/torch/csrc/api/include" -I"$ROOT/cuda_ops/csrc" \
    -c "$f" -o "$stub/out.o" >"$log" 2>&1; then
    echo "== $(basename "$f"): compiled for $arch"
    # one line per kernel: its name (template arguments, no parameter list), registers, spills
    awk -F"'" '/Compiling entry function/ { n = $2 }
         /spill stores/ { split($0, w, " "); s = w[5] " B spilled" }
         /Used [0-9]+ registers/ { split($0, w, " "); print n "\t" w[5] " regs\t" s }' "$log" \
      | c++filt | sed -e 's/^void petops::/   /' -e 's/(anonymous namespace):://' -e 's/(.*)\t/\t/'
  else
    echo "== $(basename "$f"): FAILED"
    grep -E "error|warning" "$log" | head -20
    rc=1
  fi
done
exit $rc
