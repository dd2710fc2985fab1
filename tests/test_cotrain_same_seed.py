"""dev/cotrain_same_seed.py: two runs on one commit give identical records and weights; the comparison
reports a difference when there is one."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_seed_runs_match_and_differences_show(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "dev.cotrain_same_seed", "--out", str(tmp_path / f"{name}.json")],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    same = subprocess.run([sys.executable, "-m", "dev.cotrain_same_seed", "--compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json")], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert same.stdout.strip() == "final weights identical: True"
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["gen"][0]["gen/steps_exact"] > 0 and record["ver"][0]["ver/reward"] > 0  # the paths carry signal
    record["gen"][0]["gen/outcome_reward"] += 1
    (tmp_path / "b.json").write_text(json.dumps(record))
    differ = subprocess.run([sys.executable, "-m", "dev.cotrain_same_seed", "--compare", str(tmp_path / "a.json"),
                             str(tmp_path / "b.json")], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "gen[0].gen/outcome_reward" in differ.stdout
