"""The answer interface every RL task implements (tasks.common.Task; RL_TASKS in tasks/by_name.py), on the
fixture data: answers read back in one spelling, labelled solutions whose labels match the solution, and
majority votes over what the task reads."""

import os
import random

import pytest

from nanochat.grpo import Rollout, majority_vote
from tasks import verify
from tasks.by_name import RL_TASKS, build_rl_task

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# one correct and one wrong completion per task, in each task's own answer format
COMPLETIONS = {"gsm8k": ("so 1,250.\n#### 1,250.0", "#### 12"), "arithmetic": None, "aqua": ("so it is B.\nAnswer: B", "Answer: D")}


def task_and_answers(name):
    task = build_rl_task(name, "train", FIXTURES)
    conversation = task[0 if name != "gsm8k" else 1]
    if name == "arithmetic":
        right = f"#### {conversation['answer']}.0"
        return task, conversation, right, f"#### {int(conversation['answer']) + 1}"
    return task, conversation, *COMPLETIONS[name]


@pytest.mark.parametrize("name", RL_TASKS)
def test_extract_answer_and_evaluate_agree(name):
    task, conversation, right, wrong = task_and_answers(name)
    assert task.evaluate(conversation, right) == 1 and task.evaluate(conversation, wrong) == 0
    assert task.extract_answer(conversation, right) is not None
    assert task.extract_answer(conversation, right) != task.extract_answer(conversation, wrong)
    assert task.extract_answer(conversation, "no answer at all") is None
    assert task.question(conversation) == conversation["messages"][0]["content"]


@pytest.mark.parametrize("name", RL_TASKS)
def test_labelled_solutions_are_consistent(name):
    task = build_rl_task(name, "test", FIXTURES)
    rng = random.Random(0)
    seen = set()
    for i in range(20):
        item = task.labelled_solution(i % len(task), rng)
        steps = verify.split_steps(verify.to_display(item["solution"]))
        assert len(item["step_labels"]) == len(steps) > 0
        first = item["first_error"]
        assert item["overall_correct"] == (first == -1)
        assert item["step_labels"] == [1 if first < 0 or k < first else 0 for k in range(len(steps))]
        seen.add(item["overall_correct"])
        # a labelled solution is always something the verifier prompt can show
        assert "Step 1:" in verify.build_verifier_prompt(item["question"], item["solution"])
    assert seen == {True, False}, "labelled solutions must include both classes"


def test_reference_chain_only_where_known():
    arithmetic = build_rl_task("arithmetic", "test")
    chain = arithmetic.reference_chain(0)
    assert chain and str(chain[-1]) == arithmetic[0]["answer"]
    assert build_rl_task("gsm8k", "test", FIXTURES).reference_chain(0) is None


@pytest.mark.parametrize("name", RL_TASKS)
def test_majority_vote_uses_the_tasks_answers(name):
    task, conversation, right, wrong = task_and_answers(name)
    texts = [right, wrong, right, "nothing"]
    rollouts = [Rollout(0, [], [], [], text=t, info={"conversation": conversation}) for t in texts]
    assert majority_vote(task, rollouts) == [1, 0, 1, 0]
    none = [Rollout(0, [], [], [], text="nothing", info={"conversation": conversation})] * 2
    assert majority_vote(task, none) == [0, 0]


def test_difficulty_preset_reaches_the_arithmetic_task_only():
    from tasks.arithmetic import DIFFICULTY_PRESETS
    for split in ("train", "test"):
        task = build_rl_task("arithmetic", split, difficulty=2)
        preset = DIFFICULTY_PRESETS[2]
        assert (task.min_steps, task.max_steps, task.max_number) == (preset["min_steps"], preset["max_steps"], preset["max_number"])
        assert all(preset["min_steps"] <= len(task.reference_chain(i)) <= preset["max_steps"] for i in range(50))
    assert build_rl_task("arithmetic", "train").min_steps == 1  # no preset: the default mix
    with pytest.raises(ValueError, match="arithmetic task only"):
        build_rl_task("gsm8k", "train", difficulty=2)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        build_rl_task("arithmetic", "train", difficulty=9)


def test_val_split_is_disjoint_from_test_and_mostly_from_train():
    """--eval_split val chooses settings without test: arithmetic's val problems have train skeletons (never
    a test problem) under another seed; GSM8K has no such split; AQuA uses its own validation split."""
    for difficulty in (None, 2):
        val, train, test = (build_rl_task("arithmetic", split, difficulty=difficulty) for split in ("val", "train", "test"))
        questions = [val.question(val[i]) for i in range(len(val))]
        assert len(val) == 256 and len(set(questions)) > 250
        assert all(val._split_of(val.problem(i)["skeleton"]) == "train" for i in range(len(val)))
        assert not set(questions) & {test.question(test[i]) for i in range(len(test))}
        seen = {train.question(train[i]) for i in range(2000)}  # what 250 updates of 8 questions would train on
        assert sum(q in seen for q in questions) <= 3  # chance collisions of one-step problems only (measured: 1 and 0)
        if difficulty == 2:
            assert val.min_steps == 2
    with pytest.raises(ValueError, match="no validation split"):
        build_rl_task("gsm8k", "val", FIXTURES)
    aqua_val, aqua_test = build_rl_task("aqua", "val", FIXTURES), build_rl_task("aqua", "test", FIXTURES)
    assert aqua_val.split == "validation" and aqua_test.split == "test"


def test_eval_split_flag_picks_the_evaluation_task(capsys):
    from scripts.chat_rl import get_args
    assert get_args(["--task", "arithmetic"]).eval_split == "test"
    assert get_args(["--task", "arithmetic", "--eval_split", "val"]).eval_split == "val"
    with pytest.raises(SystemExit):
        get_args(["--task", "gsm8k", "--eval_split", "val"])
    assert "GSM8K has no validation split" in capsys.readouterr().err
