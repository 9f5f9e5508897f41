#!/usr/bin/env bash
# Build what is needed and serve the `pets` model with Triton 2.51 on 127.0.0.1.
#
# usage: build/serve.sh [--gpus all|0,1,...] [--instances-per-gpu N] [--mps] [--instances N]
#                       [--dtype D] [--memory-budget-mb M] [-- extra tritonserver flags]
#   --gpus G       serve a generated copy of the model repository (var/model_repository_gpu)
#                  with one instance group per listed GPU ('all': every GPU this process
#                  sees, after CUDA_VISIBLE_DEVICES), DTYPE float16 (backend/pets/placement.py)
#   --gpu          the same as --gpus 0
#   --instances-per-gpu N  instances (stub processes, each its own engine) per GPU; default 2
#   --mps          run the instances under NVIDIA MPS, so that their kernels share the GPU
#                  instead of taking turns (docs/deploy.md): starts nvidia-cuda-mps-control
#                  on var/mps unless CUDA_MPS_PIPE_DIRECTORY names a running daemon, and
#                  stops the daemon it started when the server stops
#   --instances N  CPU instances of the model (default 1); with --gpus, the same as
#                  --instances-per-gpu
#   --dtype D      override DTYPE (auto|float32|float16|bfloat16)
#   --memory-budget-mb M  MEMORY_BUDGET_MB of every instance (tasks' device memory each)
# env: PETS_HTTP_PORT=8000 PETS_GRPC_PORT=8001 PETS_METRICS_PORT=8002
#      PETS_MODEL_REPOSITORY=model_repository  PETS_DEMO_STORE=var/demo_store
#      PETS_ADMIN_KEY=<random>   header `admin-key` unlocking the model-repository and
#                                shared-memory APIs (restricted: Triton 2.51 advisories)
#      PETS_ADMIN_TOKEN=<admin key>  TOKEN of the pets_admin model (register/update/
#                                unregister tasks over HTTP/gRPC; docs/operations.md)
#      PETS_SKIP_SETUP=1         skip setup_env/build_ops/demo store (quick restart)
#      PETS_DEMO_REBUILD=1       recreate the demo store (it is only made when missing)
#      PETS_OFFLINE, PETS_TRITON_RUNTIME: see build/setup_env.sh, build/install_triton.sh
# Ctrl-C / SIGTERM stops the server, its leftover stub processes and their shm regions.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { echo "serve: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=build/mps.sh
source build/mps.sh

gpus=""; instances=""; per_gpu=""; dtype=""; budget=""; mps=0; extra=()
while (($#)); do
  case "$1" in
    --gpu) gpus=0 ;;
    --gpus) gpus=${2:?--gpus needs 'all' or a list such as 0,1}; shift ;;
    --instances) instances=${2:?--instances needs a number}; shift ;;
    --instances-per-gpu) per_gpu=${2:?--instances-per-gpu needs a number}; shift ;;
    --mps) mps=1 ;;
    --dtype) dtype=${2:?--dtype needs a value}; shift ;;
    --memory-budget-mb) budget=${2:?--memory-budget-mb needs a number}; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
for n in "$instances" "$per_gpu"; do
  [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || die "instance count '$n' must be a positive integer"
done
[[ -z "$budget" || "$budget" =~ ^[0-9]+$ ]] || die "--memory-budget-mb '$budget' must be an integer"
[[ -n "$gpus" ]] && per_gpu=${per_gpu:-${instances:-2}}  # 2 per GPU: docs/performance.md
[[ -z "$gpus" && -n "$per_gpu" ]] && die "--instances-per-gpu needs --gpus (or --gpu)"
if ((mps)); then
  [[ -n "$gpus" ]] || die "--mps shares GPUs between instances; it needs --gpus (or --gpu)"
  mps_check || exit 1  # before the set-up, not after it
fi
instances=${instances:-1}

http=${PETS_HTTP_PORT:-8000}; grpc=${PETS_GRPC_PORT:-8001}; metrics=${PETS_METRICS_PORT:-8002}
repo=$(realpath -m "${PETS_MODEL_REPOSITORY:-model_repository}")
store=$(realpath -m "${PETS_DEMO_STORE:-var/demo_store}")
key=${PETS_ADMIN_KEY:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}
export PETS_ADMIN_TOKEN=${PETS_ADMIN_TOKEN:-$key}  # read by the pets_admin model's stub

if [[ "${PETS_SKIP_SETUP:-0}" != 1 ]]; then
  bash build/setup_env.sh
  bash build/install_triton.sh
  if [[ -d cuda_ops/csrc && -f build/build_ops.sh ]]; then bash build/build_ops.sh
  else log "no build/build_ops.sh: the engine uses the PyTorch reference ops"; fi
  [[ "${PETS_DEMO_REBUILD:-0}" == 1 ]] && rm -rf "$store"
  if [[ ! -d "$store" ]]; then
    cli_help=$(.venv/bin/pets --help 2>&1 || true)
    if [[ "$cli_help" == *demo-store* ]]; then
      mkdir -p "$(dirname "$store")"
      .venv/bin/pets demo-store "$store"
    else
      log "WARNING: no 'pets demo-store' command yet; $store was not created (requests will fail until a task store exists there)"
    fi
  fi
else
  [[ -f build/triton/env.sh ]] || die "PETS_SKIP_SETUP=1 but build/triton/env.sh is missing; run without it once"
  cp -f backend/model.py build/triton/backends/pets/model.py
  mkdir -p build/triton/backends/pets_admin
  cp -f backend/pets_admin/model.py build/triton/backends/pets_admin/model.py
fi
# shellcheck source=/dev/null
source build/triton/env.sh
# Every model whose config says backend "pets" is served the same way (a repository may hold
# several, e.g. one per scheduling policy: clients/paper/fig12_online.py).
pets_models=()
for cfg in "$repo"/*/config.pbtxt; do
  grep -qE '^backend: "pets"' "$cfg" && pets_models+=("$(basename "$(dirname "$cfg")")")
done
((${#pets_models[@]})) || die "no model with backend \"pets\" in $repo (PETS_MODEL_REPOSITORY=$repo)"

# Placement, dtype, budget and store are written into a generated copy (never into the repo)
# by backend/pets/placement.py. The plain CPU case serves model_repository/ itself
# (TASK_STORE ../../var/demo_store).
if [[ -n "$gpus" ]] || ((instances != 1)) || [[ -n "$dtype$budget" || "$store" != "$root/var/demo_store" ]]; then
  gen="$root/var/model_repository_$([[ -n "$gpus" ]] && echo gpu || echo cpu)"
  place=(--src "$repo" --out "$gen" --store "$store")
  if [[ -n "$gpus" ]]; then place+=(--gpus "$gpus" --instances-per-gpu "$per_gpu")
  else place+=(--cpu-instances "$instances"); fi
  [[ -n "$dtype" ]] && place+=(--dtype "$dtype")
  [[ -n "$budget" ]] && place+=(--memory-budget-mb "$budget")
  PYTHONPATH="$root/backend${PYTHONPATH:+:$PYTHONPATH}" \
    "$root/.venv/bin/python" -m pets.placement "${place[@]}" >/dev/null \
    || die "could not place the instances (see the placement error above)"
  repo=$gen
  log "generated $repo"
fi

# MPS (build/mps.sh): a daemon already answering on CUDA_MPS_PIPE_DIRECTORY is used as it is,
# else one is started on var/mps and stopped by cleanup. The stubs inherit the variables.
if ((mps)); then mps_start "$root/var" || exit 1; fi

shopt -s nullglob
shm_before=$(ls /dev/shm/ 2>/dev/null | grep -E '^triton_.*backend_shm_region_' || true)
# setsid: the server leads its own process group, which its stubs join; after it exits,
# anything left in that group is ours and is killed by group id.
setsid tritonserver \
  --model-repository="$repo" \
  --backend-directory="$PETS_TRITON_BACKENDS" \
  --disable-auto-complete-config \
  --http-address=127.0.0.1 --http-port="$http" \
  --grpc-address=127.0.0.1 --grpc-port="$grpc" \
  --metrics-address=127.0.0.1 --metrics-port="$metrics" \
  --http-restricted-api="model-repository,shared-memory:admin-key=$key" \
  --grpc-restricted-protocol="model-repository,shared-memory:admin-key=$key" \
  --backend-config=python,shm-default-byte-size=16777216 \
  --backend-config=python,shm-growth-byte-size=16777216 \
  --exit-timeout-secs=15 \
  "${extra[@]}" &
server=$!

cleanup() {
  trap - INT TERM EXIT
  if kill -0 "$server" 2>/dev/null; then
    log "stopping tritonserver (pid $server)"
    kill -TERM "$server" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
  kill -KILL -- "-$server" 2>/dev/null && log "killed leftover stub processes of group $server"
  local f
  for f in $(ls /dev/shm/ 2>/dev/null | grep -E '^triton_.*backend_shm_region_' || true); do
    grep -qxF "$f" <<<"$shm_before" || { rm -f "/dev/shm/$f"; log "removed stale /dev/shm/$f"; }
  done
  mps_stop
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ready=0
for _ in $(seq 1 600); do
  kill -0 "$server" 2>/dev/null || break
  if python3 - "$http" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=1)
EOF
  then ready=1; break; fi
  sleep 1
done
if ((ready)); then
  log "pets is ready: HTTP 127.0.0.1:$http  gRPC 127.0.0.1:$grpc  metrics 127.0.0.1:$metrics/metrics"
  log "model repository $repo; admin-key header for the model-repository/shared-memory APIs: $key"
  log "pets_admin TOKEN (register/update/unregister tasks): \$PETS_ADMIN_TOKEN$([[ "$PETS_ADMIN_TOKEN" == "$key" ]] && echo ' = the admin key')"
  log "try: .venv/bin/python clients/infer.py --task demo_lora --text 'hello world'"
else
  kill -0 "$server" 2>/dev/null || die "tritonserver exited before it became ready (see its log above)"
  log "WARNING: not ready after 600 s; still running (see the log above)"
fi
wait "$server" || die "tritonserver exited with status $?"
