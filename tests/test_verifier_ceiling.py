"""dev/verifier_ceiling.py: a right answer through a wrong step is rejected by the perfect expectations text and
counted as correct only by the answer check; the script runs end to end on a tiny checkpoint."""

from types import SimpleNamespace

import pytest

from conftest import clean_lucky_wrong
from tasks.by_name import build_rl_task


def test_classify_and_the_two_labels():
    import dev.verifier_ceiling as ceiling
    task = build_rl_task("arithmetic", "train")
    texts = clean_lucky_wrong(task)
    rollouts = [SimpleNamespace(text=t, example_index=0, info={"correct": int(task.evaluate(task[0], t))}) for t in texts.values()]
    rows = ceiling.classify(task, rollouts)
    assert rows == [(True, True, True), (True, False, False), (False, True, False)]
    said = [perfect for _, _, perfect in rows]
    assert ceiling.balanced_accuracy(said, [right for right, _, _ in rows]) == 0.75  # the lucky one costs a quarter
    assert ceiling.balanced_accuracy(said, [right and clean for right, clean, _ in rows]) == 1.0


def test_runs_on_a_tiny_checkpoint(sft_base, capsys):
    import dev.verifier_ceiling as ceiling
    rows = ceiling.main(["--model_tag", "d2", "--problems", "3", "--samples", "2", "--max_new_tokens", "8", "--device_type", "cpu"])
    assert len(rows) == 6
    assert "perfect judge's balanced accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ceiling.get_args(["--samples", "0"])
