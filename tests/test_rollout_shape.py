"""dev/rollout_shape.py: its numbers are right for solutions whose step labels are known by hand, it samples a
real saved generator with the run's own settings, and it refuses a task with no reference chain."""

import pytest

from nanochat.common import UserInputError
from nanochat.grpo import Rollout

TINY = ["--task", "arithmetic", "--gen_tag", "d2", "--examples_per_step", "2", "--num_samples", "2", "--gen_max_tokens", "12",
        "--device_batch_size", "4", "--eval_examples", "2", "--eval_samples", "2", "--eval_every", "0", "--save_every", "0",
        "--device_type", "cpu", "--no_verifier", "--alpha", "0", "--num_gen_steps", "1"]


def test_numbers_match_hand_labelled_solutions(sft_base, monkeypatch):
    import dev.rollout_shape as rollout_shape
    import scripts.chat_cotrain as cotrain
    cotrain.main(TINY + ["--output_tag", "shaped"])
    from tasks.by_name import build_rl_task
    task = build_rl_task("arithmetic", "val")
    chain = task.reference_chain(0)
    first = chain[0]
    # one right first step then the answer; one wrong first step (and so a wrong second); one at the token limit
    texts = [f"So it is {first}+0=<<{first}+0={first}>>{first}.\n#### {first}",
             f"So it is {first}+1=<<{first}+1={first + 1}>>{first + 1}.\nThen {first + 1}+0=<<{first + 1}+0={first + 1}>>{first + 1}.\n#### 1",
             "No calculation here.\n#### 3"]

    def fake_sample(engine, tokenizer, task_, indices, samples, max_new_tokens, *a):
        assert indices == [0, 1, 2] and samples == 1 and max_new_tokens == 12  # the run's own token limit
        rollouts = []
        for i, (text, length) in enumerate(zip(texts, [5, 7, 12])):
            r = Rollout(0, [1], [2] * length, [1] * length, text=text)
            r.info.update(correct=int(i == 0), conversation=task_[0])
            rollouts.append(r)
        return rollouts
    monkeypatch.setattr(rollout_shape, "sample_and_score", fake_sample)
    [result] = rollout_shape.main(["--tags", "shaped", "--split", "val", "--problems", "3", "--samples", "1", "--show", "1"])
    assert result["samples"] == 3 and result["accuracy"] == pytest.approx(1 / 3)
    assert result["steps_written"] == pytest.approx((1 + 2 + 1) / 3)
    assert result["step_labels_correct"] == pytest.approx(1 / 4)  # labels [1], [0, 0], [0]
    assert result["first_error"] == {"none": 1, "step 1": 2}
    assert result["tokens"] == pytest.approx(8.0) and result["at_token_limit"] == pytest.approx(1 / 3)
    assert result["reference_steps"] == pytest.approx(sum(len(task.reference_chain(i)) for i in range(3)) / 3)
    assert len(result["examples"]) == 1 and result["examples"][0]["solution"] == texts[0]


def test_samples_a_real_generator_and_refuses_tasks_without_a_chain(sft_base, tmp_path, monkeypatch):
    import json
    import dev.rollout_shape as rollout_shape
    import scripts.chat_cotrain as cotrain
    cotrain.main(TINY + ["--output_tag", "shaped"])
    out = tmp_path / "shape.json"
    args = ["--tags", "shaped", "--problems", "2", "--samples", "2", "--out", str(out)]
    [result] = rollout_shape.main(args)
    assert result["samples"] == 4 and result["step"] == 1 and 0 <= result["tokens"] <= 12
    assert json.loads(out.read_text())[0]["first_error"] == result["first_error"]
    assert rollout_shape.main(args)[0]["examples"] == result["examples"]  # the same seed samples the same texts

    class NoChain:
        def __len__(self):
            return 2
    import dev.eval_checkpoints as eval_checkpoints  # where rollout_shape's loader builds the task
    monkeypatch.setattr(eval_checkpoints, "build_rl_task", lambda *a: NoChain())
    with pytest.raises(UserInputError, match="no reference chain"):
        rollout_shape.main(args)
    with pytest.raises(SystemExit):
        rollout_shape.get_args(["--tags", "shaped", "--problems", "0"])
