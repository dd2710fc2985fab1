"""dev/verifier_bars: reading chat_cotrain's evaluation lines and checking issue #15's verifier bars."""

import json

from dev import verifier_bars

GOOD = {"pass@1": 0.2, "verifier_balanced_accuracy": 0.8, "verifier_exact_balanced_accuracy": 0.96,
        "verifier_exact_auc": 0.97, "verifier_first_error_accuracy": 0.9, "verifier_steps_aligned": 1.0,
        "verifier_share_said_correct": 0.15, "verifier_exact_gold_share_correct": 0.12}


def line(label, metrics):
    return f"eval [{label}] " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def test_each_bar_can_fail_and_the_summary_says_so(tmp_path, capsys):
    misses = {"exact BA": {"verifier_exact_balanced_accuracy": 0.84}, "exact AUC": {"verifier_exact_auc": 0.89},
              "first-error": {"verifier_first_error_accuracy": 0.74}, "aligned": {"verifier_steps_aligned": 0.996},
              "said Correct": {"verifier_share_said_correct": 0.23}}
    for column, change in misses.items():
        assert verifier_bars.check({**GOOD, **change}) == {c: c != column for c, *_ in verifier_bars.BARS}, column
    assert all(verifier_bars.check(GOOD).values())
    assert verifier_bars.check({"verifier_exact_auc": 0.95})["exact BA"] is None  # an absent metric is not a pass

    log = tmp_path / "run.log"
    log.write_text("\n".join(["schedule: ...", line("start", GOOD), "G    0 | reward 0.1",
                              line("final", {**GOOD, "verifier_exact_auc": 0.5}), "eval [final] pass@1 0.2"]) + "\n")
    rows = verifier_bars.main([str(log)])
    assert [(r["draw"], r["meets_all"]) for r in rows] == [("start", True), ("final", False)]
    out = capsys.readouterr().out
    assert "0.500 (miss)" in out and json.loads(out.strip().splitlines()[-1])["all_meet"] is False
    assert [r["draw"] for r in verifier_bars.main([str(log), "--draws", "start"])] == ["start"]
    capsys.readouterr()
    no_gold = {k: v for k, v in GOOD.items() if k != "verifier_exact_gold_share_correct"}
    log.write_text(line("start", no_gold) + "\n")
    assert [r["meets_all"] for r in verifier_bars.main([str(log)])] == [False]  # unknown is not met
    assert "0.150 (n/a)" in capsys.readouterr().out


def test_parse_skips_fields_that_are_not_numbers():
    evals = verifier_bars.parse_evals("eval [gen step 30] pass@1 0.25 | broken | note n/a | verifier_auc 0.9\n")
    assert evals == [("gen step 30", {"pass@1": 0.25, "verifier_auc": 0.9})]
