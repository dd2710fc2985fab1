"""
The pieces every task shares: the Task base class (a sliceable list of conversations with an
evaluation rule), TaskMixture / TaskSequence for building training sets from several tasks,
the multiple-choice prompt, answer extraction helpers and the data loader.

Conversations look like
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..." or [parts]}], ...}
where parts are {"type": "text" | "python" | "python_output", "text": "..."}; tasks may add extra keys
(e.g. "letters" for multiple choice, "answer").

Data: each dataset-backed task accepts data_dir (default: the NANOCHAT_TASK_DATA environment variable).
Files found there are used first (JSON / JSONL / JSONL.GZ / parquet with the Hugging Face field names);
otherwise the data comes from the Hugging Face hub via `datasets`.
"""

import glob
import gzip
import json
import os
import random
import re
from decimal import Decimal, InvalidOperation

from nanochat.common import UserInputError

DATA_DIR_ENV = "NANOCHAT_TASK_DATA"

# -----------------------------------------------------------------------------
# Task base class and combinators


class Task:
    """
    A dataset of conversations, viewed through a slice (start, stop, step) so that e.g. Task(stop=500)
    is the first 500 examples. Subclasses implement num_examples(), get_example(i), eval_type and evaluate().
    """

    def __init__(self, start=0, stop=None, step=1):
        if not (isinstance(start, int) and start >= 0):
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        if stop is not None and not (isinstance(stop, int) and stop >= start):
            raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be a positive int, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        """'generative' (sample a completion, then evaluate it) or 'categorical' (pick one of conversation['letters'])."""
        raise NotImplementedError

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        """The conversation at position `index` of the underlying (unsliced) data."""
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        """1 if the response solves the conversation's problem, else 0."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation (it is a training-only task)")

    def reward(self, conversation, assistant_response):
        """RL reward; by default just correctness."""
        return float(self.evaluate(conversation, assistant_response))

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def underlying_index(self, i):
        """Position i of this slice -> index into the underlying data (negative i counts from the end)."""
        n = len(self)
        if not isinstance(i, int):
            raise TypeError(f"task indices must be ints, not {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {n}")
        return self.start + i * self.step

    def __getitem__(self, i):
        return self.get_example(self.underlying_index(i))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """
    All examples of several tasks, shuffled together deterministically (random.Random(seed)).
    List a task twice to see it twice (oversampling).
    """

    def __init__(self, tasks, seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    @property
    def eval_type(self):
        kinds = {task.eval_type for task in self.tasks}
        if len(kinds) != 1:
            raise ValueError("a mixture of generative and categorical tasks has no single eval_type")
        return kinds.pop()

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """Tasks one after another, in the given order (a curriculum)."""

    def __init__(self, tasks, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(index)


# -----------------------------------------------------------------------------
# Multiple choice


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Each choice is followed by '=LETTER' with no space, so the letter the
    model must produce is the same token it saw bound to the choice (' A' and 'A' are different tokens).
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("")
    lines.append("Respond only with the letter of the correct answer.")
    return "\n".join(lines)


def letters_for(n):
    if not 1 <= n <= 26:
        raise ValueError(f"cannot letter {n} choices")
    return [chr(ord("A") + k) for k in range(n)]


# Explicit answer statements, forward: "Answer: C", "the answer is (c)", "**Answer:** C", "Ans - C",
# "correct option is C)", "CORRECT OPTION: OPTION E", "\boxed{C}"
_ANSWER_FORWARD = re.compile(
    r"\b(?:answer|ans|correct\s+(?:option|choice))\b[*\s]*(?:(?:is|would\s+be|will\s+be|should\s+be)\b)?[*\s]*[:=\-,]?[*\s]*"
    r"(?:(?:option|choice)\b\s*[:\-]?\s*)?(?:\(([A-Za-z])\)|\[([A-Za-z])\]|\\boxed\{([A-Za-z])\}|([A-Za-z])(?![A-Za-z0-9]))",
    re.IGNORECASE)
# ... and backward: "D is the answer", "Option B is correct", "(C) is the right choice" (capital letters only)
_ANSWER_BACKWARD = re.compile(
    r"(?<![A-Za-z0-9'])(?:[Oo]ption\s+|[Cc]hoice\s+)?\(?([A-Z])\)?\s+is\s+(?:the\s+)?(?:(?:correct|right)\b(?:\s+(?:answer|option|choice)\b)?|answer\b)")
# a last line that is only a letter: "D", "(B)", "Option C", "c."
_LETTER_LINE = re.compile(r"^[*`'\"\s]*(?:(?:option|choice)\s*[:\-]?\s*)?[(\[]?([A-Za-z])[)\]]?[.:]?[*`'\"\s]*$", re.IGNORECASE)
_MARKED_LETTER = re.compile(r"(?:\(([A-Z])\)|(?<![A-Za-z0-9/])([A-Z])\))")   # "(C)" or "C)", not "P(A/B)"
_ANSWER_TAIL = re.compile(r"\banswer\b[*\s]*(?:(?:is|would\s+be|will\s+be|should\s+be)\b)?[*\s]*[:=\-,]?\s*(.+)", re.IGNORECASE)
# after a lowercase letter only punctuation may follow on its line ("the answer is a number" is not an answer)
_LINE_END = re.compile(r"[ \t*]*[.)\]!,;:]*[ \t*]*(?:\n|$)")


def _normalize_option_text(text):
    text = text.strip().lower().strip("$*`'\" ").rstrip(".")
    return re.sub(r"\s+", " ", text)


def extract_choice_letter(text, letters, options=None):
    """
    The choice letter a free-form response commits to, or None.
    1. the last explicit statement ("Answer: C", "the answer is (c)", "C is the correct answer", ...);
    2. a last line that is just a letter ("C", "(C)", "Option C");
    3. an answer stated as an option's text ("the answer is 600"), when `options` are given and exactly one matches;
    4. the last "(C)" / "C)" marker.
    Letters outside `letters` never count; None when nothing qualifies.
    """
    if not isinstance(text, str):
        return None
    allowed = {letter.upper() for letter in letters}
    explicit = []
    for m in _ANSWER_FORWARD.finditer(text):
        letter = next(g for g in m.groups() if g)
        if m.group(4) and letter.islower() and not _LINE_END.match(text, m.end()):
            continue
        if letter.upper() in allowed:
            explicit.append((m.start(), letter.upper()))
    for m in _ANSWER_BACKWARD.finditer(text):
        if m.group(1) in allowed:
            explicit.append((m.start(), m.group(1)))
    if explicit:
        return max(explicit)[1]
    lines = [line for line in text.splitlines() if line.strip()]
    if lines:
        m = _LETTER_LINE.match(lines[-1])
        if m and m.group(1).upper() in allowed:
            return m.group(1).upper()
    if options:
        tails = [m.group(1) for m in _ANSWER_TAIL.finditer(text)]
        if tails:
            stated = _normalize_option_text(tails[-1].splitlines()[0])
            hits = [letter for letter, option in zip(letters, options) if _normalize_option_text(option) == stated]
            if len(hits) == 1:
                return hits[0].upper()
    marked = [next(g for g in m.groups() if g) for m in _MARKED_LETTER.finditer(text)]
    marked = [letter for letter in marked if letter in allowed]
    return marked[-1] if marked else None


# -----------------------------------------------------------------------------
# Numeric answers ("#### N", GSM8K style)

_HASH_ANSWER = re.compile(r"####\s*\$?\s*(-?\s*[\d,]*\.?\d+)")


def parse_number(text):
    """'1,234', '$18', '18.0', '-3.' -> Decimal; None if it is not a plain number."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def extract_hash_answer(text):
    """The number after the first '####' in text (commas, '$' and a trailing '.' tolerated), as a string; else None."""
    if not isinstance(text, str):
        return None
    m = _HASH_ANSWER.search(text)
    if m is None:
        return None
    number = parse_number(m.group(1))
    return None if number is None else m.group(1).replace(",", "").replace(" ", "")


def same_number(a, b):
    """Numeric equality of two answer strings (18 == 18.0 == '18.'); False if either is not a number."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


# -----------------------------------------------------------------------------
# Conversation checks


def validate_messages(messages, where="conversation"):
    """
    Raise ValueError (mentioning `where`) unless messages is a list of {"role", "content"} dicts that
    alternate user/assistant starting with user (an optional leading system message is allowed).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    body = messages[1:] if isinstance(messages[0], dict) and messages[0].get("role") == "system" else messages
    if not body:
        raise ValueError(f"{where}: a system message alone is not a conversation")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {k} must be a dict with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, dict) and part.get("type") in ("text", "python", "python_output")
                        and isinstance(part.get("text"), str)):
                    raise ValueError(f"{where}: message {k} has a malformed content part: {part!r}")
        elif not isinstance(content, str):
            raise ValueError(f"{where}: message {k} content must be a string or a list of parts")
    offset = len(messages) - len(body)
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"{where}: message {k + offset} has role {message['role']!r}, expected {expected!r} "
                             "(roles must alternate user/assistant, starting with user)")


def fold_system_message(messages):
    """Merge a leading system message into the first user message (the chat format has no system role)."""
    if messages and messages[0]["role"] == "system":
        system, first, rest = messages[0], messages[1], messages[2:]
        merged = {"role": "user", "content": system["content"] + "\n\n" + first["content"]}
        return [merged] + list(rest)
    return list(messages)


# -----------------------------------------------------------------------------
# Data loading


class DataNotFoundError(UserInputError, RuntimeError):
    """The data of a task could not be found locally or on the hub (a RuntimeError, for older callers)."""
    pass


def default_data_dir(data_dir=None):
    return data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None


def local_candidates(subdir, split):
    """The usual file names for one split of a data set inside data_dir/subdir."""
    names = [f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.json", f"{split}.json.gz",
             f"{split}.parquet", f"{split}-*.parquet", f"{split}/*.parquet"]
    return [os.path.join(subdir, name) for name in names]


def read_records_file(path):
    """Records from a .json (array or JSON lines), .jsonl, .jsonl.gz/.json.gz or .parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {lineno}: not valid JSON: {e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected every record to be a JSON object")
    return records


def _load_from_hub(hf_path, hf_name, split):
    from datasets import load_dataset
    return load_dataset(hf_path, hf_name, split=split)


def load_records(hf_path, hf_name, split, local_dir=None, local_files=()):
    """
    Records (a sequence of dicts with the Hugging Face field names) of one data set split.
    local_files are file names or glob patterns relative to local_dir, tried in order; the first that
    matches is read (all matches of a glob, in sorted order). Without a local match, the data come from
    datasets.load_dataset(hf_path, hf_name, split=split). If neither works, DataNotFoundError explains
    how to provide the data.
    """
    tried = []
    if local_dir:
        for pattern in local_files:
            full = os.path.join(local_dir, pattern)
            tried.append(full)
            paths = sorted(glob.glob(full))
            if paths:
                records = []
                for path in paths:
                    records.extend(read_records_file(path))
                return records
    try:
        return _load_from_hub(hf_path, hf_name, split)
    except Exception as e:
        where = f"local files {tried} not found; " if tried else "no local data directory given; "
        raise DataNotFoundError(
            f"Could not load {hf_path} ({hf_name or 'default'}, split {split!r}): {where}"
            f"Hugging Face download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"To use local files, put them in a directory laid out like {local_files[0] if local_files else '<name>/<split>.jsonl'} "
            f"and pass it as data_dir=... / --data_dir, or set the {DATA_DIR_ENV} environment variable. "
            f"Otherwise make sure the Hugging Face hub is reachable."
        ) from e


class DatasetTask(Task):
    """A Task over loaded records, optionally in a fixed shuffled order (so slices like [:500] are representative)."""

    def __init__(self, records, shuffle_seed=None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.records = records
        self.order = list(range(len(records)))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.order)

    def num_examples(self):
        return len(self.order)

    def record(self, index):
        return self.records[self.order[index]]
