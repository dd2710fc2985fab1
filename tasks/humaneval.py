"""
HumanEval (Chen et al. 2021): 164 Python functions to complete from a signature and docstring, graded by
running the hidden unit tests. Generative; evaluation executes code via nanochat.execution.

Data: HF `openai/openai_humaneval` (split test) or local humaneval/HumanEval.jsonl.gz under data_dir.
"""

import re

from nanochat.execution import execute_code
from tasks.common import DatasetTask
from tasks.records import default_data_dir, load_records

_CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*+\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(completion):
    """The first fenced code block (```python ... ```) of a completion, or the whole completion if it has none."""
    m = _CODE_BLOCK.search(completion)
    return m.group(1) if m else completion


def prompt_imports(prompt):
    """The import lines of a HumanEval prompt (solutions often rely on them, e.g. `from typing import List`)."""
    return [line for line in prompt.splitlines() if re.match(r"\s*(import|from)\s+\S+", line) and not line.startswith((" ", "\t"))]


def build_test_program(prompt, completion, test, entry_point):
    code = extract_program(completion)
    # a completion that only continues the body (no `def entry_point`) is completed onto the prompt
    # `[^\S\n]` not `\s`: only the last line start before `def` is tried, so a run of blank lines stays linear
    if not re.search(rf"^[^\S\n]*+def\s++{re.escape(entry_point)}\s*+\(", code, re.MULTILINE):
        code = prompt + code
    return "\n".join(prompt_imports(prompt)) + "\n\n" + code + "\n\n" + test + f"\n\ncheck({entry_point})\n"


class HumanEval(DatasetTask):

    def __init__(self, data_dir=None, timeout=5.0, shuffle_seed=None, **slice_kwargs):
        records = load_records("openai/openai_humaneval", None, "test", local_dir=default_data_dir(data_dir),
                               local_files=["humaneval/HumanEval.jsonl.gz", "humaneval/HumanEval.jsonl", "humaneval/test.jsonl",
                                            "humaneval/test-*.parquet", "humaneval/test.parquet"])
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.timeout = timeout

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        row = self.record(index)
        solution = row["prompt"] + row["canonical_solution"]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"```python\n{solution}```"},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
            "prompt": row["prompt"],
        }

    def run_tests(self, conversation, assistant_response):
        """The ExecutionResult of the completion against the problem's unit tests."""
        program = build_test_program(conversation["prompt"], assistant_response, conversation["test"], conversation["entry_point"])
        return execute_code(program, timeout=self.timeout)

    def evaluate(self, conversation, assistant_response):
        if not isinstance(assistant_response, str):
            return 0
        return int(self.run_tests(conversation, assistant_response).success)
