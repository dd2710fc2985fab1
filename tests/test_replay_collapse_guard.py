"""dev/replay_collapse_guard.py reads the verifier shares from a co-training log and finds the step the guard fires."""

from dev import replay_collapse_guard as replay


def test_replay_reads_the_log_and_finds_the_first_firing(tmp_path, capsys):
    line = "V {:4d} | reward 1.5 | acc 0.9 | bal-acc 0.5 | said-correct {} | gold-correct 0.12 | format 1.00"
    lines = ["G    0 | reward 0.1 | acc 0.1", line.format(0, "0.10")] + [line.format(i, "0.00") for i in range(1, 9)]
    collapsed = tmp_path / "collapsed.log"
    collapsed.write_text("\n".join(lines) + "\n")
    healthy = tmp_path / "healthy.log"
    healthy.write_text("\n".join(line.replace("said-correct 0.00", "said-correct 0.12") for line in lines) + "\n")
    assert replay.first_firing([(0.1, 0.12)] + [(0.0, 0.12)] * 8, 0.9, 0.5, 3) == 7  # as in test_grpo's guard test
    replay.main([str(collapsed), str(healthy), "--share_decays", "0.9", "--relatives", "0.5", "0.0"])
    out = capsys.readouterr().out
    assert "9 verifier steps, mean share said Correct 0.011, gold 0.120" in out
    assert "share_decay 0.9   relative 0.5   | 7 -" in out and "share_decay 0.9   relative 0.0   | - -" in out
