# pets: `make serve` serves, `make test` tests. Everything installs itself (build/setup_env.sh).
SHELL := /bin/bash
PY := .venv/bin/python
# venv tools (cmake/ninja from pip when the machine has none) come first
export PATH := $(CURDIR)/.venv/bin:$(PATH)
DEMO_STORE ?= var/demo_store
BENCH_ARGS ?=
GPUS ?=
SERVE_ARGS ?=
PAPER_ARGS ?=
CLANG_FORMAT ?= .venv/bin/clang-format
CXX_SOURCES = find cuda_ops/csrc \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0

.PHONY: serve test test-fast setup triton ops demo lint typecheck format bench paper clean distclean \
	check-kernels

# GPUS=all or GPUS=0,1 serves on those GPUs (build/serve.sh --gpus; docs/deploy.md);
# SERVE_ARGS passes more serve.sh options, e.g. SERVE_ARGS="--instances-per-gpu 3".
serve:
	bash build/serve.sh $(if $(GPUS),--gpus $(GPUS)) $(SERVE_ARGS)

setup:
	bash build/setup_env.sh

triton: setup
	bash build/install_triton.sh

ops: setup
	@if [[ -d cuda_ops/csrc && -f build/build_ops.sh ]]; then bash build/build_ops.sh; \
	else echo "ops: no build/build_ops.sh; the PyTorch reference ops are used"; fi

demo: setup
	@if [[ -d $(DEMO_STORE) ]]; then echo "demo: $(DEMO_STORE) exists"; \
	else mkdir -p $(dir $(DEMO_STORE)) && .venv/bin/pets demo-store $(DEMO_STORE); fi

# Everything: unit, op, oracle, scheduling and the real-server end-to-end tests.
test: triton ops demo
	$(PY) -m pytest -q

# The inner loop: no tritonserver, nothing marked slow.
test-fast: ops
	$(PY) -m pytest -q -m "not triton and not slow"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(CXX_SOURCES) | xargs -0 $(CLANG_FORMAT) --dry-run --Werror --style=file
	.venv/bin/mypy

# nvcc without a GPU: compile every CUDA kernel, print registers and spills (ARCH=sm_80).
check-kernels: setup
	bash build/check_kernels.sh

typecheck: setup
	.venv/bin/mypy

# Python with ruff, C++/CUDA with clang-format (both from the dev extras).
format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
	$(CXX_SOURCES) | xargs -0 $(CLANG_FORMAT) -i --style=file

# Against a running server (make serve): perf_analyzer concurrency sweep over the demo tasks.
bench: triton
	$(PY) -m clients.bench.perf_sweep $(BENCH_ARGS)

# The PetS paper's evaluation, every experiment (docs/paper.md); PAPER_ARGS="--quick" shrinks it.
paper: triton ops
	$(PY) -m clients.paper all $(PAPER_ARGS)

clean:
	rm -rf build/triton build/out build/cmake var .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf .venv
