#!/usr/bin/env bash
# The whole pipeline in one script: set-up, data, tokenizer, pretraining, base evaluation,
# mid-training, SFT, chat evaluation and the report card.
#
# Reference run (8xH100, a d20 model of ~560M parameters, about 4 hours):
#     bash speedrun.sh
#     WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#
# Toy run on a CPU, offline, through the same steps (a few minutes):
#     NANOCHAT_TOY=1 bash speedrun.sh
#     NANOCHAT_TOY=1 SKIP_SETUP=1 DEPTH=2 NUM_ITERATIONS=10 NANOCHAT_BASE_DIR=/tmp/toy bash speedrun.sh
#
# Environment variables (toy defaults in brackets):
#   NANOCHAT_TOY=1        small everything, CPU-friendly, no downloads (local corpus from dev/make_corpus.py)
#   NANOCHAT_BASE_DIR     where data, tokenizer, checkpoints and the report go (default ~/.cache/nanochat)
#   SKIP_SETUP=1          do not run `bash setup.sh` (use the current Python / an existing .venv)
#   LOCAL_SHARDS=DIR      pretraining shards already on disk (parquet, `text` column); nothing is downloaded
#   NPROC                 processes for torchrun (default: number of GPUs, else 1)
#   DEPTH                 model depth (20 [4])
#   NUM_ITERATIONS        optimizer steps of each training stage (-1 = the stage's own horizon [20])
#   MAX_SEQ_LEN, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE   pretraining shape (2048, 32, 524288 [256, 4, one micro-batch])
#   VOCAB_SIZE, TOK_MAX_CHARS                          tokenizer (32768, 2e9 [2048, 5e6])
#   NUM_SHARDS            shards to download for pretraining (240)
#   BUNDLE_DIR            a local unzipped CORE eval bundle (default: downloaded; [toy: CORE skipped unless set])
#   CORE_MAX_PER_TASK     CORE examples per task in base_eval (-1 = all [16])
#   WANDB_RUN             wandb run name (dummy = no wandb)
#   STOP_AFTER            stop after a stage: tokenizer | base | mid | sft (default: run everything)
#   REPORT_COPY_DIR       where the copy of report.md goes (default: this directory)
#   MID_ARGS, SFT_ARGS, CHAT_EVAL_ARGS   extra flags for those stages (override the toy defaults)
set -euo pipefail
cd "$(dirname "$0")"

log() { echo "[speedrun $(date +%H:%M:%S)] $*"; }
TOY=${NANOCHAT_TOY:-0}

# ------------------------------------------------------------------ environment
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN=${WANDB_RUN:-dummy}
if [ "$WANDB_RUN" = dummy ]; then export WANDB_MODE=${WANDB_MODE:-disabled}; fi

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    log "setting up the environment (bash setup.sh)"
    bash setup.sh
fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

if [ -z "${NPROC:-}" ]; then
    NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi

if [ "$TOY" = 1 ]; then
    DEPTH=${DEPTH:-4}
    NUM_ITERATIONS=${NUM_ITERATIONS:-20}
    MAX_SEQ_LEN=${MAX_SEQ_LEN:-256}
    DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-4}
    TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-$((DEVICE_BATCH_SIZE * MAX_SEQ_LEN * NPROC))}
    VOCAB_SIZE=${VOCAB_SIZE:-2048}
    TOK_MAX_CHARS=${TOK_MAX_CHARS:-5000000}
    CORE_MAX_PER_TASK=${CORE_MAX_PER_TASK:-16}
    EVAL_TOKENS=$((DEVICE_BATCH_SIZE * MAX_SEQ_LEN * NPROC * 4))
    # small, offline flags for the later stages
    MID_ARGS=${MID_ARGS:-"--tasks=offline --max_seq_len=$MAX_SEQ_LEN --device_batch_size=$DEVICE_BATCH_SIZE --total_batch_size=-1 --num_iterations=$NUM_ITERATIONS --eval_every=-1 --eval_tokens=$EVAL_TOKENS --val_size=50"}
    SFT_ARGS=${SFT_ARGS:-"--tasks=offline --num_iterations=$NUM_ITERATIONS --device_batch_size=2 --examples_per_step=$((2 * NPROC)) --eval_every=-1 --eval_steps=2 --eval_metrics_every=-1 --eval_metrics_tasks= --val_size=16"}
    CHAT_EVAL_ARGS=${CHAT_EVAL_ARGS:-"-a arithmetic -x 8 -m 16 -b 4"}
    TRAIN_SHAPE="--depth=$DEPTH --head_dim=64 --max_seq_len=$MAX_SEQ_LEN --device_batch_size=$DEVICE_BATCH_SIZE --total_batch_size=$TOTAL_BATCH_SIZE"
    TRAIN_EVALS="--eval_every=$(( NUM_ITERATIONS > 4 ? NUM_ITERATIONS / 4 : 1 )) --eval_tokens=$EVAL_TOKENS --core_metric_every=-1 --sample_every=$NUM_ITERATIONS"
    BASE_EVAL_ARGS="--device_batch_size=$DEVICE_BATCH_SIZE --split_tokens=$EVAL_TOKENS --max_per_task=$CORE_MAX_PER_TASK"
    if [ -n "${BUNDLE_DIR:-}" ]; then BASE_EVAL_ARGS="$BASE_EVAL_ARGS --eval=core,bpb,sample --bundle_dir=$BUNDLE_DIR";
    else BASE_EVAL_ARGS="$BASE_EVAL_ARGS --eval=bpb,sample"; fi
else
    DEPTH=${DEPTH:-20}
    NUM_ITERATIONS=${NUM_ITERATIONS:--1}
    MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}
    DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-32}
    TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-524288}
    VOCAB_SIZE=${VOCAB_SIZE:-32768}
    TOK_MAX_CHARS=${TOK_MAX_CHARS:-2000000000}
    CORE_MAX_PER_TASK=${CORE_MAX_PER_TASK:--1}
    MID_ARGS=${MID_ARGS:-"--tasks=mid-full"}
    SFT_ARGS=${SFT_ARGS:-"--tasks=sft-full"}
    CHAT_EVAL_ARGS=${CHAT_EVAL_ARGS:-}
    TRAIN_SHAPE="--depth=$DEPTH --max_seq_len=$MAX_SEQ_LEN --device_batch_size=$DEVICE_BATCH_SIZE --total_batch_size=$TOTAL_BATCH_SIZE"
    TRAIN_EVALS=""
    BASE_EVAL_ARGS="--max_per_task=$CORE_MAX_PER_TASK"
    if [ -n "${BUNDLE_DIR:-}" ]; then
        TRAIN_EVALS="--bundle_dir=$BUNDLE_DIR"
        BASE_EVAL_ARGS="$BASE_EVAL_ARGS --bundle_dir=$BUNDLE_DIR"
    fi
fi
log "base dir $NANOCHAT_BASE_DIR | toy $TOY | nproc $NPROC | depth $DEPTH | iterations $NUM_ITERATIONS"

# every distributed stage goes through torchrun, on one process as on eight
run_stage() {
    local module=$1; shift
    log "running $module $*"
    torchrun --standalone --nproc_per_node="$NPROC" -m "$module" -- "$@"
}
stop_after() { if [ "${STOP_AFTER:-}" = "$1" ]; then log "stopping after $1 (STOP_AFTER)"; exit 0; fi; }

if [ -f nanochat/report.py ]; then python -m nanochat.report reset; fi

# ------------------------------------------------------------------ data and tokenizer
DATASET_PID=""
if [ -n "${LOCAL_SHARDS:-}" ]; then
    export NANOCHAT_DATA_DIR=$LOCAL_SHARDS
    log "using local shards in $NANOCHAT_DATA_DIR"
elif [ "$TOY" = 1 ]; then
    export NANOCHAT_DATA_DIR=${NANOCHAT_DATA_DIR:-$NANOCHAT_BASE_DIR/base_data}
    if ! ls "$NANOCHAT_DATA_DIR"/*.parquet >/dev/null 2>&1; then
        log "making a local corpus in $NANOCHAT_DATA_DIR (dev/make_corpus.py)"
        python -m dev.make_corpus --out_dir "$NANOCHAT_DATA_DIR" --max_mb "${CORPUS_MB:-4}"
    fi
else
    # 8 shards (~800MB) are enough to train the tokenizer; the rest arrive in the background meanwhile
    python -m nanochat.dataset -n 8
    python -m nanochat.dataset -n "${NUM_SHARDS:-240}" &
    DATASET_PID=$!
fi

python -m scripts.tok_train --max_chars="$TOK_MAX_CHARS" --vocab_size="$VOCAB_SIZE"
python -m scripts.tok_eval
stop_after tokenizer

if [ -n "$DATASET_PID" ]; then
    log "waiting for the shard download to finish"
    wait "$DATASET_PID"
fi

# ------------------------------------------------------------------ pretraining
# shellcheck disable=SC2086  # the *_ARGS/SHAPE variables are deliberately word-split into flags
run_stage scripts.base_train $TRAIN_SHAPE --num_iterations="$NUM_ITERATIONS" --run="$WANDB_RUN" $TRAIN_EVALS
# shellcheck disable=SC2086
run_stage scripts.base_eval $BASE_EVAL_ARGS
stop_after base

# ------------------------------------------------------------------ mid-training, SFT, chat evaluation
# shellcheck disable=SC2086
run_stage scripts.mid_train --run="$WANDB_RUN" $MID_ARGS
# shellcheck disable=SC2086
run_stage scripts.chat_eval -i mid $CHAT_EVAL_ARGS
stop_after mid

# shellcheck disable=SC2086
run_stage scripts.chat_sft --source=mid --run="$WANDB_RUN" $SFT_ARGS
# shellcheck disable=SC2086
run_stage scripts.chat_eval -i sft $CHAT_EVAL_ARGS
stop_after sft

# ------------------------------------------------------------------ report card
# report.md lands in the base dir's report/ and, as a copy, in REPORT_COPY_DIR (default: here)
(cd "${REPORT_COPY_DIR:-.}" && python -m nanochat.report generate)
log "done"
