"""dev/grpo_variants.py end to end at the smallest size: every arm runs, the report has its table and curves."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_variants_report(sft_base, tmp_path):
    out = tmp_path / "variants.md"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dev.grpo_variants", "--model_tag", "d2", "--seeds", "1", "2", "--num_steps", "5",
           "--out", str(out), "--log_dir", str(tmp_path / "logs"), "--",
           "--examples_per_step", "2", "--num_samples", "2", "--max_new_tokens", "8", "--device_batch_size", "4",
           "--eval_examples", "2", "--eval_samples", "2"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "| metric | default | dynamic | dapo |" in text
    assert "held-out pass@1 (mean ± 95% CI)" in text and "seconds per update" in text
    assert text.count("seed 1: ") == 3 and text.count("seed 2: ") == 3
    assert "| 0 | " in text  # the reward curve
    assert sorted(os.listdir(tmp_path / "logs")) == sorted(f"{a}_s{s}.log" for a in ("default", "dynamic", "dapo") for s in (1, 2))
