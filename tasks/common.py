"""
The Task base class (a sliceable list of conversations with an evaluation rule, and for RL tasks the
answer knowledge that RL and co-training need), TaskMixture / TaskSequence for building training sets
from several tasks, DatasetTask over loaded records, and the checks a conversation must pass.

Conversations look like
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..." or [parts]}], ...}
where parts are {"type": "text" | "python" | "python_output", "text": "..."}; tasks may add extra keys
(e.g. "letters" for multiple choice, "answer").

Answer formats live in tasks/answers.py, record loading in tasks/records.py.
"""

import random

# -----------------------------------------------------------------------------
# Task base class and combinators


def labels_from_first_error(num_steps, first_error):
    """ProcessBench step labels: 1 before the first error, 0 from it on (all 1 when first_error is -1)."""
    return [1 if first_error < 0 or i < first_error else 0 for i in range(num_steps)]


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

    # --- answer knowledge for RL and co-training: every task in tasks.by_name.RL_TASKS implements these, so
    # scripts never parse a task's answer format or probe a task for what it can do

    def question(self, conversation):
        """The problem statement a solver (or a verifier) is shown: the first user message."""
        return next(m["content"] for m in conversation["messages"] if m["role"] == "user")

    def extract_answer(self, conversation, assistant_response):
        """The answer a completion commits to, in one canonical spelling so that equal answers compare equal
        (majority votes count them together); None when it commits to none."""
        raise NotImplementedError(f"{type(self).__name__} cannot read answers (it is not an RL task)")

    def labelled_solution(self, index, rng):
        """A solution of task[index] with exact labels, for training and evaluating the verifier: about half
        of them correct (the reference), the rest with one known error. Returns
        {"question", "solution" (in the verifier's display notation), "step_labels" (1 up to the first error,
        0 from it on), "overall_correct", "first_error" (-1 if none)}."""
        raise NotImplementedError(f"{type(self).__name__} has no labelled solutions (it is not an RL task)")

    def reference_chain(self, index):
        """The chain of intermediate values of task[index]'s correct solution, where it is known exactly
        (it sharpens the verifier's gold step labels); None where it is not."""
        return None

    def reference_calculations(self, index):
        """The calculations of task[index]'s correct solution, in order, as (expression, value) strings in the
        verifier's display notation: what a verifier in the expectation format (tasks.verify) should expect
        each step to compute. None where the task has no reference solution with calculations."""
        return None

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
