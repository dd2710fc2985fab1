"""Tests for tasks/gsm8k.py and the numeric-answer helpers in tasks/answers.py, on tests/fixtures/gsm8k."""

import os

import pytest

import tasks.records as records
from nanochat.calculator import use_calculator
from tasks.answers import extract_hash_answer, parse_number, same_number
from tasks.gsm8k import GSM8K, solution_steps, solution_to_parts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    def offline(*args):
        raise ConnectionError("offline")
    monkeypatch.setattr(records, "_load_from_hub", offline)


def test_annotations_become_tool_parts():
    parts = solution_to_parts("He makes 12*3=<<12*3=36>>36 rolls.\n#### 36")
    assert parts == [
        {"type": "text", "text": "He makes 12*3="},
        {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "36 rolls.\n#### 36"},
    ]
    # concatenating the parts' text gives back the solution without the annotation markup
    assert "".join(p["text"] for p in parts if p["type"] != "python") == "He makes 12*3=3636 rolls.\n#### 36"
    assert solution_to_parts("no calculations\n#### 1") == [{"type": "text", "text": "no calculations\n#### 1"}]


def test_example_format():
    task = GSM8K("train", data_dir=FIXTURES)
    assert len(task) == 2 and task.eval_type == "generative"
    ex = task[0]
    user, assistant = ex["messages"]
    assert user["role"] == "user" and user["content"].startswith("A baker")
    assert [p["type"] for p in assistant["content"]] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert ex["answer"] == "26"
    # every tool call in the data reproduces its annotated output through our calculator
    for ex in list(task) + list(GSM8K("test", data_dir=FIXTURES)):
        parts = ex["messages"][1]["content"]
        for call, out in zip(parts, parts[1:]):
            if call["type"] == "python":
                assert same_number(use_calculator(call["text"]), out["text"]) or out["text"] == "3/4"
    assert task[1]["answer"] == "1250"  # '#### 1,250'


@pytest.mark.parametrize("text, expected", [
    ("#### 18", "18"), ("so #### 1,250", "1250"), ("#### $18", "18"), ("#### 18.", "18"), ("####18", "18"),
    ("#### -3", "-3"), ("#### 18.0", "18.0"), ("#### 0.75", "0.75"), ("#### 18 dollars", "18"),
    ("#### 5\nthen #### 6", "5"), ("the answer is 18", None), ("####", None), ("#### abc", None), ("", None), (None, None),
])
def test_extract_hash_answer(text, expected):
    assert extract_hash_answer(text) == expected


def test_number_comparison():
    assert same_number("18", "18.0") and same_number("1,250", "1250") and same_number("$5", "5.") and same_number("-3", "-3.00")
    assert not same_number("18", "18.5") and not same_number("-3", "3") and not same_number(None, "3") and not same_number("x", "x")
    assert parse_number("1/2") is None


def test_evaluate_tricky_completions():
    task = GSM8K("test", data_dir=FIXTURES)
    eight, minus_three, frac = task[0], task[1], task[2]
    assert task.evaluate(eight, "5+3=8\n#### 8") == 1
    assert task.evaluate(eight, "#### 8.0") == 1
    assert task.evaluate(eight, "#### $8.") == 1
    assert task.evaluate(eight, "#### 8 pens") == 1
    assert task.evaluate(eight, "#### 80") == 0
    assert task.evaluate(eight, "The answer is 8") == 0  # no '####': not an answer
    assert task.evaluate(eight, "") == 0
    assert task.evaluate(minus_three, "#### -3") == 1 and task.evaluate(minus_three, "#### 3") == 0
    assert task.evaluate(frac, "#### .75") == 1 and task.evaluate(frac, "#### 0.750") == 1 and task.evaluate(frac, "#### 3/4") == 0
    assert task.reward(eight, "#### 8") == 1.0 and task.reward(eight, "#### 9") == 0.0
    # the gold solutions themselves are right
    for ex in task:
        text = "".join(p["text"] for p in ex["messages"][1]["content"] if p["type"] != "python")
        assert task.evaluate(ex, text) == 1


def test_get_steps():
    task = GSM8K("test", data_dir=FIXTURES)
    steps = task.get_steps(2)
    assert [s["calcs"] for s in steps] == [[("3/4", 0.75)], [("3/4", 0.75)]]
    assert steps[0]["text"].startswith("One cake needs")
    train = GSM8K("train", data_dir=FIXTURES)
    assert train.get_steps(0) == [
        {"text": "He makes 12*3=<<12*3=36>>36 rolls.", "calcs": [("12*3", 36)]},
        {"text": "After selling, 36-10=<<36-10=26>>26 rolls are left.", "calcs": [("36-10", 26)]},
    ]
    # indices follow the task's slice
    assert GSM8K("train", data_dir=FIXTURES, start=1).get_steps(0) == train.get_steps(1)
    assert solution_steps("a\n\nb <<1+1=2>>2\n#### 2") == [{"text": "a", "calcs": []}, {"text": "b <<1+1=2>>2", "calcs": [("1+1", 2)]}]


def test_bad_split_and_missing_data(tmp_path):
    with pytest.raises(ValueError):
        GSM8K("dev", data_dir=FIXTURES)
    with pytest.raises(records.DataNotFoundError, match="gsm8k"):
        GSM8K("train", data_dir=str(tmp_path))


def test_reference_calculations_are_the_reference_solution_s_annotations():
    """What a verifier in the expectations format is trained to write for GSM8K: the reference's <<expr=value>>
    calculations in order, every one of them right, its last value the answer."""
    from tasks import verify
    task = GSM8K("test", data_dir=FIXTURES)
    right = total = 0
    for i in range(len(task)):
        calcs = task.reference_calculations(i)
        assert calcs == [c for step in verify.split_steps(task.record(task.underlying_index(i))["answer"]) for c in verify.calculations(step)]
        plain = [(expr, value) for expr, value in calcs if parse_number(value) is not None]  # not '3/4'
        right += sum(verify.calc_is_right(expr, value) for expr, value in plain)
        total += len(plain)
    assert total > 0 and right == total
