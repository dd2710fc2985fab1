#!/bin/bash
# 13:28 UTC: kl seed 2 and lr seeds 2, 3 were killed by the kernel's OOM killer during their start evaluation
# (six runs' evaluations at once, ~6 GB each). Rerun as they stand, one driver per seed, started 5 minutes apart
# so that their start evaluations do not overlap. Same flags; same log_dir (the logs of the killed runs are overwritten).
cd /work/exp15
export NANOCHAT_BASE_DIR=/work/runs/runcpu WANDB_MODE=disabled OMP_NUM_THREADS=1
VA='--ver_source cotrain --ver_tag ver_expectations_sft400 --verifier_sft_steps 0 --verifier_format expectations --forced_headers --verifier_warmup_steps 0 --gen_steps 3 --ver_steps 1 --ver_examples_per_step 4 --ver_solutions 2 --ver_samples 4 --ver_max_tokens 128 --ver_eval_examples 128'
REST='--difficulty 2 --examples_per_step 8 --num_samples 8 --max_new_tokens 96 --device_batch_size 16 --eval_examples 256 --eval_samples 4 --eval_every 0 --eval_split val --save_every 25 --dynamic_sampling 1'
D=/work/main/dev/logs/cotrain_val_verkl
run() {  # arm prefix, seed, extra verifier flag
  nohup setsid .venv/bin/python -m dev.cotrain_experiment --arms cotrain --seeds $2 --num_gen_steps 100 --reuse --parallel 1 \
    --tag_prefix $1 --process_args '--alpha 0.3 --alpha_end 0.3 --answer_step' --verifier_args "$VA $3" \
    --out $D/report_${1}_s$2.md --log_dir $D/${1#val} -- $REST > $D/driver_${1}_s$2.log 2>&1 &
}
run vallr 2 "--ver_init_lr_frac 0.01"; sleep 300
run valkl 2 "--ver_kl_coef 0.1"; sleep 300
run vallr 3 "--ver_init_lr_frac 0.01"
