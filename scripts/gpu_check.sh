#!/usr/bin/env bash
# GPU checks and benchmarks in ONE call (NCCL, bf16, Transformer Engine grouped GEMM when
# installed). Usage, from the repository root of a GPU machine:
#
#     bash scripts/gpu_check.sh [OUT_DIR]
#
# Writes OUT_DIR/gpu_check.md (default ./gpu_check_out) with the device, the date, the test
# summary and the benchmark tables, and OUT_DIR/perf/ with the cost benchmarks' JSON, report
# (perf.md) and plots: the GPU counterpart of docs/results/perf.md (`make bench-perf` on CPU).
# Offline GPU machines: put wheels (megatron-core, optionally transformer-engine) in .whl/; they
# are installed into /tmp/site first. The CPU-emulation tests are skipped on CUDA machines.
#
# GPU_CHECK_DRY_RUN=1 (any machine): print the benchmark commands instead of running anything,
# with GPU_CHECK_NGPU GPUs (default 8) and GPU_CHECK_TE=1 to pretend Transformer Engine is there;
# tests/unit/test_bench_perf.py uses it to check the commands against the benchmark's CLI.
set -uo pipefail
out="${1:-${OUT:-gpu_check_out}}"
dry_run="${GPU_CHECK_DRY_RUN:-}"
py="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi

# The torchrun command of the cost benchmarks (router, layer, iteration, bytes) on all GPUs, bf16.
perf_command() {  # ngpu te_flag out_dir
    echo "$py -m torch.distributed.run --nproc-per-node $1 -m benchmarks.perf --preset gpu --bf16 $2 --out $3"
}

if [ -n "$dry_run" ]; then
    te_dry=""; [ -n "${GPU_CHECK_TE:-}" ] && te_dry="--te"
    perf_command "${GPU_CHECK_NGPU:-8}" "$te_dry" "$out/perf"
    exit 0
fi
mkdir -p "$out"
report="$out/gpu_check.md"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$ngpu" -lt 1 ]; then echo "gpu_check: no CUDA GPU visible" >&2; exit 1; fi
te_flag=""
if "$py" -c 'import transformer_engine.pytorch' 2>/dev/null; then te_flag="--te"; fi
{
    echo "# GPU check, $(date -u +%Y-%m-%d), $("$py" -c 'import torch; print(torch.cuda.get_device_name())') x$ngpu"
    echo
    echo "torch $("$py" -c 'import torch; print(torch.__version__)'), megatron-core $("$py" -c 'import megatron.core as m; print(m.__version__)'), TE: ${te_flag:-not installed}"
    echo
    echo '## Tests (tests/gpu/test_gpu.py)'
    echo '```'
    "$py" -m pytest tests/gpu/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15
    echo '```'
    echo
    echo "## Cost benchmarks, x$ngpu GPUs, bf16 ${te_flag} (benchmarks/perf)"
    echo
    echo "Command: \`$(perf_command "$ngpu" "$te_flag" "$out/perf")\`; full report with plots:"
    echo "$out/perf/perf.md (tokens/s, TFLOP/s per GPU and peak memory, vanilla vs IR+FR)."
    echo
    if $(perf_command "$ngpu" "$te_flag" "$out/perf") > "$out/perf.log" 2>&1; then
        sed -n '/^## Headline/,/^!\[/p' "$out/perf/perf.md" | grep -v '^!\['
    else
        echo "benchmarks/perf FAILED, last lines of $out/perf.log:"
        echo '```'; tail -30 "$out/perf.log"; echo '```'
    fi
    echo
    echo "## Short real training, EP=$ngpu, bf16 ${te_flag}: vanilla vs IR+FR (pretrain_gpt_rectify.py)"
    echo "| routing | ms/iteration | tokens/s per GPU | TFLOP/s per GPU | final lm loss |"
    echo "|---|---:|---:|---:|---:|"
    impl=local; [ -n "$te_flag" ] && impl=transformer_engine
    for rectify in none ir+fr; do
        log="$out/train_${rectify/+/_}.log"
        "$py" -m torch.distributed.run --nproc-per-node "$ngpu" pretrain_gpt_rectify.py \
            --num-layers 8 --hidden-size 1024 --ffn-hidden-size 4096 --num-attention-heads 16 \
            --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 4 \
            --global-batch-size $((4 * ngpu * 2)) --train-iters 60 --lr 3e-4 --log-interval 10 \
            --log-throughput --eval-iters 0 --bf16 --transformer-impl "$impl" \
            --num-experts $((8 > ngpu ? 8 : ngpu)) --moe-router-topk 1 --moe-router-pre-softmax \
            --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity \
            --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0.01 \
            --expert-model-parallel-size "$ngpu" --moe-rectify "$rectify" \
            --moe-rectify-ir-trigger ignore_kth $([ -n "$te_flag" ] && echo --moe-grouped-gemm) \
            > "$log" 2>&1
        ms=$(grep -oE 'elapsed time per iteration \(ms\): [0-9.]+' "$log" | tail -1 | awk '{print $NF}')
        tflops=$(grep -oE 'throughput per GPU \(TFLOP/s/GPU\): [0-9.]+' "$log" | tail -1 | awk '{print $NF}')
        loss=$(grep -oE 'lm loss: [0-9.E+-]+' "$log" | tail -1 | awk '{print $NF}')
        tokens=$("$py" -c "print(round(4 * 2 * 2048 / (${ms:-0} / 1000)) if '${ms}' else 'n/a')")
        echo "| $rectify | ${ms:-failed} | $tokens | ${tflops:-n/a} | ${loss:-n/a} |"
    done
} | tee "$report"
