#!/usr/bin/env bash
# Issue 16's figures from one run on an NVIDIA GPU host (bert-base fp16, 64 tasks): the CUDA
# graph tests, the engine's wall vs GPU time (fixed shapes, and one request of 16-128 tokens
# drawn anew), the served path against a no-op Python model (concurrency 1 at fixed and drawn
# lengths, concurrency 256 at 64 tokens), backbone-only served against plain HF BERT, and a
# profile of the stub. Needs the packed runtime at .runtime/triton-runtime.tar.xz (see
# host_setup.sh). Each step is time-bounded and writes a dated run folder under OUT.
#
# usage: clients/bench/gpu/serving_path.sh OUT [steps...]
#        steps: tests forward served hf profile (default all, in that order);
#        instances (not in the default): 2 and 4 instances under MPS at concurrency 256 x 64,
#        each against the same engine in process (INSTANCES="2 4", PET_TYPES=all), for
#        the docs' "how many instances per GPU"
set -uo pipefail
out=${1:?usage: serving_path.sh OUT [steps]}; shift
steps=${*:-tests forward served hf profile}
mkdir -p "$out"
# shellcheck source=clients/bench/gpu/host_setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/host_setup.sh"
has() { [[ " $steps " == *" $1 "* ]]; }
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
served=(--kind GPU --backbone bert-base --tasks 64 --interval-ms 2500)
if has tests; then  # replay equals eager; buckets, warm-up and pool moves (CUDA only)
  timeout 180 $py -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -3 \
    | tee "$out/graph_tests.txt"
fi
if has forward; then
  timeout 240 $py -m clients.bench.forward_overhead --backbone bert-base --mixes backbone,mixed \
    --shapes 1x128,8x64,64x64,256x64,1x16:128 --iters 10 --out "$out" 2>&1 | grep '^{'
fi
if has served; then  # two instances per GPU, the documented default
  timeout 300 $py -m clients.bench.served_overhead "${served[@]}" --instances 2 \
    --points 1x128,1x16:128,256x64 --out "$out" 2>&1 | grep '^{'
fi
if has hf; then  # backbone-only tasks against HF BertForSequenceClassification, same server
  timeout 200 $py -m clients.bench.served_overhead "${served[@]}" --instances 2 \
    --pet-types none --hf --points 256x64 --out "$out" 2>&1 | grep '^{'
fi
if has instances; then  # under MPS, the instances' kernels share the GPU (docs/deploy.md)
  # shellcheck source=build/mps.sh
  source build/mps.sh
  if mps_start "$out"; then
    for n in ${INSTANCES:-2 4}; do
      timeout 500 $py -m clients.bench.served_overhead "${served[@]}" --instances "$n" \
        --pet-types "${PET_TYPES:-all}" --points 256x64 --in-process --out "$out/mps_i$n" \
        2>&1 | grep '^{'
    done
    mps_stop
  fi
fi
if has profile; then  # one instance under cProfile: where the stub's time goes
  timeout 200 $py -m clients.bench.served_overhead "${served[@]}" --instances 1 \
    --profile-stub --points 256x64 --out "$out" 2>&1 | grep '^{'
fi
