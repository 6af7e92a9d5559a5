# megatron-rectify developer commands. Every target creates the virtual environment if missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit test-distributed test-gpu lint format bench-quality bench-quality-upcycle bench-perf bench-router bench-layer clean-venv

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)

## The main job: train a tiny rectified MoE GPT on the embedded corpus (CPU or GPUs), summarise.
demo: setup
	$(PY) scripts/demo.py

## The whole test suite (CPU-only machines included): lint, then every tier (tests/README.md);
## the GPU tier skips itself without CUDA. About 10.5 minutes on 2 CPU cores.
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

## Tier 1: single-process tests (routing math, config, CLI, tokenizer, in-process megatron); ~40 s.
test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

## Tier 2: gloo process groups, torchrun and subprocess training runs (CPU emulation); ~10 min.
test-distributed: setup
	$(PY) -m pytest tests/distributed $(PYTEST_ARGS)

## Tier 3: CUDA only (NCCL, bf16, Transformer Engine); skipped on a machine without a GPU.
test-gpu: setup
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## Cost benchmarks, rectified / vanilla in the same run: router, MoE layer, training iteration,
## EP all-to-all bytes (vs a re-dispatch baseline). Writes docs/results/perf.md, perf_*.json and
## perf_*.png; about 10-15 minutes on 2 CPU cores. BENCH_ARGS="--preset full" for a bigger sweep.
bench-perf: setup
	$(PY) -m benchmarks.perf $(BENCH_ARGS)

## Only the router part (refreshes its JSON and the report).
bench-router: setup
	$(PY) -m benchmarks.perf --parts router $(BENCH_ARGS)

## Only the MoE layer part (gloo processes on CPU; torchrun on GPUs, see scripts/gpu_check.sh).
bench-layer: setup
	$(PY) -m benchmarks.perf --parts layer $(BENCH_ARGS)

## Quality reproduction of the paper (grid, capacity sweep, inference-only rectification, LB on/off;
## 3 seeds): trains small MoE GPTs, writes docs/results/quality.md + quality_*.png. Finished runs are
## cached in benchmarks/quality/runs/ (an interrupted run resumes). QUALITY_ARGS="--quick" to smoke
## test, "--gpus 8 --preset gpu" on a GPU node, "--help" for the rest.
bench-quality: setup
	$(PY) -m benchmarks.quality $(QUALITY_ARGS)

## The paper's recipe: one dense model first, then its upcycled MoE variants (Top-1 grid at cf 1.0 and
## inference-only rectification, 3 seeds, 16 runs, about 13 minutes on 2 CPU cores); writes
## docs/results/quality_upcycle.md + quality_upcycle_*.png.
bench-quality-upcycle: setup
	$(PY) -m benchmarks.quality --recipe upcycle --experiments grid,inference \
		--variants 'Top-1,Top-1 (gate 1),Top-1+IR,Top-1+FR,Top-1+FR+IR' $(QUALITY_ARGS)

clean-venv:
	rm -rf $(VENV)
