#!/bin/bash
# Seeds 1-3 of the PLAN: test pass@1 of the valkl runs' end checkpoints, then their verifiers on test problems
# (the measurement of ../cotrain_val_verkl/remeasure.sh without --eval_split val), with main's code (after 4bf2007).
cd /work/main
export NANOCHAT_BASE_DIR=/work/runs/runcpu WANDB_MODE=disabled OMP_NUM_THREADS=1
D=/work/main/dev/logs/cotrain_test_verkl
mkdir -p $D/remeasure
.venv/bin/python -m dev.eval_checkpoints --tags valkl_cotrain_s1 valkl_cotrain_s2 valkl_cotrain_s3 --steps 133 --split test \
  --out $D/rescored_test.json > $D/rescored_test.log 2>&1
for TAG in valkl_cotrain_s1 valkl_cotrain_s2 valkl_cotrain_s3; do
  .venv/bin/python -m scripts.chat_cotrain --task arithmetic --difficulty 2 --gen_source cotrain --gen_tag $TAG --gen_step 133 \
    --ver_source cotrain --ver_tag $TAG --ver_step 133 --verifier_sft_steps 0 --verifier_format expectations \
    --forced_headers --verifier_warmup_steps 0 --num_gen_steps 1 --gen_steps 1 --ver_steps 0 --examples_per_step 8 \
    --num_samples 8 --max_new_tokens 96 --ver_max_tokens 128 --eval_examples 256 --eval_samples 1 \
    --ver_eval_examples 256 --device_batch_size 16 --output_tag remeasure_test133_$TAG --save_every 0 \
    > $D/remeasure/$TAG.log 2>&1
done
echo "$(date -u +%H:%M:%S) done"
