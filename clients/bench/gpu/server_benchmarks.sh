#!/usr/bin/env bash
# Triton end to end on an NVIDIA GPU host: bert-base fp16 on the GPU, 64 tasks of every
# registered PET type, perf_analyzer (gRPC, async) with a concurrency sweep at length 64. Needs
# the packed runtime (shared/tools/pack-triton-runtime.sh) at .runtime/triton-runtime.tar.xz.
#
# Then splits one execute's time into engine forward and Python-stub work
# (clients.bench.server_breakdown). Each step writes a dated run folder under OUT.
#
# usage: clients/bench/gpu/server_benchmarks.sh OUT [INSTANCES] [CONCURRENCY]
set -uo pipefail
out=${1:?usage: server_benchmarks.sh OUT [INSTANCES] [CONCURRENCY]}
instances=${2:-2}
conc=${3:-1,8,32,64,128,256}
mkdir -p "$out"
# shellcheck source=clients/bench/gpu/host_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/host_setup.sh"
store=var/gpu_store repo=var/gpu_repo
mix=$(.venv/bin/python -c \
  "from pets.pet import pet_types; print(','.join(sorted(set(pet_types()) - {'none'})))")
[[ -d $store ]] || .venv/bin/pets create $store t --count 64 --backbone bert-base \
  --pet "$mix" | tail -1
rm -rf $repo && mkdir -p $repo && cp -r model_repository/pets $repo/
sed -i -E 's|(key: "BACKBONE" value \{ string_value: )"[^"]*"|\1"bert-base"|' $repo/pets/config.pbtxt
PETS_MODEL_REPOSITORY=$repo PETS_DEMO_STORE=$store PETS_SKIP_SETUP=1 \
  setsid bash build/serve.sh --gpu --instances "$instances" >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 240); do
  curl -sf 127.0.0.1:8000/v2/models/pets/ready >/dev/null && break
  sleep 1
done
curl -sf 127.0.0.1:8000/v2/models/pets/ready >/dev/null || { tail -30 "$out/server.log"; exit 1; }
grep -m3 "pets engine" "$out/server.log"
timeout 420 .venv/bin/python -m clients.bench.perf_sweep --concurrency "$conc" \
  --make-data "--tasks-from-store $store --length 64" --out "$out" \
  --metrics-url 127.0.0.1:8002/metrics 2>&1 | tail -20
# Execute time vs engine forward time at the highest concurrency.
top=${conc##*,}
timeout 120 .venv/bin/python -m clients.bench.server_breakdown --out "$out" -- \
  .venv/bin/python -m clients.bench.perf_sweep --concurrency "$top" --out "$out" \
  --make-data "--tasks-from-store $store --length ${BREAKDOWN_LENGTH:-32}" 2>&1 | tail -2
kill -TERM -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null
tail -3 "$out/server.log"
