"""
Every stage script, run as a user runs it (python -m scripts.X), answers bad input with one line on
stderr, 'error: ...', and exit status 1: no traceback. The cases: a flag value out of range, and a
checkpoint (or tokenizer) that is not there.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    # (script, flags, what the error line must say)
    ("tok_train", ["--vocab_size", "10"], "--vocab_size must exceed"),
    ("tok_eval", ["--tokenizer_dir", "{base}/no_tokenizer"], "no_tokenizer"),
    ("base_train", ["--num_iterations", "0"], "--num_iterations must be >= 1"),
    ("base_eval", ["--eval", "bpb,perplexity"], "--eval takes"),
    ("base_eval", ["--device_type", "cpu", "--eval", "sample"], "base_checkpoints"),
    ("mid_train", ["--warmup_ratio", "0.9"], "--warmup_ratio + --warmdown_ratio"),
    ("mid_train", ["--device_type", "cpu", "--tasks", "arithmetic:4"], "base_checkpoints"),
    ("chat_sft", ["--examples_per_step", "0"], "--examples_per_step must be >= 1"),
    ("chat_sft", ["--device_type", "cpu", "--tasks", "arithmetic:4", "--eval_metrics_tasks", ""], "mid_checkpoints"),
    ("chat_eval", ["-n", "0"], "--num_samples must be >= 1"),
    ("chat_eval", ["-i", "sft", "-a", "arithmetic", "--device_type", "cpu"], "chatsft_checkpoints"),
    ("chat_cli", ["--temperature", "-1"], "--temperature must be >= 0"),
    ("chat_cli", ["--source", "rl", "-p", "hi", "--device_type", "cpu"], "chatrl_checkpoints"),
]
if not __import__("torch").cuda.is_available():  # asking for a GPU that is not there is bad input too
    CASES.append(("chat_eval", ["-i", "sft", "-a", "arithmetic", "--device_type", "cuda"], "--device_type=cuda was requested"))


@pytest.mark.parametrize("script,flags,message", CASES, ids=[f"{c[0]}:{c[2][:24]}" for c in CASES])
def test_bad_input_is_one_line_and_exit_1(script, flags, message, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1",
               WANDB_MODE="disabled", PYTHONPATH=REPO)
    env.pop("RANK", None)
    flags = [f.format(base=tmp_path) for f in flags]
    proc = subprocess.run([sys.executable, "-m", f"scripts.{script}", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert message in lines[0]
