#!/usr/bin/env bash
# The checks that need a CUDA GPU, in parts that each fit a 10-minute slot:
#   bash dev/gpu_checks.sh 1   # the CUDA tests, training throughput/MFU at d12/d20, Engine decode at d20
#   bash dev/gpu_checks.sh 2   # co-training step cost at d20 + d12 with memory, a short real base_train at d20
#   bash dev/gpu_checks.sh 3   # the fixed-shape decode step (issue 17): its CUDA tests, the rollout benchmark
#                              # (growing-batch loop vs eager fixed-shape step vs CUDA graph vs compiled graph) at d20,
#                              # and the co-training step at d20 + d12 (tokenizer in .gpu/tokenizer; ~11 minutes:
#                              # on a 10-minute slot, run its stages in two calls)
#   bash dev/gpu_checks.sh 4   # FP8 training matmuls (issue 17, nanochat/fp8.py): the fp8 tests with CUDA, then a short
#                              # real base_train at d20 with and without --fp8 (20 steps of 262,144 tokens each, same
#                              # seed and data; prints both final losses and MFUs). Needs NANOCHAT_BASE_DIR like part 2,
#                              # whose val split holds one batch of 16 x 2049 tokens (runcpu's shards do not: make them
#                              # with dev/make_corpus --max_mb 8 --val_frac 0.15). ~6 minutes on an H200 (FP8's first
#                              # step compiles for ~125 s cold)
#   bash dev/gpu_checks.sh 5   # bench_train at d20 with --fp8 both (plain and FP8 steps alternating on shared weights;
#                              # prints the tokens/s ratio); compiles both models, over 170 s cold
#   bash dev/gpu_checks.sh 6   # sampling from bf16 linears and activation-sized prefill chunks (issue 17): their CUDA
#                              # tests, the rollout benchmark at d20 against the Engine as it was ("dynamic-old", today's
#                              # anchor; "graph-old"), the compiled graph at batch 256, and the co-training step at d20 + d12
#                              # (tokenizer in .gpu/tokenizer), the verifier's rollout shape at d12; ~7 minutes
#   bash dev/gpu_checks.sh 7   # where a decode step's device time goes now (decode-only profiles of the fixed-shape step
#                              # at d20 and d12, batch 256) and which attention kernel reads a batch-256 cache fastest
#                              # (dev/bench_decode_attention); ~4 minutes
#   bash dev/gpu_checks.sh 8   # cuDNN attention in captured graphs: the kernels, the graph tests, the rollout against
#                              # today's anchor and the graph without cuDNN, the co-training step three times; ~6 minutes
#   bash dev/gpu_checks.sh 9   # the compiled graph captured with cuDNN's attention: its CUDA tests, then at batch 256; ~5 min
#   bash dev/gpu_checks.sh 10  # cuDNN in the graph at batch 1 and at the verifier's shape, in the verifier's prefill,
#                              # graphs moving to smaller buckets as rows of mixed lengths finish, the d20 breakdown,
#                              # an evaluation's shape through Engine.generate_queue against passes; ~7 min
#   bash dev/gpu_checks.sh 11  # graphs moving to smaller buckets (tests, table), the compiled graph choosing cuDNN inside
#                              # its step (tests, d20 and d12 tables), where the verifier's prefill time goes; ~6 min
#   bash dev/gpu_checks.sh 12  # issue 17's open goals again: the d20 batch-256 rollout (both graph modes, the graph's
#                              # breakdown) and the co-training step three times (carry .gpu for the tokenizer); ~6 min
#   bash dev/gpu_checks.sh 13  # part 12's rollout half after graphs went one replay ahead of the host, compiled steps
#                              # took the cache length as dynamic and graphs could run per window of the cache: their
#                              # CUDA tests, then the d20 batch-256 table with and without each (breakdowns for every
#                              # graph mode); ~8 minutes
#   bash dev/gpu_checks.sh 14  # part 12's co-training half: the step three times, then with the compiled graph, the
#                              # compiled prefill at the verifier's shape, the step keeping graphs (carry .gpu for
#                              # the tokenizer); ~8 minutes
#   bash dev/gpu_checks.sh 15  # the compiled graph's windows every 64 / 32 columns or none, q/k/v fused, its matmuls
#                              # autotuned, with and without kept graphs, where its step's time goes (kernels per step),
#                              # the co-training step keeping graphs and on the compiled graph (carry .gpu); ~12 minutes
# Logs go to $OUT (or ./gpu_logs). Parts 2 and 4 need a tokenizer (and shards for base_train) under
# $NANOCHAT_BASE_DIR, e.g. made here with dev/make_corpus + scripts.tok_train, because a GPU box's Python
# may have no build of our Rust trainer. Figures are recorded in dev/gpu_results.md.
set -uo pipefail
PY=${PYTHON:-python3}
LOGS=${OUT:-gpu_logs}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
stage() {  # name, seconds, command...: a stage may fail or time out without stopping the others
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
cotrain_step_runs() {  # parts 12 and 14: the co-training step at d20 + d12 three times (tokenizer in .gpu/tokenizer)
    for run in 1 2 3; do
        stage "bench_cotrain_$run" 65 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
            --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer
    done
    grep -h "co-training generator step  " "$LOGS"/bench_cotrain_*.log
    # both roles decoding with the compiled graph (cuDNN attention; compiles in the first, untimed step, once per
    # batch bucket: the cache length is dynamic): reported as measured, no default depends on it
    stage bench_cotrain_compiled 280 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
        --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer --cotrain_args "--decode compiled_graph"
}

if [ "${1:-1}" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
    stage cuda_tests 110 $PY -m pytest -q -p no:cacheprovider -k "cuda or flash" tests/test_gpt.py tests/test_engine.py tests/test_dataloader.py
    stage bench_train 270 $PY -m dev.bench_train --configs d12,d20 --steps 10 --warmup 3
    stage bench_engine 90 $PY -m dev.bench_engine --device cuda --depth 20 --skip_anchor --new_tokens 256 --batch_sizes 1,8,32
    stage bench_engine_bf16 75 $PY -m dev.bench_engine --device cuda --depth 20 --skip_anchor --new_tokens 256 --batch_sizes 1,8,32 --naive_tokens 64 --bf16_weights
elif [ "$1" = 3 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    stage graph_tests 150 $PY -m pytest -q -p no:cacheprovider -k "on_cuda or cuda_generation" tests/test_decode_static.py tests/test_engine.py
    stage bench_rollout 250 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic,static,graph,compiled_graph \
        --batch_sizes 1,256 --prompt_lens 64 --new_tokens 256 --repeats 2
    stage bench_rollout_bf16 60 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic,graph --batch_sizes 1,256 \
        --prompt_lens 64 --new_tokens 256 --repeats 2 --bf16_weights
    stage bench_cotrain 190 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 --samples 16 \
        --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer
elif [ "$1" = 4 ]; then
    : "${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR to a directory with tokenizer/ and base_data/ for base_train}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    # the whole file but the tiny CPU base_train comparison (it trains a tokenizer with our Rust build)
    stage fp8_tests 80 $PY -m pytest -q -p no:cacheprovider -k "not base_train" tests/test_fp8.py
    # the real script first (the goal is its MFU), FP8 before plain so a short slot still measures the new path;
    # the shape of part 2's run (8 micro-steps of 16 x 2048 per optimizer step), same seed and data both ways
    for mode in fp8 plain; do
        flag=""; [ "$mode" = fp8 ] && flag="--fp8"
        stage "base_train_$mode" 200 $PY -m scripts.base_train --depth 20 --num_iterations 20 --device_batch_size 16 \
            --max_seq_len 2048 --total_batch_size 262144 --eval_every -1 --eval_tokens 65536 --core_metric_every -1 \
            --sample_every -1 --save_every -1 --model_tag "gpu_check_$mode" $flag
    done
    for mode in fp8 plain; do  # the smoothed train loss and MFU of the last step, and the final val bpb
        echo "base_train $mode: $(grep -E '^step 00020/00020' "$LOGS/base_train_$mode.log" | grep -oE 'loss [0-9.]+|mfu [0-9.]+%' | tr '\n' ' ')" \
             "$(grep -oE 'min val bpb [0-9.]+' "$LOGS/base_train_$mode.log" | tail -1)"
    done
elif [ "$1" = 5 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage bench_train_fp8 400 $PY -m dev.bench_train --configs d20 --fp8 both --batch 16 --steps 6 --warmup 2
elif [ "$1" = 6 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    stage cast_tests 90 $PY -m pytest -q -p no:cacheprovider -k "cast_weights_on_cuda or cuda_generation or (on_cuda and graph and not compile)" \
        tests/test_decode_static.py tests/test_engine.py
    stage bench_rollout 130 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph-old,graph \
        --batch_sizes 1,256 --prompt_lens 64 --new_tokens 256 --repeats 2
    stage bench_cotrain 150 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 --samples 16 \
        --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer
    # the verifier's shape in that step: 256 prompts of up to 384 tokens, 128 new tokens, at d12 (the prefill change)
    stage bench_rollout_d12 70 $PY -m dev.bench_rollout --device cuda --depth 12 --modes dynamic-old,graph-old,graph \
        --batch_sizes 256 --prompt_lens 384 --new_tokens 128 --repeats 2
    stage bench_rollout_cg 110 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph,compiled_graph \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 2
elif [ "$1" = 7 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage profile_d20 90 $PY -m dev.bench_rollout --device cuda --depth 20 --modes static --batch_sizes 256 --prompt_lens 64 \
        --new_tokens 64 --repeats 1 --profile static
    stage profile_d12 60 $PY -m dev.bench_rollout --device cuda --depth 12 --modes static --batch_sizes 256 --prompt_lens 384 \
        --new_tokens 32 --repeats 1 --profile static
    stage decode_attention 150 $PY -m dev.bench_decode_attention --device cuda
elif [ "$1" = 8 ]; then
    # cuDNN's attention kernel inside captured graphs (issue 17): the kernels at the decode shapes, the graph tests,
    # the rollout against today's anchor and against the same graph without cuDNN, then the co-training step three
    # times (tokenizer in .gpu/tokenizer); ~6 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage decode_attention 30 $PY -m dev.bench_decode_attention --device cuda --variants sdpa_mask,efficient,cudnn_mask,cudnn
    stage graph_tests 60 $PY -m pytest -q -p no:cacheprovider -k "(on_cuda and graph and not compile) or cuda_generation" \
        tests/test_decode_static.py tests/test_engine.py
    stage bench_rollout 60 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph-nocudnn,graph \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 1
    for run in 1 2 3; do
        stage "bench_cotrain_$run" 65 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
            --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer
    done
    grep -h "co-training generator step  " "$LOGS"/bench_cotrain_*.log
elif [ "$1" = 9 ]; then
    # the compiled graph captured with cuDNN's attention first (part 8 gave it to the plain graph only): its CUDA
    # tests, then at batch 256 against the anchor, the plain graph and itself without cuDNN; ~5 minutes (compiles)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage cudnn_compiled_test 120 $PY -m pytest -q -p no:cacheprovider -k "on_cuda and compiled_graph" tests/test_decode_static.py
    stage bench_rollout_cg 170 $PY -m dev.bench_rollout --device cuda --depth 20 \
        --modes dynamic-old,graph,compiled_graph,compiled_graph-cudnn --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 1
elif [ "$1" = 10 ]; then
    # the queue's CUDA tests (evaluation decodes through it), then what else part 8 left: cuDNN in the graph at batch 1
    # and at the verifier's shape, in the prefill (which the Engine runs without cuDNN: a plan per shape), graphs
    # moving to smaller buckets as rows finish (mixed answer lengths), the d20 breakdown on the table's cache, and an
    # evaluation's shape through the queue; ~7 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage queue_tests 60 $PY -m pytest -q -p no:cacheprovider -k "queue_on_cuda" tests/test_decode_static.py
    stage bench_rollout_b1 70 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph-nocudnn,graph \
        --batch_sizes 1 --prompt_lens 64 --new_tokens 256 --repeats 2
    stage bench_rollout_d12 60 $PY -m dev.bench_rollout --device cuda --depth 12 --modes dynamic-old,graph-nocudnn,graph \
        --batch_sizes 256 --prompt_lens 384 --new_tokens 128 --repeats 1
    stage bench_prefill 60 $PY -m dev.bench_prefill --device cuda --depth 12 --shapes 256x384,256x200 --widths 128 \
        --attention engine,cudnn --repeats 3
    stage bench_rollout_shrink 60 $PY -m dev.bench_rollout --device cuda --depth 20 --modes graph,graph-shrink32,graph-shrink8 \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --lengths mixed --repeats 2
    stage breakdown_d20 50 $PY -m dev.bench_rollout --device cuda --depth 20 --modes graph --batch_sizes 256 --prompt_lens 64 \
        --new_tokens 256 --repeats 1 --breakdown
    # an evaluation's shape: many problems through a few rows, passes (each captures its graph and waits for its
    # longest answer) against the queue (one capture; a problem starts as a row frees)
    stage bench_queue 90 $PY -m dev.bench_queue --device cuda --depth 20 --prompts 256 --rows 32 --prompt_len 128 \
        --new_tokens 256 --repeats 1
elif [ "$1" = 11 ]; then
    # what part 10 and 9 left (eighteenth session): the CUDA tests of graphs moving to smaller buckets (part 10's
    # benchmark of them failed: the capture ran outside autocast) and of the compiled step choosing cuDNN inside
    # itself (part 9's compiled_graph-cudnn reused the step compiled without cuDNN); the d20 batch-256 table with
    # both compiled graphs compiled; the shrink table again; where the verifier's prefill time goes; the compiled
    # graph with cuDNN at the verifier's decode shape; ~6 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage cuda_tests 150 $PY -m pytest -q -p no:cacheprovider \
        -k "graph_shrink_on_cuda or (on_cuda and compiled_graph) or traces_its_attention" tests/test_decode_static.py
    stage bench_rollout_cg 240 $PY -m dev.bench_rollout --device cuda --depth 20 \
        --modes dynamic-old,graph,compiled_graph,compiled_graph-cudnn --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 1
    stage bench_rollout_shrink 60 $PY -m dev.bench_rollout --device cuda --depth 20 --modes graph,graph-shrink32,graph-shrink8 \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --lengths mixed --repeats 2
    stage prefill_profile 60 $PY -m dev.bench_prefill --device cuda --depth 12 --shapes 256x384 --widths 128 --repeats 2 --profile
    stage bench_rollout_d12_cg 100 $PY -m dev.bench_rollout --device cuda --depth 12 --modes graph,compiled_graph-cudnn \
        --batch_sizes 256 --prompt_lens 384 --new_tokens 128 --repeats 1
elif [ "$1" = 12 ]; then
    # issue 17's two open goals judged again after the eighteenth session's changes (cuDNN in the compiled graph, the
    # host loop's per-column work, token_pieces in the verifier's host work): the d20 batch-256 rollout against
    # today's anchor with both graph modes and the graph's breakdown, then the co-training step three times
    # (tokenizer in .gpu/tokenizer: carry .gpu); ~6 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage bench_rollout 200 $PY -m dev.bench_rollout --device cuda --depth 20 --modes dynamic-old,graph,compiled_graph \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 1 --breakdown
    cotrain_step_runs
elif [ "$1" = 13 ]; then
    # the nineteenth session's changes, which no GPU has run: graph modes launch the next replay before reading a
    # step's tokens (Engine._lookahead_loop), compiled steps mark the cache length dynamic, and chat_web / chat_cli
    # keep a captured graph between requests (keep_graphs); the twentieth session's: a graph per window of the cache
    # (Engine.WINDOW_MODES, off until this table says). Their CUDA tests first (a failure means the table's new
    # modes are reported, not adopted: dev/logs/gpu/next/PLAN.md), then
    # the d20 batch-256 table: each graph mode with and without the lookahead, with windows and keeping its graphs
    # between calls (the captures' cost: against "-keep"; "dynamic" has no capture), the compiled graph also
    # compiled for its length alone and prefilling eagerly, and every graph mode's breakdown (its host's share);
    # ~8 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage cuda_tests 230 $PY -m pytest -v -p no:cacheprovider -k \
        "lookahead_on_cuda or windows_on_cuda or compiled_prefill_on_cuda or (on_cuda and graph and not compile) or cast_weights_on_cuda" \
        tests/test_decode_static.py
    stage bench_rollout 360 $PY -m dev.bench_rollout --device cuda --depth 20 --modes \
        dynamic-old,dynamic,graph,graph-nolookahead,graph-windows,graph-keep,compiled_graph,compiled_graph-nolookahead,compiled_graph-windows,compiled_graph-keep,compiled_graph-windows-keep,compiled_graph-eagerprefill,compiled_graph-fixedlen \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 1 --breakdown
elif [ "$1" = 14 ]; then
    # the co-training step three times with today's defaults, then with both roles on the compiled graph (its prefill
    # compiled too), the compiled prefill at the verifier's shape, then both roles keeping their graphs between
    # rollouts (--keep_graphs; all but the first three reported only); tokenizer in .gpu/tokenizer (carry .gpu);
    # ~8 minutes
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    cotrain_step_runs
    # the compiled prefill at the verifier's shape (d12, 256 prompts of up to 384 tokens), against the eager one
    stage bench_rollout_d12 150 $PY -m dev.bench_rollout --device cuda --depth 12 --modes \
        compiled_graph,compiled_graph-eagerprefill --batch_sizes 256 --prompt_lens 384 --new_tokens 128 --repeats 2
    stage bench_cotrain_keep 65 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
        --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer --cotrain_args=--keep_graphs
elif [ "$1" = 15 ]; then
    # after part 13 turned windows on for the compiled graph: the CUDA tests of the default and of the fused q/k/v
    # projection, then the d20 batch-256 rollout with windows every 64 columns (today), every 32 or none, q/k/v
    # fused, some keeping their graphs between calls, and where the kept windowed step's device time goes (kernels
    # per step, their time against the step's); the step's matmuls autotuned (a table of its own: its compile may
    # be long); then the co-training step keeping both roles' graphs, and with both on the compiled graph (carry
    # .gpu); ~12 minutes, the last stage likely cut
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    stage cuda_tests 200 $PY -m pytest -v -p no:cacheprovider -k \
        "windows_on_cuda or lookahead_on_cuda[compiled_graph] or fused_qkv_on_cuda" tests/test_decode_static.py
    stage bench_rollout 420 $PY -m dev.bench_rollout --device cuda --depth 20 --modes \
        dynamic-old,graph,graph-fusedqkv,compiled_graph,compiled_graph-nowindows,compiled_graph-q32,compiled_graph-fusedqkv,compiled_graph-keep,compiled_graph-q32-keep \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 2 --breakdown --profile compiled_graph-keep
    if grep -q "few kernels for a captured step" "$LOGS/bench_rollout.log"; then  # the profiler missed the replays
        stage profile_compile 120 $PY -m dev.bench_rollout --device cuda --depth 20 --modes compile --batch_sizes 256 \
            --prompt_lens 64 --new_tokens 64 --repeats 1 --profile compile
    fi
    stage bench_rollout_autotune 360 $PY -m dev.bench_rollout --device cuda --depth 20 --modes \
        dynamic-old,compiled_graph,compiled_graph-autotune,compiled_graph-autotune-keep \
        --batch_sizes 256 --prompt_lens 64 --new_tokens 256 --repeats 2
    stage bench_cotrain_keep 65 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
        --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer --cotrain_args=--keep_graphs
    stage bench_cotrain_compiled 280 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 \
        --samples 16 --gen_tokens 256 --ver_tokens 128 --steps 3 --tokenizer_dir .gpu/tokenizer --cotrain_args "--decode compiled_graph"
else
    : "${NANOCHAT_BASE_DIR:?set NANOCHAT_BASE_DIR to a directory with tokenizer/ (and base_data/ for base_train)}"
    stage cuda_tests_gpt 60 $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_gpt.py
    stage bench_cotrain 280 $PY -m dev.bench_cotrain --depth_g 20 --depth_v 12 --device_type cuda --questions 16 --samples 16 \
        --gen_tokens 256 --ver_tokens 256 --steps 3 --tokenizer_dir "$NANOCHAT_BASE_DIR/tokenizer"
    stage engine_profile 50 $PY -m dev.bench_engine --device cuda --depth 20 --skip_anchor --new_tokens 16 --batch_sizes 1 --naive_tokens 0 --profile
    stage base_train 190 $PY -m scripts.base_train --depth 20 --num_iterations 20 --device_batch_size 16 --max_seq_len 2048 \
        --total_batch_size 262144 --eval_every 10 --eval_tokens 65536 --core_metric_every -1 --sample_every -1 --save_every -1 --model_tag gpu_check
fi
