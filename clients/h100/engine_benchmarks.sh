#!/usr/bin/env bash
# Engine-level measurements on a GPU host (how the README's H100 engine figures were made).
# Runs with the host's python3 + CUDA torch and no package access; PYTHONPATH replaces an
# install. Each step is time-bounded; results land in OUT.
#
# usage: clients/h100/engine_benchmarks.sh OUT [steps...]   steps: ops bench_ops sched parity
#                                           engine profile fig12 capacity (default all)
set -uo pipefail
out=${1:?usage: engine_benchmarks.sh OUT [steps]}; shift
steps=${*:-ops bench_ops sched parity engine profile fig12 capacity}
mkdir -p "$out"
export PYTHONPATH=$PWD/backend:$PWD/cuda_ops:$PWD/clients PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
has() { [[ " $steps " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
PYTHON=$py timeout 200 bash build/build_ops.sh 2>&1 | tail -3
mix=bitfit,diff_pruning,maskbert,adapter,lora,ia3
if has ops; then
  timeout 240 $py -m pytest tests/ops -q 2>&1 | tail -4 | tee "$out/ops_tests.txt"
fi
if has bench_ops; then  # grouped op vs loop vs shared GEMM; eager and CUDA-graph clocks
  timeout 300 $py clients/bench_ops.py --out "$out/bench_ops" > /dev/null 2>&1 \
    || echo "bench_ops failed"
  grep -E ",(64|256),.*(shared_gemm|grouped|memory_floor)," "$out/bench_ops/bench_ops.csv"
fi
if has sched; then  # DP scheduling time on this host's CPU (analytic cost model)
  lscpu | grep -m1 "Model name" | tee "$out/cpu.txt"
  timeout 200 $py clients/bench_scheduler.py --sizes 256,1024 --tasks 64 --std 4 \
    | tee "$out/bench_scheduler.txt"
fi
if has parity; then
  timeout 240 $py clients/check_device_parity.py --backbone bert-base --dtype float16 \
    | tee "$out/parity.jsonl"
fi
if has engine; then
  timeout 300 $py clients/bench_engine.py --backbone bert-base --dtype float16 --tasks 11 \
    --batch 64 --seq-len 64 --streams 0 4 --out "$out" 2>&1 | grep -v Warning
fi
if has profile; then
  timeout 200 $py -m pets.cli profile --backbone bert-base --dtype float16 --no-progress \
    --time-budget 90 -o "$out/cost_table.json" 2>&1 | tail -2
fi
if has fig12; then
  store=var/fig12_store
  [[ -d $store ]] || timeout 300 $py -m pets.cli create $store t --pet $mix --count 128 \
    --backbone bert-base
  table=()
  [[ -f $out/cost_table.json ]] && table=(--cost-table "$out/cost_table.json")
  timeout 420 $py clients/fig12.py --executor engine --device cuda:0 --param BACKBONE=bert-base \
    --param DTYPE=float16 --param TASK_STORE=$store "${table[@]}" --out "$out/fig12" \
    --policies fixed,beta_only,alpha_only,coordinated,token_budget,task_grouped 2>&1 \
    | grep -v Warning | tail -16
fi
if has capacity; then
  timeout 330 $py clients/capacity_experiment.py --backbone bert-base --dtype float16 \
    --max-tasks 20000 --checkpoints 64,1000,10000 --time-budget 280 --out "$out" 2>&1 \
    | grep -v Warning | tail -5
fi
cp build/out/libpetops.so "$out/" 2>/dev/null || true
