# Shared flag sets for the example scripts (sourced, not run).
# A small Mixtral-like rectified MoE GPT; override any flag by appending it on the command line.

RECTIFY_MOE_ARGS=(
    --num-experts 8
    --moe-router-topk "${TOPK:-1}"
    --moe-expert-capacity-factor "${CAPACITY_FACTOR:-1.0}"
    --moe-pad-expert-input-to-capacity
    --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 0.01
    --moe-rectify "${RECTIFY:-ir+fr}"
    --moe-rectify-ir-trigger "${IR_TRIGGER:-ignore_kth}"
)
if [ "${TOPK:-1}" = "1" ]; then RECTIFY_MOE_ARGS+=(--moe-router-pre-softmax); fi

TRAINING_ARGS=(
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --log-interval 10 --eval-interval 500 --eval-iters 20
    --save-interval 1000 --split 98,1,1
)
