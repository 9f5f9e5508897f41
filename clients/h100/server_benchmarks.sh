#!/usr/bin/env bash
# Triton end to end on a GPU host: bert-base fp16 on the GPU, 64 tasks of mixed PET types,
# perf_analyzer (gRPC, async) with a concurrency sweep at length 64. Needs the packed runtime
# (shared/tools/pack-triton-runtime.sh) at .runtime/triton-runtime.tar.xz.
#
# Then splits one execute's time into engine forward and Python-stub work (server_breakdown.py).
#
# usage: clients/h100/server_benchmarks.sh OUT [INSTANCES] [CONCURRENCY]
set -uo pipefail
out=${1:?usage: server_benchmarks.sh OUT [INSTANCES] [CONCURRENCY]}
instances=${2:-2}
conc=${3:-1,8,32,64,128,256}
mkdir -p "$out"
# shellcheck source=clients/h100/host_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/host_setup.sh"
store=var/h100_store repo=var/h100_repo
[[ -d $store ]] || .venv/bin/pets create $store t --count 64 --backbone bert-base \
  --pet bitfit,diff_pruning,maskbert,adapter,lora,ia3 | tail -1
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
timeout 420 .venv/bin/python clients/perf_sweep.py --concurrency "$conc" \
  --make-data "--tasks-from-store $store --length 64" --out "$out/sweep.csv" \
  --metrics-url 127.0.0.1:8002/metrics 2>&1 | tail -20
# Execute time vs engine forward time at the highest concurrency (clients/server_breakdown.py).
top=${conc##*,}
timeout 120 .venv/bin/python clients/server_breakdown.py -- .venv/bin/python clients/perf_sweep.py \
  --concurrency "$top" --make-data "--tasks-from-store $store --length ${BREAKDOWN_LENGTH:-32}" \
  --out "$out/breakdown_c$top.csv" 2>&1 | tail -1 | tee "$out/breakdown_c$top.json"
kill -TERM -- -"$server" 2>/dev/null; wait "$server" 2>/dev/null
tail -3 "$out/server.log"
