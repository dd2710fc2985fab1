"""
speedrun.sh end to end at toy size on the CPU: local corpus, tokenizer, pretraining, base eval (CORE on
the fixture bundle), mid-training and SFT, then the report card. Slow (minutes): it runs
every stage as its own torchrun process.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "tests", "fixtures", "core_bundle")


@pytest.mark.slow
def test_speedrun_toy_end_to_end(tmp_path):
    base_dir = tmp_path / "base"
    env = dict(os.environ,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),  # the venv's python/torchrun
               NANOCHAT_TOY="1", SKIP_SETUP="1", NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled",
               DEPTH="2", NUM_ITERATIONS="4", MAX_SEQ_LEN="64", CORPUS_MB="1", VOCAB_SIZE="1024",
               TOK_MAX_CHARS="1000000", BUNDLE_DIR=BUNDLE, NPROC="1", REPORT_COPY_DIR=str(tmp_path))
    for var in ("NANOCHAT_DATA_DIR", "LOCAL_SHARDS", "STOP_AFTER", "MID_ARGS", "SFT_ARGS", "CHAT_EVAL_ARGS", "VIRTUAL_ENV"):
        env.pop(var, None)
    proc = subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    # data, tokenizer, pretraining
    assert any(n.endswith(".parquet") for n in os.listdir(base_dir / "base_data"))
    assert (base_dir / "tokenizer" / "tokenizer.json").exists() and (base_dir / "tokenizer" / "token_bytes.pt").exists()
    assert (base_dir / "base_checkpoints" / "d2" / "model_000004.pt").exists()
    assert "step 00004/00004" in out and "val bpb" in out
    # base eval: bpb and CORE on the fixture bundle, as a table and a CSV
    assert "train bpb" in out and "CORE" in out
    with open(base_dir / "base_eval" / "d2_000004.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == "Task,Accuracy,Centered" and rows[-1].startswith("CORE,")
    assert {r.split(",")[0] for r in rows[1:-1]} == {"tiny_mc", "tiny_schema", "tiny_lm"}
    # the later stages ran, in order
    stages = ["scripts.base_train", "scripts.base_eval", "scripts.mid_train", "scripts.chat_sft"]
    positions = [out.index(f"running {s}") for s in stages]
    assert positions == sorted(positions)
    # the report card
    report = (tmp_path / "report.md").read_text()
    assert "## Base model training" in report and "## Base model evaluation" in report
    assert proc.stdout.rstrip().endswith("done")
