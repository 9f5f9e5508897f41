#!/usr/bin/env bash
# Engine-level measurements on an NVIDIA GPU host (how docs/performance.md's engine figures
# were made). Runs with the host's python3 + CUDA torch and no package access; PYTHONPATH
# replaces an install. Each step is time-bounded; each benchmark writes a dated run folder
# with a manifest under OUT (clients/bench/results.py).
#
# usage: clients/bench/gpu/engine_benchmarks.sh OUT [steps...]   steps: ops bench_ops sched
#                                        parity engine profile fig12 capacity (default all)
set -uo pipefail
out=${1:?usage: engine_benchmarks.sh OUT [steps]}; shift
steps=${*:-ops bench_ops sched parity engine profile fig12 capacity}
mkdir -p "$out"
export PYTHONPATH=$PWD/backend:$PWD/cuda_ops PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
has() { [[ " $steps " == *" $1 "* ]]; }
latest() { ls -d "$out"/*_"$1" 2>/dev/null | tail -1; }  # newest run folder of a benchmark
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)  # e.g. 9.0
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} \
  PETOPS_CMAKE_ARGS=${PETOPS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=${cap/./}} \
  PYTHON=$py timeout 200 bash build/build_ops.sh 2>&1 | tail -3
# every registered PET type but "none"
mix=$($py -c "from pets.pet import pet_types; print(','.join(sorted(set(pet_types()) - {'none'})))")
if has ops; then
  timeout 240 $py -m pytest tests/ops -q 2>&1 | tail -4 | tee "$out/ops_tests.txt"
fi
if has bench_ops; then  # grouped op vs loop vs shared GEMM; eager and CUDA-graph clocks
  timeout 300 $py -m clients.bench.bench_ops --out "$out" > /dev/null 2>&1 \
    || echo "bench_ops failed"
  grep -E ",(64|256),.*(shared_gemm|grouped|memory_floor)," "$(latest bench_ops)/bench_ops.csv"
fi
if has sched; then  # DP scheduling time on this host's CPU (analytic cost model)
  timeout 200 $py -m clients.bench.bench_scheduler --sizes 256,1024 --tasks 64 --std 4 \
    --out "$out"
fi
if has parity; then
  timeout 240 $py -m clients.bench.check_device_parity --backbone bert-base --dtype float16 \
    --out "$out"
fi
if has engine; then
  timeout 300 $py -m clients.bench.bench_engine --backbone bert-base --dtype float16 --tasks 11 \
    --batch 64 --seq-len 64 --streams 0 4 --out "$out" 2>&1 | grep -v Warning
fi
if has profile; then
  timeout 200 $py -m pets.cli profile --backbone bert-base --dtype float16 --no-progress \
    --time-budget 90 -o "$out/cost_table.json" 2>&1 | tail -2
fi
if has fig12; then
  store=var/fig12_store
  [[ -d $store ]] || timeout 300 $py -m pets.cli create $store t --pet "$mix" --count 128 \
    --backbone bert-base
  table=()
  [[ -f $out/cost_table.json ]] && table=(--cost-table "$out/cost_table.json")
  timeout 420 $py -m clients.paper.fig12 --executor engine --device cuda:0 \
    --param BACKBONE=bert-base --param DTYPE=float16 --param TASK_STORE=$store "${table[@]}" \
    --out "$out" --policies fixed,beta_only,alpha_only,coordinated,token_budget,task_grouped \
    2>&1 | grep -v Warning | tail -16
fi
if has capacity; then
  timeout 330 $py -m clients.paper.table5 --backbone bert-base --dtype float16 \
    --max-tasks 20000 --checkpoints 64,1000,10000 --time-budget 280 --out "$out" 2>&1 \
    | grep -v Warning | tail -5
fi
cp build/out/libpetops.so "$out/" 2>/dev/null || true
