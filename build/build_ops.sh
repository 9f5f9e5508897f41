#!/usr/bin/env bash
# Configure (once) and build build/out/libpetops.so. Idempotent; a no-op build takes ~1 s.
#   PYTHON=...            interpreter with torch (default: .venv/bin/python, else python3)
#   PETOPS_CMAKE_ARGS=... extra configure flags, e.g. "-DPETOPS_WITH_CUDA=OFF"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# torch's CMake config derives gencode flags from this; match CMAKE_CUDA_ARCHITECTURES.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
BUILD_DIR="$ROOT/build/cmake"
CACHE="$BUILD_DIR/CMakeCache.txt"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

# Start over when the cache was made for another interpreter or generator.
if [[ -f "$CACHE" ]]; then
  cached_py="$(sed -n 's/^PETOPS_PYTHON:STRING=//p' "$CACHE")"
  cached_gen="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$CACHE")"
  want_gen="Unix Makefiles"; [[ ${#GEN[@]} -gt 0 ]] && want_gen="Ninja"
  if [[ "$cached_py" != "$PYTHON" || "$cached_gen" != "$want_gen" ]]; then rm -rf "$BUILD_DIR"; fi
fi
if [[ ! -f "$CACHE" || -n "${PETOPS_CMAKE_ARGS:-}" ]]; then
  # shellcheck disable=SC2086
  cmake -S "$ROOT" -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DPETOPS_PYTHON="$PYTHON" ${PETOPS_CMAKE_ARGS:-}
fi
cmake --build "$BUILD_DIR" -j"$(nproc)"

if grep -q '^PETOPS_WITH_CUDA:BOOL=ON' "$CACHE"; then
  echo "petops: built $ROOT/build/out/libpetops.so with CPU and CUDA kernels"
else
  echo "petops: built $ROOT/build/out/libpetops.so with CPU kernels only (no CUDA torch/nvcc)"
fi
