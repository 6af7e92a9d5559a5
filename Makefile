# megatron-rectify developer commands. Every target creates the virtual environment if missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint format bench-router clean-venv

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)

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

clean-venv:
	rm -rf $(VENV)
