"""tests/multirank.py: a failing torchrun worker's own error reaches the test failure, not just ChildFailedError."""

import os

from multirank import run_torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import sys
import torch.distributed as dist
dist.init_process_group("gloo")
print(f"rank {dist.get_rank()} up", flush=True)
if dist.get_rank() == int(sys.argv[1]):
    raise ValueError("rank-specific failure: 3 != 4")
dist.barrier()
dist.destroy_process_group()
"""


def test_failing_rank_error_is_in_the_report(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_torchrun([str(script), "1"], nproc=2, log_dir=tmp_path / "logs", env=env, cwd=REPO, timeout=120)
    assert result.returncode != 0 and not result.timed_out
    report = result.report()
    assert "rank 1 stderr" in report and "ValueError: rank-specific failure: 3 != 4" in report
    assert sorted(result.ranks) == [0, 1] and "rank 0 up" in result.stdout


def test_passing_run_collects_every_ranks_stdout(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_torchrun([str(script), "-1"], nproc=2, log_dir=tmp_path / "logs", env=env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.report()
    assert "rank 0 up" in result.stdout and "rank 1 up" in result.stdout
