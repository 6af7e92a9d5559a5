#!/usr/bin/env bash
# GPU checks and benchmarks in ONE call (NCCL, bf16, Transformer Engine grouped GEMM when
# installed). Usage, from the repository root of a GPU machine:
#
#     bash scripts/gpu_check.sh [OUT_DIR]
#
# Writes OUT_DIR/gpu_check.md (default ./gpu_check_out) with the device, the date, the test
# summary and the benchmark tables; paste it into docs/benchmarks.md.
# Offline GPU machines: put wheels (megatron-core, optionally transformer-engine) in .whl/; they
# are installed into /tmp/site first. The CPU-emulation tests are skipped on CUDA machines.
set -uo pipefail
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
report="$out/gpu_check.md"
py="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then py=.venv/bin/python; fi
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
    echo '## Tests (tests/test_gpu.py)'
    echo '```'
    "$py" -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -15
    echo '```'
    echo
    echo '## Router forward+backward (benchmarks/router_overhead.py)'
    "$py" benchmarks/router_overhead.py --repeats 20 2>&1 | grep '^[#|]'
    echo
    echo "## One MoE layer, EP=$ngpu, bf16 ${te_flag} (benchmarks/moe_layer_overhead.py)"
    for topk in 1 2; do
        "$py" -m torch.distributed.run --nproc-per-node "$ngpu" benchmarks/moe_layer_overhead.py \
            --ep "$ngpu" --bf16 $te_flag --tokens 16384 --hidden 2048 --ffn 8192 \
            --experts $((8 > ngpu ? 8 : ngpu)) --topk "$topk" --repeats 20 2>&1 | grep '^[#|]'
    done
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
