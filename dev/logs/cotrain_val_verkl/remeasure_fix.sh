#!/bin/bash
# The PLAN's verifier measurement for each tag given: end checkpoint (global step 133), validation problems, two draws.
# Description only (PLAN addition 14:47): the same measurement with the code of main after 4bf2007 (engine fix); run from /work/main.
export NANOCHAT_BASE_DIR=/work/runs/runcpu WANDB_MODE=disabled OMP_NUM_THREADS=1
for TAG in "$@"; do
  .venv/bin/python -m scripts.chat_cotrain --task arithmetic --difficulty 2 --gen_source cotrain --gen_tag $TAG --gen_step 133 \
    --ver_source cotrain --ver_tag $TAG --ver_step 133 --verifier_sft_steps 0 --verifier_format expectations \
    --forced_headers --verifier_warmup_steps 0 --num_gen_steps 1 --gen_steps 1 --ver_steps 0 --examples_per_step 8 \
    --num_samples 8 --max_new_tokens 96 --ver_max_tokens 128 --eval_examples 256 --eval_samples 1 \
    --ver_eval_examples 256 --device_batch_size 16 --eval_split val --output_tag remeasure_fix_val133_$TAG --save_every 0 \
    > /work/main/dev/logs/cotrain_val_verkl/remeasure_fix/$TAG.log 2>&1
done
