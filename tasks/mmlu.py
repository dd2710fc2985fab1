"""
MMLU (Hendrycks et al. 2021): four-way multiple choice over 57 subjects. Categorical.
subset "all" (splits test/validation/dev) is the benchmark; subset "auxiliary_train" (split train, ~100K
questions from other MC datasets) is training data.

Data: HF `cais/mmlu` or local files mmlu/<subset>/<split>.jsonl (or parquet) under data_dir.
"""

from tasks.common import DatasetTask
from tasks.answers import extract_choice_letter, letters_for, render_mc
from tasks.records import default_data_dir, load_records, local_candidates


class MMLU(DatasetTask):

    def __init__(self, subset="all", split="test", data_dir=None, shuffle_seed=42, **slice_kwargs):
        allowed = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}
        if subset not in allowed:
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        if split not in allowed[subset]:
            raise ValueError(f"MMLU subset {subset!r} has splits {allowed[subset]}, got {split!r}")
        records = load_records("cais/mmlu", subset, split, local_dir=default_data_dir(data_dir),
                               local_files=local_candidates(f"mmlu/{subset}", split))
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.subset, self.split = subset, split

    @property
    def eval_type(self):
        return "categorical"

    def get_example(self, index):
        row = self.record(index)
        if "train" in row and isinstance(row["train"], dict):  # some copies of auxiliary_train nest each row
            row = row["train"]
        letters = letters_for(len(row["choices"]))
        answer = letters[int(row["answer"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
            "answer": answer,
            "subject": row.get("subject", ""),
        }

    def evaluate(self, conversation, assistant_response):
        return int(extract_choice_letter(assistant_response, conversation["letters"]) == conversation["answer"])
