# megatron-rectify developer commands. Every target creates the virtual environment if missing.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit test-distributed test-gpu fuzz-options lint format bench-quality bench-quality-upcycle bench-quality-layout bench-quality-layout-ep8 bench-quality-layer-cost bench-perf bench-router bench-layer bench-at-scale clean-venv

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)

## The main job: train a tiny rectified MoE GPT on the embedded corpus (CPU or GPUs), summarise.
demo: setup
	$(PY) scripts/demo.py

## The whole test suite (CPU-only machines included): lint, then every tier (tests/README.md);
## the GPU tier skips itself without CUDA. About 14 minutes on 2 CPU cores (tests/README.md).
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

## Random combinations of the megatron options in docs/compatibility.md with random rectify modes
## (50 by default, seed 0; FUZZ_ARGS="--count 80 --seed 1"): each must train 2 iterations of a
## tiny MoE GPT on CPU or stop with one line. Not in CI (it trains; about 30 s per combination).
fuzz-options: setup
	$(PY) scripts/fuzz_options.py $(FUZZ_ARGS)

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

## At-scale cost model: one MoE layer and a training step per routing mode on an H100 cluster
## (Mixtral-8x7B, the paper's layouts, 64 experts top-6), validated against the CPU layer benchmark
## with this machine's calibrated GEMM rate and gloo bandwidth. Writes docs/results/at-scale.md +
## .json + .png; about 2 minutes on 2 CPU cores. AT_SCALE_ARGS="--report-only" to rebuild the page.
bench-at-scale: setup
	$(PY) -m benchmarks.at_scale $(AT_SCALE_ARGS)

## Quality reproduction of the paper (grid, capacity sweep, inference-only rectification, LB on/off;
## 3 seeds): trains small MoE GPTs, writes docs/results/quality.md + quality_*.png. Finished runs are
## cached in benchmarks/quality/runs/ (an interrupted run resumes). QUALITY_ARGS="--quick" to smoke
## test, "--gpus 8 --preset gpu" on a GPU node, "--help" for the rest.
bench-quality: setup
	$(PY) -m benchmarks.quality $(QUALITY_ARGS)

## The paper's recipe: one dense model first, then its upcycled MoE variants (Top-1 grid, Top-2 and
## Top-2+FR+IR at cf 1.0, inference-only rectification, 3 seeds, 22 runs, about 20 minutes on 2 CPU
## cores); writes docs/results/quality_upcycle.md + quality_upcycle_*.png.
bench-quality-upcycle: setup
	$(PY) -m benchmarks.quality --recipe upcycle --experiments grid,inference \
		--variants 'Top-1,Top-1 (gate 1),Top-1+IR,Top-1+FR,Top-1+FR+IR,Top-2,Top-2+FR+IR' \
		$(QUALITY_ARGS)

## The paper's layout (one expert per EP rank: 4 experts on EP 4, 4 gloo processes) against the same
## model with all 4 experts on every rank (EP 1, same 4 processes and batch): Top-1, +IR, +FR, +FR+IR
## at cf 1.0 and 0.5, 3 seeds, 48 runs, about 45 minutes on 2 CPU cores (36-105 s per run); writes
## docs/results/quality_layout_ep{4,1}.md and quality_layout_cf05_ep{4,1}.md.
LAYOUT_ARGS = --nproc 4 --num-experts 4 --micro-batch-size 4
LAYOUT_CF1 = --experiments grid --variants 'Top-1,Top-1+IR,Top-1+FR,Top-1+FR+IR'
LAYOUT_CF05 = --experiments capacity --capacities 0.5 --variants 'Top-1,Top-1+IR,Top-1+FR,Top-1+FR+IR'
bench-quality-layout: setup
	$(PY) -m benchmarks.quality $(LAYOUT_ARGS) $(LAYOUT_CF1) --expert-parallel 4 \
		--report-name quality_layout_ep4 $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality $(LAYOUT_ARGS) $(LAYOUT_CF1) --expert-parallel 1 \
		--report-name quality_layout_ep1 $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality $(LAYOUT_ARGS) $(LAYOUT_CF05) --expert-parallel 4 \
		--report-name quality_layout_cf05_ep4 $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality $(LAYOUT_ARGS) $(LAYOUT_CF05) --expert-parallel 1 \
		--report-name quality_layout_cf05_ep1 $(QUALITY_ARGS)

## The paper's layout with 8 experts: one per rank (EP 8) against four per rank (EP 2, the main
## study's layout), both on the same 8 gloo processes and batch (2 sequences per rank): Top-1, +IR,
## +FR, +FR+IR at cf 1.0, 3 seeds, 24 runs; writes docs/results/quality_layout_8x_ep{8,2}.md.
LAYOUT_8X_ARGS = --nproc 8 --num-experts 8 --micro-batch-size 2 $(LAYOUT_CF1)
bench-quality-layout-ep8: setup
	$(PY) -m benchmarks.quality $(LAYOUT_8X_ARGS) --expert-parallel 8 \
		--report-name quality_layout_8x_ep8 $(QUALITY_ARGS)
	$(PY) -m benchmarks.quality $(LAYOUT_8X_ARGS) --expert-parallel 2 \
		--report-name quality_layout_8x_ep2 $(QUALITY_ARGS)

## Measured cost of the quality model's MoE layer (Top-1/Top-2, vanilla/FR+IR; ~3 minutes):
## docs/results/quality_layer_cost.json, for the compute-matched table in docs/results.md.
bench-quality-layer-cost: setup
	$(PY) -m benchmarks.quality.layer_cost

clean-venv:
	rm -rf $(VENV)
