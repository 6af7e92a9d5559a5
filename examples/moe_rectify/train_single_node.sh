#!/usr/bin/env bash
# One node, all its GPUs: a ~1B-parameter rectified MoE GPT (8 experts, top-1, IR+FR), bf16,
# Transformer Engine spec (grouped GEMM), expert parallel over the node's GPUs.
#
#   DATA_PATH=/data/my_corpus_text_document TOKENIZER=/models/llama-tokenizer \
#   CHECKPOINTS=/ckpt/run1 bash examples/moe_rectify/train_single_node.sh [extra megatron flags]
#
# Without DATA_PATH the embedded corpus (Python's standard library, byte-level tokens) is used.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/moe_rectify/common.sh
gpus="${GPUS:-$(nvidia-smi -L | wc -l)}"
data_args=(--data-path "${DATA_PATH:-$(python -c 'from megatron.rectify.data import ensure_embedded_corpus as e; print(e())')}")
if [ -n "${TOKENIZER:-}" ]; then
    data_args+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER")
else
    data_args+=(--tokenizer-type ByteLevel)  # the embedded corpus is byte-level
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc-per-node "$gpus" pretrain_gpt_rectify.py \
    --num-layers 16 --hidden-size 1024 --ffn-hidden-size 3584 --num-attention-heads 16 \
    --group-query-attention --num-query-groups 4 --seq-length 2048 --max-position-embeddings 2048 \
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --micro-batch-size 4 --global-batch-size 256 --train-iters 20000 \
    --bf16 --transformer-impl transformer_engine --moe-grouped-gemm \
    --expert-model-parallel-size "$gpus" \
    "${RECTIFY_MOE_ARGS[@]}" "${TRAINING_ARGS[@]}" "${data_args[@]}" \
    --save "${CHECKPOINTS:-checkpoints/single_node}" --load "${CHECKPOINTS:-checkpoints/single_node}" \
    "$@"
