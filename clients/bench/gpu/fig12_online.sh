#!/usr/bin/env bash
# PetS Fig. 12 online on an NVIDIA GPU host: one tritonserver serving one bert-base fp16 model
# per scheduling policy (clients.paper.fig12_online), perf_analyzer gRPC async at concurrency
# 128, over a 128-task store of every registered PET type. Needs the packed runtime
# (shared/tools/pack-triton-runtime.sh) at .runtime/triton-runtime.tar.xz. The run folder
# (with its manifest) lands under OUT.
#
# usage: clients/bench/gpu/fig12_online.sh OUT TASKS [STDS] [COST_TABLE]
#   TASKS  comma list of task counts (first N tasks of the store), e.g. 32,64,128
set -uo pipefail
out=${1:?usage: fig12_online.sh OUT TASKS [STDS] [COST_TABLE]}
tasks=${2:?TASKS, e.g. 32,64,128}
stds=${3:-1,2,4,8}
table=${4:-}
mkdir -p "$out"
# shellcheck source=clients/bench/gpu/host_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/host_setup.sh"
store=var/fig12_store
mix=$(.venv/bin/python -c \
  "from pets.pet import pet_types; print(','.join(sorted(set(pet_types()) - {'none'})))")
[[ -d $store ]] || timeout 300 .venv/bin/pets create $store t --count 128 --backbone bert-base \
  --pet "$mix" | tail -1
extra=()
[[ -n $table ]] && extra=(--cost-table "$table")
timeout ${F12_TIMEOUT:-500} .venv/bin/python -m clients.paper.fig12_online --store $store \
  --backbone bert-base --serve-args=--gpu --tasks "$tasks" --stds "$stds" --concurrency 128 \
  --interval-ms 2000 --out "$out" "${extra[@]}" 2>&1 | grep -v Warning
