#!/usr/bin/env bash
# The reference co-training run, after speedrun.sh: a d20 generator and a d12 process verifier trained
# together on GSM8K, against the single-model GRPO baseline with the same generator budget.
#
#   bash speedrun.sh && bash cotrain.sh                  # 8xH100
#   NANOCHAT_TOY=1 SKIP_SETUP=1 bash cotrain.sh          # toy size on a CPU, offline, arithmetic task
#
# Steps:
#   1. make sure the generator's SFT checkpoint (d$DEPTH_G) exists (speedrun.sh makes it; toy mode makes it here)
#   2. make sure a d$DEPTH_V verifier SFT checkpoint exists; if not, train it: base -> mid -> SFT
#   3. co-train: verifier SFT warm start on labelled solutions, verifier-only RL warm-up, then 3:1 rounds
#   4. the GRPO baseline for the same number of generator updates (chat_rl)
#   5. chat_eval of both on the task, then the report with a baseline vs co-trained table
#
# Environment variables (toy defaults in brackets): NANOCHAT_TOY, NANOCHAT_BASE_DIR, SKIP_SETUP, NPROC,
# DEPTH_G (20 [2]), DEPTH_V (12 [1]), TASK (gsm8k [arithmetic]), GEN_STEPS: generator updates (300 [2]),
# COTRAIN_ARGS / RL_ARGS: extra flags, WANDB_RUN.
set -euo pipefail
cd "$(dirname "$0")"
log() { echo "[cotrain $(date +%H:%M:%S)] $*"; }
TOY=${NANOCHAT_TOY:-0}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
WANDB_RUN=${WANDB_RUN:-dummy}
if [ "$WANDB_RUN" = dummy ]; then export WANDB_MODE=${WANDB_MODE:-disabled}; fi
if [ "${SKIP_SETUP:-0}" != 1 ] && [ ! -x .venv/bin/python ]; then bash setup.sh; fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
if [ -z "${NPROC:-}" ]; then NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))"); fi

if [ "$TOY" = 1 ]; then
    DEPTH_G=${DEPTH_G:-2}; DEPTH_V=${DEPTH_V:-1}; TASK=${TASK:-arithmetic}; GEN_STEPS=${GEN_STEPS:-2}
    DEFAULT_ARGS="--examples_per_step=$((2 * NPROC)) --num_samples=2 --gen_max_tokens=16 --ver_max_tokens=16 --device_batch_size=4 --eval_examples=4 --eval_samples=2 --eval_every=0"
    COTRAIN_ARGS=${COTRAIN_ARGS:-"$DEFAULT_ARGS --ver_examples_per_step=$((2 * NPROC)) --ver_solutions=1 --ver_samples=2 --verifier_warmup_steps=1 --verifier_sft_steps=2 --verifier_sft_batch=$((2 * NPROC)) --ver_eval_examples=4 --gen_steps=1 --ver_steps=1"}
    RL_ARGS=${RL_ARGS:-"--examples_per_step=$((2 * NPROC)) --num_samples=2 --max_new_tokens=16 --device_batch_size=4 --eval_examples=4 --eval_samples=2 --eval_every=0"}
    CHAT_EVAL_ARGS=${CHAT_EVAL_ARGS:-"-a $TASK -x 4 -m 16 -b 4"}
    # a missing model is trained with speedrun.sh's toy pipeline (shared corpus and tokenizer)
    make_sft() { NANOCHAT_TOY=1 SKIP_SETUP=1 DEPTH=$1 NUM_ITERATIONS=${TOY_ITERATIONS:-4} STOP_AFTER=sft bash speedrun.sh; }
else
    DEPTH_G=${DEPTH_G:-20}; DEPTH_V=${DEPTH_V:-12}; TASK=${TASK:-gsm8k}; GEN_STEPS=${GEN_STEPS:-300}
    COTRAIN_ARGS=${COTRAIN_ARGS:-"--verifier_sft_steps=200 --verifier_warmup_steps=40"}
    RL_ARGS=${RL_ARGS:-}
    CHAT_EVAL_ARGS=${CHAT_EVAL_ARGS:-"-a $TASK"}
    make_sft() { SKIP_SETUP=1 DEPTH=$1 STOP_AFTER=sft bash speedrun.sh; }
fi
has_sft() { ls "$NANOCHAT_BASE_DIR"/chatsft_checkpoints/d"$1"/meta_*.json >/dev/null 2>&1; }
run_stage() { local module=$1; shift; log "running $module $*"; torchrun --standalone --nproc_per_node="$NPROC" -m "$module" -- "$@"; }

# ------------------------------------------------------------------ 1-2. the two SFT checkpoints
if ! has_sft "$DEPTH_G"; then
    if [ "$TOY" = 1 ]; then log "no d$DEPTH_G SFT checkpoint: training one (toy)"; make_sft "$DEPTH_G";
    else echo "no SFT checkpoint for the d$DEPTH_G generator in $NANOCHAT_BASE_DIR: run speedrun.sh first" >&2; exit 1; fi
fi
if ! has_sft "$DEPTH_V"; then
    log "no d$DEPTH_V SFT checkpoint for the verifier: training one through base -> mid -> SFT"
    make_sft "$DEPTH_V"
fi

# ------------------------------------------------------------------ 3-4. co-training and the baseline
# shellcheck disable=SC2086
run_stage scripts.chat_cotrain --gen_tag="d$DEPTH_G" --ver_tag="d$DEPTH_V" --task="$TASK" --num_gen_steps="$GEN_STEPS" \
    --output_tag="d$DEPTH_G" --run="$WANDB_RUN" $COTRAIN_ARGS
# shellcheck disable=SC2086
run_stage scripts.chat_rl --source=sft --model_tag="d$DEPTH_G" --task="$TASK" --num_steps="$GEN_STEPS" \
    --output_tag="d$DEPTH_G" --run="$WANDB_RUN" $RL_ARGS

# ------------------------------------------------------------------ 5. evaluation and the report
# shellcheck disable=SC2086
run_stage scripts.chat_eval -i rl -g "d$DEPTH_G" $CHAT_EVAL_ARGS
# shellcheck disable=SC2086
run_stage scripts.chat_eval -i cotrain -g "d$DEPTH_G" $CHAT_EVAL_ARGS
python -m nanochat.report generate
python - "$NANOCHAT_BASE_DIR" <<'PY'
import os, re, sys
report_dir = os.path.join(sys.argv[1], "report")
def metrics(slug):
    path = os.path.join(report_dir, slug + ".md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    return dict(re.findall(r"^- ([^:\n]+): ([-\d.]+)\s*$", text, re.M))
rl, co = metrics("chat-evaluation-rl"), metrics("chat-evaluation-cotrain")
rows = [k for k in rl if k in co]
table = ["| metric | GRPO baseline | co-trained |", "|---|---|---|"] + [f"| {k} | {rl[k]} | {co[k]} |" for k in rows]
out = "\n".join(table)
with open(os.path.join(report_dir, "cotrain_vs_baseline.md"), "w", encoding="utf-8") as f:
    f.write("# Co-training vs the GRPO baseline\n\n" + out + "\n")
print(out)
PY
log "done: $NANOCHAT_BASE_DIR/report/cotrain_vs_baseline.md"
