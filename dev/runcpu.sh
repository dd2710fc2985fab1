#!/usr/bin/env bash
# The main job on its embedded default: the whole pipeline on 2 CPU cores, offline, on bundled data.
#
#   corpus (generated locally) -> tokenizer -> base model -> mid-training -> SFT on arithmetic
#   -> verifier warm start -> co-training vs the GRPO baseline (same generator updates)
#   -> chat_eval -> report.md with plots
#
#   bash dev/runcpu.sh              # the default run (about 20 minutes on 2 cores)
#   SMOKE=1 bash dev/runcpu.sh      # every stage for a handful of steps (what CI runs)
#
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat/runcpu). Every knob below can be
# overridden from the environment, e.g. DEPTH=6 BASE_STEPS=2000 bash dev/runcpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat/runcpu}
export WANDB_MODE=${WANDB_MODE:-disabled}
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1   # everything here is local; never wait on the hub
mkdir -p "$NANOCHAT_BASE_DIR"

if [ "${SMOKE:-0}" = "1" ]; then
    CORPUS_MB=${CORPUS_MB:-1}; VOCAB=${VOCAB:-1024}; DEPTH=${DEPTH:-2}; SEQ=${SEQ:-256}
    BASE_STEPS=${BASE_STEPS:-4}; MID_STEPS=${MID_STEPS:-3}; SFT_STEPS=${SFT_STEPS:-3}
    VER_SFT_STEPS=${VER_SFT_STEPS:-2}; VER_OWN_POOL=${VER_OWN_POOL:-2}; VER_WARMUP=${VER_WARMUP:-1}; RL_STEPS=${RL_STEPS:-2}
    RL_QUESTIONS=${RL_QUESTIONS:-2}; RL_SAMPLES=${RL_SAMPLES:-2}; RL_TOKENS=${RL_TOKENS:-16}
    EVAL_PROBLEMS=${EVAL_PROBLEMS:-4}; BASE_EVALS=${BASE_EVALS:-bpb}
else
    CORPUS_MB=${CORPUS_MB:-5}; VOCAB=${VOCAB:-4096}; DEPTH=${DEPTH:-4}; SEQ=${SEQ:-256}
    BASE_STEPS=${BASE_STEPS:-80}; MID_STEPS=${MID_STEPS:-40}; SFT_STEPS=${SFT_STEPS:-120}
    VER_SFT_STEPS=${VER_SFT_STEPS:-150}; VER_OWN_POOL=${VER_OWN_POOL:-64}; VER_WARMUP=${VER_WARMUP:-2}; RL_STEPS=${RL_STEPS:-10}
    RL_QUESTIONS=${RL_QUESTIONS:-8}; RL_SAMPLES=${RL_SAMPLES:-8}; RL_TOKENS=${RL_TOKENS:-80}
    EVAL_PROBLEMS=${EVAL_PROBLEMS:-64}; BASE_EVALS=${BASE_EVALS:-bpb,sample}
fi
TAG=d$DEPTH
SECONDS=0
stage() { echo; echo "=== [$(date +%H:%M:%S) | ${SECONDS}s] $*"; }

stage "report header"
python -m nanochat.report reset

stage "corpus: generating ${CORPUS_MB} MB of licence-clean text locally (Python docs, licences, arithmetic)"
if ! ls "$NANOCHAT_BASE_DIR"/base_data/*.parquet >/dev/null 2>&1; then
    python -m dev.make_corpus --out_dir "$NANOCHAT_BASE_DIR/base_data" --max_mb "$CORPUS_MB"
else
    echo "shards already in $NANOCHAT_BASE_DIR/base_data"
fi

stage "tokenizer: vocab $VOCAB"
python -m scripts.tok_train --vocab_size "$VOCAB"
python -m scripts.tok_eval

stage "base model: depth $DEPTH, $BASE_STEPS steps"
python -m scripts.base_train --depth "$DEPTH" --head_dim 64 --max_seq_len "$SEQ" --device_batch_size 16 \
    --total_batch_size $((16 * SEQ)) --num_iterations "$BASE_STEPS" --eval_every $((BASE_STEPS / 4 > 0 ? BASE_STEPS / 4 : 1)) \
    --eval_tokens $((16 * SEQ * 4)) --core_metric_every -1 --sample_every -1 --model_tag "$TAG"
python -m scripts.base_eval --model_tag "$TAG" --eval "$BASE_EVALS" --device_batch_size 4 --split_tokens $((4 * SEQ * 4))

stage "mid-training: $MID_STEPS steps on the offline mixture (arithmetic, spelling)"
python -m scripts.mid_train --tasks offline --model_tag "$TAG" --max_seq_len "$SEQ" --device_batch_size 16 \
    --total_batch_size $((16 * SEQ)) --num_iterations "$MID_STEPS" --eval_every "$MID_STEPS" \
    --eval_tokens $((16 * SEQ * 4)) --val_size 200

stage "SFT: $SFT_STEPS steps on arithmetic"
python -m scripts.chat_sft --source mid --tasks "arithmetic" --model_tag "$TAG" --device_batch_size 16 \
    --examples_per_step 16 --num_iterations "$SFT_STEPS" --eval_every "$SFT_STEPS" --eval_steps 4 --val_size 200 \
    --eval_metrics_tasks arithmetic --eval_metrics_every "$SFT_STEPS" --eval_metrics_max_problems 32
python -m scripts.chat_eval -i sft -a arithmetic -g "$TAG" -x "$EVAL_PROBLEMS" -m "$RL_TOKENS" -b 16

RL_FLAGS=(--task arithmetic --examples_per_step "$RL_QUESTIONS" --num_samples "$RL_SAMPLES"
          --device_batch_size 16 --eval_examples "$EVAL_PROBLEMS" --eval_samples 4 --eval_every 0)

stage "GRPO baseline: $RL_STEPS generator steps"
python -m scripts.chat_rl --source sft --model_tag "$TAG" --num_steps "$RL_STEPS" --max_new_tokens "$RL_TOKENS" \
    --output_tag "$TAG" "${RL_FLAGS[@]}"
python -m scripts.chat_eval -i rl -a arithmetic -g "$TAG" -x "$EVAL_PROBLEMS" -m "$RL_TOKENS" -b 16

stage "co-training: verifier warm start ($VER_SFT_STEPS SFT + $VER_WARMUP RL steps), then $RL_STEPS generator steps"
python -m scripts.chat_cotrain --gen_source sft --gen_tag "$TAG" --ver_source sft --ver_tag "$TAG" \
    --num_gen_steps "$RL_STEPS" --gen_steps 3 --ver_steps 1 --verifier_warmup_steps "$VER_WARMUP" \
    --verifier_sft_steps "$VER_SFT_STEPS" --verifier_sft_batch 16 --gen_max_tokens "$RL_TOKENS" \
    --verifier_format expectations --forced_headers --ver_sft_own_frac 0.5 --ver_sft_own_pool "$VER_OWN_POOL" \
    --alpha 0.3 --alpha_end 0.3 \
    --ver_max_tokens $((RL_TOKENS + 32)) --ver_examples_per_step 4 --ver_solutions 2 --ver_samples 4 \
    --ver_eval_examples "$EVAL_PROBLEMS" --output_tag "$TAG" "${RL_FLAGS[@]}"
python -m scripts.chat_eval -i cotrain -a arithmetic -g "$TAG" -x "$EVAL_PROBLEMS" -m "$RL_TOKENS" -b 16

stage "report"
python -m nanochat.report generate
echo
echo "=== done in ${SECONDS}s. Report: $NANOCHAT_BASE_DIR/report/report.md (copy in ./report.md)"
python - <<'PY'
import os, re
text = open(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "report", "report.md"), encoding="utf-8").read()
table = re.search(r"(\|[^\n]*\|\n)+", text[text.find("## Summary"):] if "## Summary" in text else text)
print(table.group(0) if table else "(no summary table found)")
PY
echo "Chat with the co-trained generator in your browser:"
echo "  NANOCHAT_BASE_DIR=$NANOCHAT_BASE_DIR python -m scripts.chat_web --source cotrain --verifier $TAG   # then open http://127.0.0.1:8000"
