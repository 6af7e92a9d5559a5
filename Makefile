# megatron-rectify developer commands. Every target creates the virtual environment if missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint format bench-router bench-layer clean-venv

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)

## The main job: train a tiny rectified MoE GPT on the embedded corpus (CPU or GPUs), summarise.
demo: setup
	$(PY) scripts/demo.py

## The whole test suite (CPU-only machines included): lint, then pytest.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Router forward+backward cost: RectifyRouter (IR+FR) / TopKRouter, same process.
bench-router: setup
	$(PY) benchmarks/router_overhead.py

## One MoE layer forward+backward: rectified / megatron, 2 gloo processes (torchrun on GPUs).
bench-layer: setup
	$(PY) benchmarks/moe_layer_overhead.py --repeats 20

clean-venv:
	rm -rf $(VENV)
