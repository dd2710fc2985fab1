"""The main job end to end in smoke mode: every stage of dev/runcpu.sh for a handful of steps, offline."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_runcpu_smoke(tmp_path):
    env = dict(os.environ, SMOKE="1", NANOCHAT_BASE_DIR=str(tmp_path / "base"), WANDB_MODE="disabled")
    result = subprocess.run(["bash", "dev/runcpu.sh"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report_dir = tmp_path / "base" / "report"
    report = (report_dir / "report.md").read_text()
    # the summary table has a column per stage that ran, and it is printed at the end of the run
    assert re.search(r"\| Metric \| .*SFT.*\| RL \| COTRAIN \|", report)
    assert "| Arithmetic |" in result.stdout
    # the co-trained verifier's metrics on labelled solutions are in the summary too
    for metric in ("Verifier balanced accuracy", "Verifier AUC", "Verifier share Correct", "Verifier gold share Correct"):
        assert f"| {metric} |" in result.stdout, metric
    for plot in ("loss.png", "reward.png"):
        assert (report_dir / "plots" / plot).stat().st_size > 0
    for stage in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints", "cotrain_checkpoints"):
        assert os.listdir(tmp_path / "base" / stage), stage
    assert "python -m scripts.chat_web" in result.stdout
