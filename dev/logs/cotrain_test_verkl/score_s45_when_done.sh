#!/bin/bash
# Seeds 4-5 of the PLAN: as soon as a run's driver JSON exists, its verifier on test problems (score_s123.sh's command).
cd /work/main
export NANOCHAT_BASE_DIR=/work/runs/runcpu WANDB_MODE=disabled OMP_NUM_THREADS=1
D=/work/main/dev/logs/cotrain_test_verkl
measure() {
  while [ ! -f $D/lkl/cotrain_s$1.json ]; do sleep 20; done
  TAG=testlkl_cotrain_s$1
  .venv/bin/python -m scripts.chat_cotrain --task arithmetic --difficulty 2 --gen_source cotrain --gen_tag $TAG --gen_step 133 \
    --ver_source cotrain --ver_tag $TAG --ver_step 133 --verifier_sft_steps 0 --verifier_format expectations \
    --forced_headers --verifier_warmup_steps 0 --num_gen_steps 1 --gen_steps 1 --ver_steps 0 --examples_per_step 8 \
    --num_samples 8 --max_new_tokens 96 --ver_max_tokens 128 --eval_examples 256 --eval_samples 1 \
    --ver_eval_examples 256 --device_batch_size 16 --output_tag remeasure_test133_$TAG --save_every 0 \
    > $D/remeasure/$TAG.log 2>&1
  echo "$(date -u +%H:%M:%S) measured $TAG"
}
measure 4 & measure 5 & wait
