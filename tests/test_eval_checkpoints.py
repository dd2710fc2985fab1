"""dev/eval_checkpoints.py: re-scoring a saved co-training checkpoint reproduces the run's own held-out numbers,
scores another split on request, keeps finished results, and refuses a missing tag clearly."""

import json

import pytest

from nanochat.common import UserInputError
from tasks.arithmetic import ArithmeticTask

TINY = ["--task", "arithmetic", "--gen_tag", "d2", "--examples_per_step", "2", "--num_samples", "2", "--gen_max_tokens", "12",
        "--device_batch_size", "4", "--eval_examples", "6", "--eval_samples", "4", "--eval_every", "0", "--save_every", "0",
        "--device_type", "cpu", "--no_verifier", "--alpha", "0", "--num_gen_steps", "1"]


@pytest.fixture()
def text_dependent_answers(monkeypatch):
    """A random tiny model is never right: make correctness and the voted answer depend on the text, so that
    pass@1, pass@k and majority@k are not all zero and a different sample would change them."""
    monkeypatch.setattr(ArithmeticTask, "evaluate", lambda self, conversation, text: len(text) % 2 == 0)
    monkeypatch.setattr(ArithmeticTask, "extract_answer", lambda self, conversation, text: str(len(text) % 3))


def test_rescoring_reproduces_the_runs_own_evaluation(sft_base, text_dependent_answers, tmp_path, monkeypatch):
    import dev.eval_checkpoints as rescore
    import scripts.chat_cotrain as cotrain
    history = cotrain.main(TINY + ["--output_tag", "rescored", "--seed", "3"])
    final = history["eval"][-1]
    out = tmp_path / "scores.json"
    [result] = rescore.main(["--tags", "rescored", "--split", "test", "--out", str(out)])
    assert result["step"] == 1 and result["seed"] == 3 and result["n"] == 6
    assert 0 < final["pass@1"] < 1  # the comparison below means something
    for metric in ("pass@1", "pass@4", "majority@4"):
        assert result[metric] == final[metric]
    # the val split is another set of problems; step 0 is not saved by this run
    val = rescore.main(["--tags", "rescored", "--split", "val", "--out", str(out)])
    assert len(val) == 2 and json.loads(out.read_text())[1]["split"] == "val"
    # finished results are read back, not recomputed
    monkeypatch.setattr(rescore, "score", lambda *a: pytest.fail("recomputed a stored result"))
    assert rescore.main(["--tags", "rescored", "--split", "test", "--out", str(out)])[0] == result
    with pytest.raises(UserInputError, match=r"no checkpoint at step\(s\) \[7\]; saved steps: \[1\]"):
        rescore.main(["--tags", "rescored", "--steps", "1", "7", "--split", "test"])
    with pytest.raises(UserInputError, match="no co-training checkpoint 'nope'"):
        rescore.main(["--tags", "nope"])
