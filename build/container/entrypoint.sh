#!/usr/bin/env bash
# Container entry point: place the pets instances on this pod's GPUs and exec tritonserver.
#
# env (build/k8s/deployment.yaml sets them; docs/deploy.md):
#   PETS_ADMIN_KEY     required, >= 16 characters: the admin-key header of the restricted
#                      model-repository and shared-memory APIs (from a Secret)
#   PETS_ADMIN_TOKEN   the pets_admin token (from a Secret); unset: no write path
#   PETS_GPUS=all      GPUs to serve on ('all', '0,1', or 'none' for CPU instances)
#   PETS_INSTANCES_PER_GPU=2  PETS_CPU_INSTANCES=1  PETS_TASK_STORE=/store
#   PETS_DTYPE (float16 on GPUs)  PETS_MEMORY_BUDGET_MB  PETS_BACKBONE (default)
#   PETS_MODEL_PARAMS  more pets parameters, space-separated KEY=VALUE
#   PETS_MPS=1         start NVIDIA's MPS daemon in the container first, so that the GPU
#                      instances' kernels share the GPU instead of taking turns (docs/deploy.md)
# Arguments are passed on to tritonserver. The instance names and devices are written to
# /tmp/pets-instances.txt, which build/container/probe.py checks against the live stubs.
set -euo pipefail
src=${PETS_SOURCE:-/opt/pets}
repo=/tmp/model_repository
key=${PETS_ADMIN_KEY:-}
if ((${#key} < 16)); then
  echo "entrypoint: PETS_ADMIN_KEY is unset or shorter than 16 characters; set it from a Secret (docs/deploy.md)" >&2
  exit 2
fi
place=(--src "$src/model_repository" --out "$repo" --store "${PETS_TASK_STORE:-/store}")
gpus=${PETS_GPUS:-all}
if [[ "$gpus" == none ]]; then place+=(--cpu-instances "${PETS_CPU_INSTANCES:-1}")
else place+=(--gpus "$gpus" --instances-per-gpu "${PETS_INSTANCES_PER_GPU:-2}"); fi
[[ -n "${PETS_DTYPE:-}" ]] && place+=(--dtype "$PETS_DTYPE")
[[ -n "${PETS_MEMORY_BUDGET_MB:-}" ]] && place+=(--memory-budget-mb "$PETS_MEMORY_BUDGET_MB")
[[ -n "${PETS_BACKBONE:-}" ]] && place+=(--backbone "$PETS_BACKBONE")
for kv in ${PETS_MODEL_PARAMS:-}; do place+=(--set "$kv"); done
python3 -m pets.placement "${place[@]}" > /tmp/pets-instances.txt
if [[ "${PETS_MPS:-0}" == 1 ]]; then
  [[ "$gpus" != none ]] || { echo "entrypoint: PETS_MPS=1 needs GPU instances (PETS_GPUS is none)" >&2; exit 2; }
  # shellcheck source=build/mps.sh
  source "$src/build/mps.sh"
  mps_start /tmp || exit 2  # the daemon lives as long as the container
fi
exec tritonserver \
  --model-repository="$repo" \
  --backend-directory=/opt/tritonserver/backends \
  --disable-auto-complete-config \
  --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
  --http-restricted-api="model-repository,shared-memory:admin-key=$key" \
  --grpc-restricted-protocol="model-repository,shared-memory:admin-key=$key" \
  --backend-config=python,shm-default-byte-size=16777216 \
  --backend-config=python,shm-growth-byte-size=16777216 \
  --exit-timeout-secs=15 \
  "$@"
