# NVIDIA MPS for the GPU instances, sourced by build/serve.sh and build/container/entrypoint.sh
# (docs/deploy.md): with MPS the instances' kernels share the GPU instead of taking turns.
#
#   mps_check      is nvidia-cuda-mps-control on PATH? (a message on stderr when not)
#   mps_start DIR  export CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY (DIR/mps and
#                  DIR/mps-log unless already set), use a daemon already answering there or
#                  start one; MPS_STARTED=1 when this call started it. Returns 1 with a
#                  message when no daemon can run.
#   mps_stop       stop the daemon mps_start started (none otherwise)

mps_check() {
  command -v nvidia-cuda-mps-control >/dev/null && return 0
  echo "mps: MPS needs nvidia-cuda-mps-control (NVIDIA driver utilities) on PATH; install them, or run without MPS (--mps, PETS_MPS=1)" >&2
  return 1
}

mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-$1/mps}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-$1/mps-log}
  MPS_STARTED=0
  mps_check || return 1
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if echo get_server_list | timeout 5 nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "mps: using the daemon on $CUDA_MPS_PIPE_DIRECTORY" >&2
    return 0
  fi
  if ! nvidia-cuda-mps-control -d; then
    echo "mps: the daemon did not start (see $CUDA_MPS_LOG_DIRECTORY/control.log): a GPU in exclusive-process mode, or no permission to run it?" >&2
    return 1
  fi
  MPS_STARTED=1
  echo "mps: started the daemon on $CUDA_MPS_PIPE_DIRECTORY (log $CUDA_MPS_LOG_DIRECTORY)" >&2
}

mps_stop() {
  if [[ "${MPS_STARTED:-0}" == 1 ]]; then
    echo quit | nvidia-cuda-mps-control 2>/dev/null && echo "mps: stopped the daemon" >&2
    MPS_STARTED=0
  fi
  return 0
}
