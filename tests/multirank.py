"""
Running a command under torchrun from a test, with every worker's own output kept.

When a worker dies, torchrun itself reports little more than `ChildFailedError`. Here each rank's stdout
and stderr go to files in a log directory (torchrun's --log-dir with --redirects 3) and come back in the
result, so a failing test shows each rank's own traceback or abort message (`result.report()`).
"""

import glob
import os
import signal
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class TorchrunResult:
    returncode: int
    stdout: str      # every rank's stdout, rank 0 first, then torchrun's own
    stderr: str      # every rank's stderr, rank 0 first, then torchrun's own
    ranks: dict      # local rank -> {"stdout": ..., "stderr": ...}
    timed_out: bool

    def report(self, tail=2500):
        """Each rank's exit output and torchrun's, for an assertion message."""
        parts = [f"torchrun exited {self.returncode}" + (" (killed at the timeout)" if self.timed_out else "")]
        for rank, logs in sorted(self.ranks.items()):
            for stream in ("stderr", "stdout"):
                if logs[stream].strip():
                    parts.append(f"--- rank {rank} {stream} (last {tail} chars) ---\n{logs[stream][-tail:]}")
        parts.append(f"--- torchrun ---\n{self.torchrun_output[-tail:]}")
        return "\n".join(parts)


def _rank_logs(log_dir):
    # layout: <log_dir>/<run id>/attempt_<n>/<local rank>/{stdout,stderr}.log; the last attempt counts
    ranks = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", "std*.log"))):
        rank_dir = os.path.dirname(path)
        name = os.path.basename(rank_dir)
        if not name.isdigit():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            ranks.setdefault(int(name), {"stdout": "", "stderr": ""})[os.path.basename(path)[:-4]] = f.read()
    return ranks


def run_torchrun(args, nproc, log_dir, env=None, cwd=None, timeout=240):
    """Run `python -m torch.distributed.run --standalone --nproc_per_node=nproc ARGS` in its own session
    (a hang takes every worker down at the timeout) and collect each rank's output from log_dir."""
    os.makedirs(log_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(log_dir), "--redirects", "3", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    ranks = _rank_logs(str(log_dir))
    stdout = "".join(ranks[r]["stdout"] for r in sorted(ranks)) + out
    stderr = "".join(ranks[r]["stderr"] for r in sorted(ranks)) + err
    result = TorchrunResult(proc.returncode, stdout, stderr, ranks, timed_out)
    result.torchrun_output = out + err
    return result
