#!/usr/bin/env bash
# The paper's ablation grid as one script: Top-1, Top-1+IR, Top-1+FR, Top-1+FR+IR and the same
# four for Top-2, at each capacity factor. Each variant trains the same model on the same data
# with the same seed; logs go to $OUT_DIR/<variant>.log and a summary table is printed at the end.
#
#   bash examples/moe_rectify/ablation_grid.sh                      # CPU: tiny model, 2 processes
#   GPUS=8 ITERS=5000 bash examples/moe_rectify/ablation_grid.sh    # GPU node
#   CAPACITY_FACTORS="0.5 1.0 1.5" bash examples/moe_rectify/ablation_grid.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out_dir="${OUT_DIR:-ablation_logs}"
mkdir -p "$out_dir"
capacity_factors="${CAPACITY_FACTORS:-1.0}"
iters="${ITERS:-200}"
python_bin="${PYTHON:-.venv/bin/python}"
data_path=$("$python_bin" -c 'from megatron.rectify.data import ensure_embedded_corpus as e; print(e())')
if [ -n "${GPUS:-}" ]; then
    nproc="$GPUS"
    size_args=(--num-layers 8 --hidden-size 512 --num-attention-heads 8 --seq-length 1024
               --max-position-embeddings 1024 --micro-batch-size 8 --global-batch-size 128
               --bf16 --expert-model-parallel-size "$GPUS")
else
    nproc=2
    size_args=(--cpu-emulation
               --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 128
               --max-position-embeddings 128 --micro-batch-size 4 --global-batch-size 16
               --expert-model-parallel-size 2)
fi
variants=("1 none" "1 ir" "1 fr" "1 ir+fr" "2 none" "2 ir" "2 fr" "2 ir+fr")
printf "| variant | capacity | final train lm loss | test lm loss |\n|---|---:|---:|---:|\n" \
    > "$out_dir/summary.md"
for capacity in $capacity_factors; do
    for variant in "${variants[@]}"; do
        set -- $variant
        topk=$1 rectify=$2
        name="top${topk}_${rectify}_cf${capacity}"
        trigger=all; [ "$rectify" = "ir+fr" ] && trigger=ignore_kth
        [ "$topk" = "2" ] && [ "$rectify" = "ir" ] && trigger=any
        extra=(); [ "$topk" = "1" ] && extra+=(--moe-router-pre-softmax)
        echo "== $name"
        "$python_bin" -m torch.distributed.run --nproc-per-node "$nproc" pretrain_gpt_rectify.py \
            "${size_args[@]}" --train-iters "$iters" --lr 1e-3 --min-lr 1e-4 \
            --lr-decay-style cosine --lr-warmup-iters 10 --log-interval 10 \
            --eval-interval "$iters" --eval-iters 10 --split 98,1,1 --seed 1234 \
            --num-experts 8 --moe-router-topk "$topk" "${extra[@]}" \
            --moe-expert-capacity-factor "$capacity" --moe-pad-expert-input-to-capacity \
            --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0.01 \
            --moe-rectify "$rectify" --moe-rectify-ir-trigger "$trigger" \
            --data-path "$data_path" --tokenizer-type ByteLevel \
            > "$out_dir/$name.log" 2>&1
        train=$(grep -oE 'lm loss: [0-9.E+-]+' "$out_dir/$name.log" | tail -1 | cut -d' ' -f3)
        test=$(grep -oE 'on test set \| lm loss value: [0-9.E+-]+' "$out_dir/$name.log" | tail -1 \
               | awk '{print $NF}')
        printf "| %s | %s | %s | %s |\n" "top-$topk $rectify" "$capacity" "$train" "$test" \
            >> "$out_dir/summary.md"
    done
done
cat "$out_dir/summary.md"
