# pets: `make serve` serves, `make test` tests. Everything installs itself (build/setup_env.sh).
SHELL := /bin/bash
PY := .venv/bin/python
# venv tools (cmake/ninja from pip when the machine has none) come first
export PATH := $(CURDIR)/.venv/bin:$(PATH)
DEMO_STORE ?= var/demo_store
BENCH_ARGS ?=

.PHONY: serve test setup triton ops demo lint format bench clean distclean

serve:
	bash build/serve.sh

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

test: triton ops demo
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Against a running server (make serve): perf_analyzer concurrency sweep over the demo tasks.
bench: triton
	$(PY) clients/perf_sweep.py $(BENCH_ARGS)

clean:
	rm -rf build/triton build/out build/cmake var .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf .venv
