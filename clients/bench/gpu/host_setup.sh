# Sourced by the clients/bench/gpu/*.sh server scripts: offline set-up of an NVIDIA GPU host
# with no package access. Unpacks the carried Triton runtime (.runtime/triton-runtime.tar.xz,
# from shared/tools/pack-triton-runtime.sh), builds .venv on the host's CUDA torch (wheels in
# .whl/ are installed into it: a numpy 1.26 wheel where the host's numpy is 2.x, which the
# Triton 2.51 stub cannot use) and petops for the GPU's architecture (nvidia-smi's compute
# capability unless TORCH_CUDA_ARCH_LIST is set). Skips what a warm host already has.
# Needs $out (set-up log goes there).
export PYTHONUNBUFFERED=1 PETS_OFFLINE=1
if [[ ! -f build/triton/env.sh || ! -d .venv ]]; then
  rt=$(mktemp -d)
  tar -xJf .runtime/triton-runtime.tar.xz -C "$rt"
  export PETS_TRITON_RUNTIME=$rt
  bash build/setup_env.sh >"$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
  bash build/install_triton.sh >>"$out/setup.log" 2>&1 || { tail "$out/setup.log"; exit 1; }
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)  # e.g. 9.0
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} \
  PETOPS_CMAKE_ARGS=${PETOPS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=${cap/./}} \
  PYTHON=${PYTHON:-python3} timeout 200 bash build/build_ops.sh 2>&1 | tail -1
