"""Tests for tasks/aqua.py (AQuA-RAT) and its letter extraction, on tests/fixtures/aqua_rat."""

import os

import pytest

import tasks.records as records
from tasks.aqua import AQuA, split_option

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    def offline(*args):
        raise ConnectionError("offline")
    monkeypatch.setattr(records, "_load_from_hub", offline)


def test_splits_map_to_the_release_files(tmp_path):
    assert len(AQuA("validation", data_dir=FIXTURES)) == 2   # dev.json
    assert len(AQuA("test", data_dir=FIXTURES)) == 1
    assert len(AQuA("train", data_dir=FIXTURES)) == 2
    with pytest.raises(records.DataNotFoundError):
        AQuA("train", data_dir=str(tmp_path))
    assert len(AQuA("dev", data_dir=FIXTURES)) == 2           # the release's name for validation
    with pytest.raises(ValueError):
        AQuA("val", data_dir=FIXTURES)
    with pytest.raises(ValueError):
        AQuA("test", mode="open", data_dir=FIXTURES)


def test_generative_example_format():
    task = AQuA("validation", data_dir=FIXTURES)
    assert task.eval_type == "generative"
    ex = task[0]
    user, assistant = ex["messages"][0]["content"], ex["messages"][1]["content"]
    assert user.startswith("What is 15% of 200?")
    assert "A) 20\nB) 30\nC) 35\nD) 40\nE) None of these" in user
    assert "Answer: X" in user
    assert assistant.startswith("15/100 * 200 = 30") and assistant.endswith("\nAnswer: B")
    assert ex["letters"] == ["A", "B", "C", "D", "E"] and ex["answer"] == "B"
    assert ex["options"] == ["20", "30", "35", "40", "None of these"]
    assert task.evaluate(ex, assistant) == 1


def test_categorical_example_format():
    task = AQuA("validation", mode="categorical", data_dir=FIXTURES)
    assert task.eval_type == "categorical"
    ex = task[1]
    assert "- 60 km/h=C" in ex["messages"][0]["content"]
    assert ex["messages"][1]["content"] == "C"
    assert task.evaluate(ex, "C") == 1 and task.evaluate(ex, "B") == 0


@pytest.mark.parametrize("response, expected", [
    ("x = 7\nAnswer: C", "C"),
    ("Answer: (C)", "C"),
    ("(C)", "C"),
    ("C)", "C"),
    ("c", "C"),
    ("so the answer is c.", "C"),
    ("The answer is C) 7", "C"),
    ("**Answer:** C", "C"),
    ("I considered (A) and (B).\nThe answer is C", "C"),       # last explicit answer beats earlier markers
    ("Answer: A\nWait, I made a mistake. Answer: C", "C"),    # the last explicit answer wins
    ("x = 10 - 3 = 7, so the answer is 7", "C"),              # option text instead of a letter
    ("The answer is: 7.", "C"),
    ("Eliminating gives (C).", "C"),
    ("the answer is a number", None),
    ("Answer: F", None),
    ("I have no idea", None),
    ("", None),
    ("answer is 11", None),                                   # not an option's text
    ("Answer: A", "A"),
    ("x = 7, so C is the correct answer.", "C"),                # backward statements
    ("Option C is correct", "C"),
    ("E is the answer. Answer: C", "C"),
    ("x = 7\ncorrect option is C", "C"),
    ("CORRECT OPTION:OPTION C", "C"),
    ("The Answer is, C.", "C"),
    ("x = 10 - 3 = 7\nOption C", "C"),                          # a last line that is only a letter
    ("x = 10 - 3 = 7\nC", "C"),
    ("P(A/B) = 0.2 so x is 7", None),                           # "B)" inside a formula is not a marker
    ("this option can't answer a \"MUST be true\" question", None),  # lowercase 'a' mid-sentence is an article
])
def test_letter_extraction(response, expected):
    task = AQuA("test", data_dir=FIXTURES)
    ex = task[0]  # options 5, 6, 7, 8, 9; correct C
    assert task.extract_letter(ex, response) == expected
    assert task.evaluate(ex, response) == int(expected == "C")
    assert task.reward(ex, response) == float(expected == "C")
    assert task.format_reward(ex, response) == float(expected is not None)


def test_option_parsing():
    assert split_option("C)600") == ("C", "600")
    assert split_option("(d) 8(\u221a3 \u2013 2)") == ("D", "8(\u221a3 \u2013 2)")
    with pytest.raises(ValueError):
        split_option("600")


def test_malformed_record_is_reported(tmp_path):
    os.makedirs(tmp_path / "aqua_rat")
    (tmp_path / "aqua_rat" / "test.json").write_text('{"question": "q", "options": ["A)1", "B)2"], "rationale": "r", "correct": "F"}\n')
    task = AQuA("test", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="malformed"):
        task[0]
