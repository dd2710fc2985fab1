"""
Tests for tasks/common.py, tasks/records.py, tasks/answers.py and the smaller tasks (ARC, MMLU, HumanEval, SmolTalk, CustomJSON, spelling).
GSM8K, AQuA and the synthetic arithmetic task have their own files. All data comes from tests/fixtures.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

import tasks.records as records
from tasks.arc import ARC
from tasks.answers import extract_choice_letter, render_mc
from tasks.common import Task, TaskMixture, TaskSequence, validate_messages
from tasks.records import DataNotFoundError, load_records
from tasks.customjson import CustomJSON
from tasks.humaneval import HumanEval, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """The hub is never contacted in tests: any attempt fails at once, like it does offline."""
    def offline(hf_path, hf_name, split):
        raise ConnectionError(f"Couldn't reach '{hf_path}' on the Hub (test is offline)")
    monkeypatch.setattr(records, "_load_from_hub", offline)
    monkeypatch.delenv(records.DATA_DIR_ENV, raising=False)


class Numbers(Task):
    """A toy task: example i is the conversation 'i' -> 'i*i'."""

    def __init__(self, n, tag="n", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag}{index}"}, {"role": "assistant", "content": str(index * index)}]}

    def evaluate(self, conversation, assistant_response):
        return int(assistant_response == conversation["messages"][1]["content"])


def users(task):
    return [ex["messages"][0]["content"] for ex in task]


# -----------------------------------------------------------------------------
# Task slicing, mixtures, sequences


def test_task_slicing_matches_python_slicing():
    for start, stop, step in [(0, None, 1), (2, None, 1), (1, 8, 3), (0, 100, 4), (5, 5, 1), (9, None, 2)]:
        task = Numbers(10, start=start, stop=stop, step=step)
        assert users(task) == [f"n{i}" for i in range(10)[start:stop:step]]
        assert len(task) == len(range(10)[start:stop:step])
    task = Numbers(10, start=2, step=3)
    assert task[-1]["messages"][0]["content"] == "n8"
    with pytest.raises(IndexError):
        task[len(task)]
    assert task.reward(task[0], "4") == 1.0 and task.reward(task[0], "5") == 0.0


@pytest.mark.parametrize("kwargs", [dict(start=-1), dict(start=3, stop=2), dict(step=0), dict(start=1.5)])
def test_task_rejects_bad_slices(kwargs):
    with pytest.raises(ValueError):
        Numbers(10, **kwargs)


def test_mixture_is_a_deterministic_shuffle_of_everything():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, b], seed=42)
    got = users(mix)
    assert sorted(got) == sorted(users(a) + users(b))
    assert got == users(TaskMixture([Numbers(5, "a"), Numbers(3, "b")], seed=42))  # same seed, same order
    assert got != users(TaskMixture([a, b], seed=7))
    assert got != sorted(got)  # actually shuffled (fixed seed, so this is not flaky)


def test_mixture_oversamples_a_task_listed_twice():
    a, b = Numbers(4, "a"), Numbers(4, "b")
    got = users(TaskMixture([a, a, b]))
    assert len(got) == 12
    assert all(got.count(f"a{i}") == 2 and got.count(f"b{i}") == 1 for i in range(4))


def test_mixture_of_sliced_tasks_and_slicing_a_mixture():
    mix = TaskMixture([Numbers(10, "a", stop=3), Numbers(10, "b", start=8)], stop=4)
    assert len(mix) == 4
    assert set(users(TaskMixture([Numbers(10, "a", stop=3), Numbers(10, "b", start=8)]))) == {"a0", "a1", "a2", "b8", "b9"}


def test_sequence_concatenates_in_order():
    seq = TaskSequence([Numbers(2, "a"), Numbers(3, "b")])
    assert users(seq) == ["a0", "a1", "b0", "b1", "b2"]
    assert users(TaskSequence([Numbers(2, "a"), Numbers(3, "b")], start=1, step=2)) == ["a1", "b1"]
    with pytest.raises(ValueError):
        TaskSequence([])


# -----------------------------------------------------------------------------
# Multiple choice and letters


def test_render_mc_binds_letters_without_space():
    prompt = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert prompt.splitlines()[0] == "Multiple Choice question: What is 2+2?"
    assert "- 3=A\n- 4=B\n- 5=C\n" in prompt
    assert " =" not in prompt and "= " not in prompt
    assert prompt.endswith("Respond only with the letter of the correct answer.")
    with pytest.raises(ValueError):
        render_mc("q", ["A", "B"], ["x"])


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" b ", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), ("**B**", "B"),
    ("Answer: C", "C"), ("the answer is d", "D"), ("The answer is (A).", "A"), ("Ans: B", "B"),
    ("I first thought (A), but the answer is C", "C"), ("Answer: B\nOn reflection the answer is D", "D"),
    ("the answer is a number", None), ("Answer: F", None), ("", None), ("no idea", None), (None, None),
    ("answers vary", None), ("the answer isn't clear", None),
])
def test_extract_choice_letter(text, expected):
    assert extract_choice_letter(text, ["A", "B", "C", "D"]) == expected


def test_validate_messages_errors_are_specific():
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    validate_messages(ok)
    validate_messages([{"role": "system", "content": "s"}] + ok)
    with pytest.raises(ValueError, match="message 1 has role 'user', expected 'assistant'"):
        validate_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], where="here")
    with pytest.raises(ValueError, match="here: message 0 has role 'assistant'"):
        validate_messages([{"role": "assistant", "content": "a"}], where="here")
    with pytest.raises(ValueError, match="malformed content part"):
        validate_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "bash", "text": "ls"}]}])
    with pytest.raises(ValueError, match="non-empty list"):
        validate_messages([])


# -----------------------------------------------------------------------------
# Data loading


def test_load_records_reads_every_local_format(tmp_path):
    rows = [{"question": "q1", "answer": 1}, {"question": "q2", "answer": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "d-00001.parquet")
    for name in ("a.jsonl", "b.json", "c.jsonl.gz", "d-*.parquet"):
        assert load_records("x/y", None, "train", local_dir=str(tmp_path), local_files=["missing.jsonl", name]) == rows


def test_load_records_missing_data_explains_how_to_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_records("openai/gsm8k", "main", "test", local_dir=str(tmp_path), local_files=["gsm8k/test.jsonl"])
    message = str(info.value)
    assert "openai/gsm8k" in message and "gsm8k/test.jsonl" in message
    assert "--data_dir" in message and records.DATA_DIR_ENV in message
    with pytest.raises(DataNotFoundError, match="no local data directory given"):
        load_records("openai/gsm8k", "main", "test")


def test_load_records_corrupt_file_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        load_records("x/y", None, "train", local_dir=str(tmp_path), local_files=["bad.jsonl"])


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(records.DATA_DIR_ENV, FIXTURES)
    assert len(ARC("ARC-Easy", "test")) == 2


def test_real_hub_path_fails_with_the_helpful_error_when_offline(tmp_path):
    # the genuine datasets code path (no monkeypatching), made to fail fast with the offline switches
    code = ("from tasks.records import load_records, DataNotFoundError\n"
            "try:\n    load_records('openai/gsm8k', 'main', 'test')\n"
            "except DataNotFoundError as e:\n    print('CLEAR ERROR:', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path), HF_DATASETS_CACHE=str(tmp_path))
    env.pop(records.DATA_DIR_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "CLEAR ERROR:" in out.stdout, out.stderr[-2000:]
    assert "--data_dir" in out.stdout


# -----------------------------------------------------------------------------
# ARC and MMLU


def test_arc_examples_and_numeric_labels():
    task = ARC("ARC-Easy", "test", data_dir=FIXTURES, shuffle_seed=None)
    assert task.eval_type == "categorical"
    ex = task[0]
    assert ex["letters"] == ["A", "B", "C", "D"] and ex["answer"] == "B"
    assert "- water=B" in ex["messages"][0]["content"] and ex["messages"][1]["content"] == "B"
    numeric = task[1]  # labelled 1/2/3 in the data: shown as A/B/C
    assert numeric["letters"] == ["A", "B", "C"] and numeric["answer"] == "C"
    assert "- Mercury=C" in numeric["messages"][0]["content"]
    assert task.evaluate(ex, "B") == 1 and task.evaluate(ex, "A") == 0 and task.evaluate(ex, "E") == 0
    with pytest.raises(ValueError):
        ARC("ARC-Medium", "test", data_dir=FIXTURES)


def test_arc_shuffle_is_a_fixed_permutation():
    a = [ex["answer"] for ex in ARC("ARC-Easy", "test", data_dir=FIXTURES, shuffle_seed=1)]
    b = [ex["answer"] for ex in ARC("ARC-Easy", "test", data_dir=FIXTURES, shuffle_seed=1)]
    assert a == b and sorted(a) == ["B", "C"]


def test_mmlu_eval_and_auxiliary_train():
    task = MMLU("all", "test", data_dir=FIXTURES, shuffle_seed=None)
    ex = task[0]
    assert ex["answer"] == "B" and ex["subject"] == "elementary_mathematics"
    assert "- 4=B" in ex["messages"][0]["content"]
    assert task.evaluate(ex, "B") == 1 and task.evaluate(ex, "C") == 0
    aux = MMLU("auxiliary_train", "train", data_dir=FIXTURES)  # rows nested under "train"
    assert aux[0]["answer"] == "B" and "- whale=B" in aux[0]["messages"][0]["content"]
    with pytest.raises(ValueError):
        MMLU("all", "train", data_dir=FIXTURES)


# -----------------------------------------------------------------------------
# HumanEval


@pytest.fixture
def humaneval_dir(tmp_path):
    """The fixture problems laid out as in the real release (gzipped JSONL)."""
    os.makedirs(tmp_path / "humaneval")
    with open(os.path.join(FIXTURES, "humaneval", "HumanEval.jsonl"), "rb") as src, gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return str(tmp_path)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval_dir):
    task = HumanEval(data_dir=humaneval_dir)
    assert len(task) == 2 and task.eval_type == "generative"
    for ex in task:
        assert task.evaluate(ex, ex["messages"][1]["content"]) == 1
    ex = task[0]
    assert task.evaluate(ex, "```python\ndef total(xs):\n    return 0\n```") == 0
    assert task.evaluate(ex, "def total(xs) return") == 0                      # syntax error
    assert task.evaluate(ex, "import sys\nsys.exit(0)") == 0                  # exits before the tests
    quick = HumanEval(data_dir=humaneval_dir, timeout=1.0)
    assert quick.evaluate(ex, "```python\nwhile True: pass\n```") == 0         # times out


def test_humaneval_completion_forms(humaneval_dir):
    task = HumanEval(data_dir=humaneval_dir)
    ex = task[1]
    # fenced block with chatter around it; imports come from the prompt (math)
    assert task.evaluate(ex, "Sure!\n```python\ndef hyp(a, b):\n    return math.sqrt(a*a + b*b)\n```\nDone.") == 1
    # a bare body continuing the prompt
    assert task.evaluate(ex, "    return math.hypot(a, b)\n") == 1
    # only the first block counts
    assert task.evaluate(ex, "```python\ndef hyp(a, b):\n    return 0\n```\n```python\ndef hyp(a, b):\n    return math.hypot(a, b)\n```") == 0
    assert extract_program("no fences here") == "no fences here"


# -----------------------------------------------------------------------------
# SmolTalk and CustomJSON


def test_smoltalk_folds_system_message():
    task = SmolTalk("train", data_dir=FIXTURES, shuffle_seed=None)
    first = task[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == "You are concise.\n\nHi"
    assert len(task[1]["messages"]) == 4


def test_customjson_reads_both_line_forms():
    task = CustomJSON(os.path.join(FIXTURES, "identity.jsonl"))
    assert len(task) == 2
    assert task[0]["messages"][1]["content"] == "I am nanochat."
    assert task[1]["messages"][0]["content"] == "Who made you?"


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 2: not valid JSON"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "line 2: message 1 has role 'user', expected 'assistant'"),
    ('[{"role": "assistant", "content": "a"}]', "line 2: message 0 has role 'assistant', expected 'user'"),
    ('[{"role": "user", "content": "a"}]', "line 2: the last message must be from the assistant"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant"}]', "line 2: message 1 must be a dict with 'role' and 'content'"),
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]', "line 2: message 1 content must be a non-empty string"),
    ('{"conversation": []}', "line 2: an object line needs a 'messages' key"),
    ('"just a string"', "line 2: expected a non-empty list of messages"),
])
def test_customjson_validation_names_the_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError) as info:
        CustomJSON(str(path))
    assert message in str(info.value) and "data.jsonl" in str(info.value)


def test_customjson_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        CustomJSON(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSON(str(tmp_path / "empty.jsonl"))


# -----------------------------------------------------------------------------
# Spelling tasks


def test_spellingbee_examples_are_correct_and_deterministic():
    from nanochat.calculator import use_calculator
    task = SpellingBee("train", size=200, seed=3)
    assert [ex["messages"][0]["content"] for ex in task] == [ex["messages"][0]["content"] for ex in SpellingBee("train", size=200, seed=3)]
    assert [ex["messages"][0]["content"] for ex in task] != [ex["messages"][0]["content"] for ex in SpellingBee("test", size=200, seed=3)]
    zero_counts = 0
    for ex in task:
        parts = ex["messages"][1]["content"]
        python = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert use_calculator(python) == output == str(ex["word"].count(ex["letter"])) == ex["answer"]
        full = "".join(p["text"] for p in parts)
        assert ",".join(ex["word"]) in full
        assert task.evaluate(ex, full) == 1
        assert task.evaluate(ex, full.replace(f"#### {ex['answer']}", f"#### {int(ex['answer']) + 1}")) == 0
        zero_counts += ex["answer"] == "0"
    assert 0 < zero_counts < 100  # mostly letters that occur, some that do not


def test_spellingbee_slices_agree_with_full_task():
    full = SpellingBee("train", size=50)
    part = SpellingBee("train", size=50, start=10, stop=20)
    assert [ex["messages"] for ex in part] == [full[i]["messages"] for i in range(10, 20)]


def test_spellingbee_custom_words(tmp_path):
    (tmp_path / "words.txt").write_text("Cat dog\nbad-word  x1 \n")
    task = SpellingBee("test", size=20, words_file=str(tmp_path / "words.txt"))
    assert task.words == ["cat", "dog"]
    assert {ex["word"] for ex in task} <= {"cat", "dog"}
    with pytest.raises(ValueError):
        SpellingBee(words=["123", "a-b"])


def test_simple_spelling():
    task = SimpleSpelling("train", size=20)
    ex = task[0]
    word = ex["answer"].split(":")[0]
    assert ex["answer"] == word + ":" + ",".join(word) and word in ex["messages"][0]["content"]
    assert task.evaluate(ex, ex["answer"] + "\n") == 1
    assert task.evaluate(ex, word) == 0
