"""
Tests for tasks/arithmetic.py: solutions are right (checked by recomputing every annotated calculation
with the calculator and against the question's numbers), generation is deterministic and split-disjoint,
and corrupted solutions have exactly the labels they claim.
"""

import re

import pytest

from nanochat.calculator import use_calculator
from tasks.arithmetic import DIFFICULTY_PRESETS, ArithmeticTask
from tasks.answers import extract_hash_answer, same_number

ANNOTATION = re.compile(r"<<(.*?)=(.*?)>>")


def calculations(line):
    return ANNOTATION.findall(line)


def line_is_correct(line):
    return all(same_number(use_calculator(expr), value) for expr, value in calculations(line))


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTY_PRESETS))
def test_reference_solutions_are_correct(difficulty):
    preset = DIFFICULTY_PRESETS[difficulty]
    task = ArithmeticTask("train", size=150, difficulty=difficulty)
    for i in range(len(task)):
        item = task.get_labelled_solution(i)
        lines = item["steps"]
        assert preset["min_steps"] <= len(lines) <= preset["max_steps"]
        assert item["solution"] == "\n".join(lines) + f"\n#### {item['answer']}"
        assert item["step_labels"] == [1] * len(lines) and item["first_error"] == -1 and item["final_correct"]
        values = []
        for line in lines:
            (expr, value), = calculations(line)
            assert use_calculator(expr) == value          # the arithmetic is right
            assert int(value) >= 0
            values.append(value)
        # each step starts from the previous step's result (a chain), and the answer is the last value
        for prev, line in zip(values, lines[1:]):
            assert calculations(line)[0][0].startswith(prev)
        assert values[-1] == item["answer"]
        # every operand the solution uses appears in the question
        question_numbers = set(re.findall(r"\d+", item["question"]))
        question_numbers |= {"2"} if "doubles" in item["question"] else set()
        question_numbers |= {"3"} if "triples" in item["question"] else set()
        for line in lines:
            operand = re.split(r"[+\-*/]", calculations(line)[0][0])[-1]
            assert operand in question_numbers


def test_conversation_and_evaluation():
    task = ArithmeticTask("test", size=20, difficulty=2)
    assert task.eval_type == "generative"
    for ex in task:
        parts = ex["messages"][1]["content"]
        for call, out in zip(parts, parts[1:]):
            if call["type"] == "python":
                assert out["type"] == "python_output" and use_calculator(call["text"]) == out["text"]
        text = "".join(p["text"] for p in parts if p["type"] != "python")
        assert extract_hash_answer(text) == ex["answer"]
        assert task.evaluate(ex, text) == 1 and task.reward(ex, text) == 1.0
        assert task.evaluate(ex, f"#### {int(ex['answer']) + 1}") == 0
        assert task.evaluate(ex, f"#### {ex['answer']}.0") == 1


def test_deterministic_and_slices_are_reproducible():
    a = ArithmeticTask("train", size=40, difficulty=2, seed=5)
    b = ArithmeticTask("train", size=40, difficulty=2, seed=5)
    assert [x["messages"] for x in a] == [x["messages"] for x in b]
    part = ArithmeticTask("train", size=40, difficulty=2, seed=5, start=10, step=3)
    assert [x["messages"] for x in part] == [a[i]["messages"] for i in range(10, 40, 3)]
    assert part.get_labelled_solution(1, corrupt=True) == a.get_labelled_solution(13, corrupt=True)
    other_seed = ArithmeticTask("train", size=40, difficulty=2, seed=6)
    assert [x["messages"] for x in a] != [x["messages"] for x in other_seed]


@pytest.mark.parametrize("difficulty", [1, 3])
def test_train_and_test_never_share_a_problem(difficulty):
    train = ArithmeticTask("train", size=1500, difficulty=difficulty)
    test = ArithmeticTask("test", size=300, difficulty=difficulty)
    skeleton = lambda task, i: repr(task.problem(i)["skeleton"])
    train_set = {skeleton(train, i) for i in range(len(train))}
    test_set = {skeleton(test, i) for i in range(len(test))}
    assert not train_set & test_set
    assert not {train.problem(i)["question"] for i in range(len(train))} & {test.problem(i)["question"] for i in range(len(test))}
    assert len(test_set) > 50  # the test split is not a handful of repeats


def test_difficulty_knob_changes_size_of_problems():
    easy = ArithmeticTask("train", size=200, difficulty=1)
    hard = ArithmeticTask("train", size=200, difficulty=4)
    mean_steps = lambda t: sum(len(t.get_labelled_solution(i)["steps"]) for i in range(len(t))) / len(t)
    max_operand = lambda t: max(int(n) for i in range(len(t)) for n in re.findall(r"\d+", t.problem(i)["question"]))
    assert mean_steps(easy) < 2 < 4 < mean_steps(hard)
    assert max_operand(easy) <= 10 < max_operand(hard)
    with pytest.raises(ValueError):
        ArithmeticTask(difficulty=9)
    with pytest.raises(ValueError):
        ArithmeticTask(min_steps=3, max_steps=2)


def test_corrupted_solutions_have_exact_labels():
    task = ArithmeticTask("train", size=300, difficulty=3)
    kinds = set()
    for i in range(len(task)):
        clean = task.get_labelled_solution(i)
        bad = task.get_labelled_solution(i, corrupt=True)
        assert bad["question"] == clean["question"] and bad["answer"] == clean["answer"]
        k = bad["first_error"]
        kinds.add(bad["corruption"])
        assert 0 <= k < len(bad["steps"])
        assert bad["step_labels"] == [1] * k + [0] * (len(bad["steps"]) - k)
        assert not bad["final_correct"]
        assert not same_number(extract_hash_answer(bad["solution"]), clean["answer"])
        # steps before the first error are exactly the reference steps
        assert bad["steps"][:k] == clean["steps"][:k]
        assert bad["steps"][k] != clean["steps"][k]
        if bad["corruption"] == "slip":
            assert not line_is_correct(bad["steps"][k])              # the arithmetic itself is wrong
            assert len(bad["steps"]) == len(clean["steps"])
        elif bad["corruption"] == "operand":
            assert line_is_correct(bad["steps"][k])                  # right arithmetic on the wrong number
            used = re.split(r"[+\-*/]", calculations(bad["steps"][k])[0][0])[-1]
            meant = re.split(r"[+\-*/]", calculations(clean["steps"][k])[0][0])[-1]
            assert used != meant
        else:
            assert bad["corruption"] == "skip" and len(bad["steps"]) == len(clean["steps"]) - 1
            assert line_is_correct(bad["steps"][k])
        # after the first error the arithmetic is done correctly (the error propagates, nothing else changes)
        for line in bad["steps"][k + 1:]:
            assert line_is_correct(line)
    assert kinds == {"slip", "operand", "skip"}


def test_single_step_problems_can_still_be_corrupted():
    task = ArithmeticTask("train", size=50, min_steps=1, max_steps=1, max_number=10)
    for i in range(len(task)):
        bad = task.get_labelled_solution(i, corrupt=True)
        assert bad["corruption"] in ("slip", "operand") and bad["first_error"] == 0 and bad["step_labels"] == [0]
