#!/usr/bin/env bash
# The GPU check, sized for the machine a session is lent: ONE NVIDIA H200 (141 GB), 16 CPU cores,
# no network, Python 3.12 with torch (CUDA 13), pytest, transformers, safetensors, tensorboard,
# but neither megatron-core nor Transformer Engine; 15 device minutes per session (1-2 of them
# start-up), at most 10 per command. One command runs, each step bounded in time:
#
#   tests       tests/gpu: NCCL, bf16, bit-identity with megatron, and no host sync in FR's (and
#               static IR's) forward+backward under torch.cuda.set_sync_debug_mode("error")
#   bench       router and MoE layer forward+backward at Mixtral-like sizes (hidden 4096, FFN
#               14336, 8 experts, top-1/2, 8k-16k tokens, capacity 0.5 / 1.0 / dropless vanilla,
#               SequentialMLP): rectified / vanilla time (CUDA events), TFLOP/s, peak memory;
#               host syncs per layer call (benchmarks.perf --preset h200)
#   train_none  60 iterations of a 0.57 B-parameter MoE GPT (8 layers, hidden 1024, 8 experts,
#   train_irfr  top-1, capacity 1.0, seq 2048, 16k tokens per iteration, bf16, local spec without
#               TE) with megatron's routing, then with IR+FR: ms/iteration, tokens/s, TFLOP/s
#
# Before, on a CPU machine that reaches PyPI: `bash scripts/fetch_gpu_wheels.sh` puts the
# megatron-core 0.19.2 wheel for Python 3.12 (2.4 MB) into .whl/ (git-ignored); the device run
# carries it (the run tool's `carry: [".whl"]`; repository + wheels are ~4 MB of the 64 MiB).
# Here the wheels are installed into /tmp/gpu_check_site unless megatron-core is importable.
#
#   bash scripts/gpu_check.sh --dry-run            # the plan: steps, estimates, commands, wheels
#   bash scripts/gpu_check.sh --budget-s 540       # everything (~6 min estimated), on the GPU
#   bash scripts/gpu_check.sh --only bench,train_irfr --budget-s 300     # rerun some steps
#
# Options: --budget-s N (default 540): seconds for the whole run; a step starts only if its
# estimate fits in what is left (else a "skipped" line in the report) and is killed at
# min(its cap, what is left). --only STEP[,STEP]: run only these steps. --out DIR (or one
# positional OUT_DIR; default $OUT, else gpu_check_out). --dry-run: print the plan and exit.
#
# Writes OUT_DIR/gpu_check.md in the format of docs/results/gpu.md (device, date, command,
# per-step status, results; rewritten after every step, so a run cut short keeps what it has),
# OUT_DIR/logs/<step>.log, and OUT_DIR/perf/ (benchmark JSON + perf.md). Copy gpu_check.md
# over docs/results/gpu.md.
#
# Environment: PYTHON (interpreter; default .venv/bin/python if present, else python3).
# GPU_CHECK_DRY_RUN=1 is --dry-run; there GPU_CHECK_NGPU (default 1) and GPU_CHECK_TE=1 (pretend
# Transformer Engine) shape the commands. GPU_CHECK_FAKE=1 (tests of the budget logic, any
# machine): no wheel, no python, every step is `sleep $GPU_CHECK_FAKE_SLEEP` (default 0) with a
# 1 s estimate. tests/unit/test_gpu_check_plan.py checks the plan and the budget logic.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

STEPS=(tests bench train_none train_irfr)
# Estimates (seconds, one H200) and hard caps; how they were made: docs/benchmarks.md, "GPU".
declare -A EST=([tests]=60 [bench]=120 [train_none]=75 [train_irfr]=75)
declare -A CAP=([tests]=180 [bench]=300 [train_none]=180 [train_irfr]=180)
declare -A WHAT=(
    [tests]="tests/gpu (NCCL, bf16, bit-identity, no host sync in FR / static IR)"
    [bench]="router + MoE layer cost at Mixtral-like sizes, host syncs (benchmarks.perf --preset h200)"
    [train_none]="60 training iterations, 0.57 B MoE GPT, megatron's routing"
    [train_irfr]="60 training iterations, 0.57 B MoE GPT, IR+FR"
)
SETUP_EST=20
WHEEL_HINT="megatron-core 0.19.2, cp312 manylinux (scripts/fetch_gpu_wheels.sh)"
SITE=/tmp/gpu_check_site

budget_s=540
dry_run="${GPU_CHECK_DRY_RUN:-}"
fake="${GPU_CHECK_FAKE:-}"
only=""
out="${OUT:-gpu_check_out}"
command_line="bash scripts/gpu_check.sh $*"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --budget-s) budget_s="${2:?--budget-s needs seconds}"; shift ;;
        --budget-s=*) budget_s="${1#*=}" ;;
        --only) only="${2:?--only needs step names}"; shift ;;
        --only=*) only="${1#*=}" ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        --out=*) out="${1#*=}" ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done
if ! [[ "$budget_s" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: error: --budget-s takes whole seconds, got '$budget_s'" >&2
    exit 2
fi
for step in ${only//,/ }; do
    if [ -z "${EST[$step]:-}" ]; then
        echo "gpu_check.sh: error: --only: unknown step '$step' (steps: ${STEPS[*]})" >&2
        exit 2
    fi
done

py="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
ngpu="${GPU_CHECK_NGPU:-1}"
te=""
[ -n "${GPU_CHECK_TE:-}" ] && te=1

selected() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

# ---- the commands ---------------------------------------------------------------------------

# The 0.57 B-parameter MoE GPT: 8 layers x (attention 4.2 M + 8 experts x 8.4 M) parameters;
# per token 0.81 GFLOP (forward+backward, top-1, seq 2048); 16384 tokens per iteration per GPU
# (2 micro-batches of 4 x 2048). Data: the embedded corpus (Python's standard library, byte-level;
# built once into data/cache/ in well under a second).
TRAIN_MODEL="--num-layers 8 --hidden-size 1024 --ffn-hidden-size 4096 --moe-ffn-hidden-size 4096 \
--num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 4 \
--train-iters 60 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 10 \
--weight-decay 0.01 --clip-grad 1.0 --hidden-dropout 0 --attention-dropout 0 --seed 1234 \
--log-interval 10 --log-throughput --eval-iters 0 --bf16 \
--num-experts 8 --moe-router-topk 1 --moe-router-pre-softmax --moe-expert-capacity-factor 1.0 \
--moe-pad-expert-input-to-capacity --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0.01"

train_command() {  # routing (none | ir+fr)
    local impl="--transformer-impl local --no-gradient-accumulation-fusion \
--no-masked-softmax-fusion --no-rope-fusion --no-persist-layer-norm"  # no TE / apex kernels
    [ -n "$te" ] && impl="--transformer-impl transformer_engine --moe-grouped-gemm"
    local rectify="--moe-rectify $1"
    [ "$1" != none ] && rectify="$rectify --moe-rectify-ir-trigger ignore_kth"
    echo "$py -m torch.distributed.run --standalone --nproc-per-node $ngpu pretrain_gpt_rectify.py" \
        "$TRAIN_MODEL --global-batch-size $((8 * ngpu)) --expert-model-parallel-size $ngpu" \
        "$impl $rectify"
}

step_command() {  # step
    case "$1" in
        tests) echo "$py -m pytest tests/gpu -q -rs -p no:cacheprovider" ;;
        bench) echo "$py -m torch.distributed.run --standalone --nproc-per-node $ngpu -m" \
            "benchmarks.perf --preset h200 --parts router layer syncs --bf16${te:+ --te}" \
            "--out $out/perf" ;;
        train_none) train_command none ;;
        train_irfr) train_command ir+fr ;;
    esac
}

# ---- sizes ----------------------------------------------------------------------------------

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

wheel_lines() {  # the wheels in .whl/ with their sizes, and the total with the repository
    local total=0 size repo
    for wheel in .whl/*.whl; do
        [ -e "$wheel" ] || continue
        size=$(stat -c %s "$wheel")
        total=$((total + size))
        echo "  $wheel  $(mib "$size")"
    done
    if [ "$total" -eq 0 ]; then
        echo "  none in .whl/: run \`bash scripts/fetch_gpu_wheels.sh\` where pip reaches PyPI"
        echo "  (the megatron-core wheel is 2.4 MB)"
    fi
    repo=$(git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 -r stat -c %s 2>/dev/null \
        | awk '{ s += $1 } END { print s + 0 }')
    echo "  wheels $(mib "$total") + repository (tracked + untracked) $(mib "$repo") =" \
        "$(mib $((total + repo))) carried, of the 64 MiB limit"
}

# ---- the plan -------------------------------------------------------------------------------

print_plan() {
    local total=$SETUP_EST
    echo "gpu_check plan: $ngpu GPU(s), EP = $ngpu, Transformer Engine:" \
        "$([ -n "$te" ] && echo "yes (TE spec, grouped GEMM)" || echo "no (local spec, SequentialMLP)")"
    echo "wheels needed: $WHEEL_HINT"
    wheel_lines
    echo "step setup: $(minutes $SETUP_EST) min (cap 120 s): install .whl/ unless megatron-core" \
        "imports, probe device and versions"
    for step in "${STEPS[@]}"; do
        selected "$step" || continue
        total=$((total + EST[$step]))
        echo "step $step: $(minutes "${EST[$step]}") min (cap ${CAP[$step]} s): ${WHAT[$step]}"
        echo "  \$ $(step_command "$step")"
    done
    local warning=""
    [ "$budget_s" -lt "$total" ] && warning=" - below the estimate: later steps will be skipped"
    echo "total estimate: $(minutes "$total") min; budget $budget_s s ($(minutes "$budget_s") min)$warning"
}

minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }

if [ -n "$dry_run" ]; then
    print_plan
    exit 0
fi

# ---- set-up: wheels, device probe -----------------------------------------------------------

mkdir -p "$out/logs" "$out/sections"
rm -f "$out"/sections/*.md
report="$out/gpu_check.md"
started_utc=$(date -u '+%Y-%m-%d %H:%M UTC')
declare -A STATUS SECS
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1

remaining() { echo $((SECONDS < budget_s ? budget_s - SECONDS : 0)); }

write_report() {
    {
        echo "# GPU check results"
        echo
        echo "- Device: $device"
        echo "- Date: $started_utc"
        echo "- Command: \`$command_line\`"
        echo "- Software: $software"
        echo "- Budget: $budget_s s, used $SECONDS s (set-up $setup_s s)"
        echo
        echo "| step | what | estimate | status | seconds |"
        echo "|---|---|---:|---|---:|"
        for step in "${STEPS[@]}"; do
            echo "| $step | ${WHAT[$step]} | ${EST[$step]} s | ${STATUS[$step]:-not reached} |" \
                "${SECS[$step]:-} |"
        done
        echo
        for step in "${STEPS[@]}"; do
            if [ -f "$out/sections/$step.md" ]; then cat "$out/sections/$step.md"; echo; fi
        done
        echo "## Plan (\`bash scripts/gpu_check.sh --dry-run\` on this machine)"
        echo
        echo "Why these steps, sizes and estimates: [docs/benchmarks.md](../benchmarks.md#gpu)."
        echo
        echo '```text'
        echo "${plan_text:-}"
        echo '```'
    } >"$report.tmp"
    mv -f "$report.tmp" "$report"  # whole or not at all: the run may be killed any time
}

setup_s=0
if [ -n "$fake" ]; then
    device="fake (GPU_CHECK_FAKE=1: every step is a sleep)"
    software="none (fake run)"
else
    if ! "$py" -c 'import megatron.core' 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            mkdir -p "$SITE"
            if ! "$py" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
                .whl/*.whl 2>"$out/logs/setup.log"; then
                for wheel in .whl/*.whl; do "$py" -m zipfile -e "$wheel" "$SITE"; done
            fi
            export PYTHONPATH="$SITE:${PYTHONPATH:-}"
        fi
    fi
    export PYTHONPATH="$PWD:${PYTHONPATH:-}"
    probe=$("$py" - 2>>"$out/logs/setup.log" <<'EOF'
import importlib.metadata as md, importlib.util, platform, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return ""
n = torch.cuda.device_count()
name = torch.cuda.get_device_name() if n else "no CUDA GPU"
mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if n else 0
te = (version("transformer-engine") or version("transformer_engine") or "installed") if importlib.util.find_spec("transformer_engine") else ""
print(n)
print(f"{name} x{n}, {mem:.0f} GiB each" if n else name)
print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {version('megatron-core') or 'MISSING'}, Transformer Engine {te or 'not installed (local spec)'}")
print("te" if te else "")
EOF
    )
    ngpu=$(sed -n 1p <<<"$probe")
    device=$(sed -n 2p <<<"$probe")
    software=$(sed -n 3p <<<"$probe")
    te=$(sed -n 4p <<<"$probe")
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    [ -n "$driver" ] && device="$device, driver $driver"
    setup_s=$SECONDS
    if ! [[ "${ngpu:-}" =~ ^[1-9][0-9]*$ ]] || [[ "$software" == *MISSING* ]]; then
        device="${device:-unknown}"
        software="${software:-python/torch did not start: see logs/setup.log}"
        for step in "${STEPS[@]}"; do STATUS[$step]="not run: set-up failed"; done
        {
            echo "## Set-up failed"
            echo
            [ "${ngpu:-0}" = 0 ] && echo "No CUDA GPU visible to torch."
            [[ "$software" == *MISSING* ]] && echo "megatron-core is missing: run" \
                "\`bash scripts/fetch_gpu_wheels.sh\` where pip reaches PyPI, carry .whl/."
            echo '```text'
            tail -20 "$out/logs/setup.log"
            echo '```'
        } >"$out/sections/tests.md"
        write_report
        echo "gpu_check: set-up failed, see $report" >&2
        exit 1
    fi
fi

plan_text=$(print_plan)  # with the probed GPU count and TE

# ---- the sections of the report -------------------------------------------------------------

log_tail() {  # log lines
    echo '```text'
    tail -"$2" "$1" 2>/dev/null | cut -c1-300
    echo '```'
}

section_tests() {
    echo "## 1. GPU tests"
    echo
    echo "Command: \`$(step_command tests)\` - ${STATUS[tests]}"
    echo
    log_tail "$out/logs/tests.log" 30
}

section_bench() {
    echo "## 2. Router and MoE layer cost (benchmarks/perf, preset h200)"
    echo
    echo "Command: \`$(step_command bench)\` - ${STATUS[bench]}; full report with JSON:"
    echo "\`$out/perf/\`."
    echo
    if [ -f "$out/perf/perf.md" ]; then  # perf.md's sections one level down, without plots
        sed -e '1d' -e '/^!\[/d' -e 's/^## /### /' "$out/perf/perf.md"
    fi
    [ "${STATUS[bench]}" != ok ] && log_tail "$out/logs/bench.log" 30
}

train_row() {  # routing log
    local log=$2 ms tflops loss mem dropped rectified tokens
    ms=$(grep -oE 'elapsed time per iteration \(ms\): [0-9.]+' "$log" 2>/dev/null | tail -1 | awk '{print $NF}')
    tflops=$(grep -oE 'throughput per GPU \(TFLOP/s/GPU\): [0-9.]+' "$log" 2>/dev/null | tail -1 | awk '{print $NF}')
    loss=$(grep -oE 'lm loss: [0-9.E+-]+' "$log" 2>/dev/null | tail -1 | awk '{print $NF}')
    mem=$(grep -oE 'max allocated: [0-9.]+' "$log" 2>/dev/null | tail -1 | awk '{printf "%.1f", $NF / 1024}')
    dropped=$(grep -oE 'dropped [0-9.]+ %' "$log" 2>/dev/null | awk '{s += $2; n++} END {if (n) printf "%.1f", s / n}')
    rectified=$(grep -oE 'rectified [0-9.]+ %' "$log" 2>/dev/null | awk '{s += $2; n++} END {if (n) printf "%.1f", s / n}')
    tokens=""
    [ -n "$ms" ] && tokens=$(awk -v ms="$ms" 'BEGIN { printf "%.0f", 8 * 2048 / (ms / 1000) }')
    echo "| $1 | ${ms:-n/a} | ${tokens:-n/a} | ${tflops:-n/a} | ${mem:-n/a} | ${loss:-n/a} |" \
        "${dropped:-n/a} | ${rectified:-n/a} |"
}

section_train() {
    local params
    params=$(grep -ohE 'number of parameters on .*\): [0-9]+' "$out"/logs/train_*.log 2>/dev/null \
        | head -1 | awk '{print $NF}' | sed -e ':a' -e 's/\B[0-9]\{3\}\>/,&/' -e 'ta')
    echo "## 3. Training: 60 iterations, vanilla vs IR+FR (pretrain_gpt_rectify.py)"
    echo
    echo "MoE GPT of ${params:-about 570,000,000} parameters (8 layers, hidden 1024, 16 heads," \
        "8 experts of FFN 4096, top-1, capacity 1.0 padded, alltoall, EP = $ngpu), seq 2048," \
        "16,384 tokens per iteration per GPU, bf16, embedded corpus; times are megatron's" \
        "iteration-time log over iterations 51-60, memory its first report after 10 iterations."
    echo
    echo "| routing | ms / iteration | tokens/s per GPU | TFLOP/s per GPU (megatron) |" \
        "peak allocated GiB | final lm loss | dropped % | rectified % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    train_row "none (${STATUS[train_none]:-not reached})" "$out/logs/train_none.log"
    train_row "IR+FR (${STATUS[train_irfr]:-not reached})" "$out/logs/train_irfr.log"
    echo
    echo "Commands: \`$(step_command train_none)\`; IR+FR adds" \
        "\`--moe-rectify ir+fr --moe-rectify-ir-trigger ignore_kth\` instead of none."
    for step in train_none train_irfr; do
        if [ -n "${STATUS[$step]:-}" ] && [ "${STATUS[$step]}" != ok ] && [ -f "$out/logs/$step.log" ]; then
            echo
            echo "$step, last lines of its log:"
            log_tail "$out/logs/$step.log" 25
        fi
    done
}

write_section() {  # step
    case "$1" in
        tests) section_tests >"$out/sections/tests.md" ;;
        bench) section_bench >"$out/sections/bench.md" ;;
        train_*) section_train >"$out/sections/train_irfr.md" ;;
    esac
}

# ---- the steps ------------------------------------------------------------------------------

run_step() {  # step
    local step=$1 est=${EST[$1]} left limit rc start command
    if ! selected "$step"; then
        STATUS[$step]="not selected (--only $only)"
        return
    fi
    [ -n "$fake" ] && est=1
    left=$(remaining)
    if [ "$left" -lt "$est" ]; then
        STATUS[$step]="skipped: budget (needs ~$est s, $left s left)"
        echo "gpu_check: $step ${STATUS[$step]}" >&2
        write_section "$step"
        write_report
        return
    fi
    limit=$((CAP[$step] < left ? CAP[$step] : left))
    command=$(step_command "$step")
    [ -n "$fake" ] && command="sleep ${GPU_CHECK_FAKE_SLEEP:-0}; echo fake $step"
    echo "gpu_check: $step (estimate $est s, killed after $limit s): $command" >&2
    start=$SECONDS
    if command -v timeout >/dev/null; then
        timeout --kill-after=10 "$limit" bash -c "$command" >"$out/logs/$step.log" 2>&1
    else  # no coreutils timeout: unbounded, the budget still decides what starts
        bash -c "$command" >"$out/logs/$step.log" 2>&1
    fi
    rc=$?
    SECS[$step]=$((SECONDS - start))
    case "$rc" in
        0) STATUS[$step]=ok ;;
        124 | 137) STATUS[$step]="timed out after $limit s" ;;
        *) STATUS[$step]="failed (exit $rc)" ;;
    esac
    echo "gpu_check: $step ${STATUS[$step]} in ${SECS[$step]} s" >&2
    write_section "$step"
    write_report
}

write_report
for step in "${STEPS[@]}"; do
    run_step "$step"
done
write_report
echo "gpu_check: report $report (copy it over docs/results/gpu.md)" >&2
# Exit status: 0 every selected step ok, 1 a step failed or timed out, 3 only skips (budget).
status=0
for step in "${STEPS[@]}"; do
    case "${STATUS[$step]}" in
        ok | "not selected"*) ;;
        skipped*) [ "$status" = 0 ] && status=3 ;;
        *) status=1 ;;
    esac
done
exit "$status"
