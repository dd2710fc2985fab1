"""
ARC (Clark et al. 2018, AI2 Reasoning Challenge): grade-school science multiple choice, in an Easy and a
Challenge set. Categorical: the model answers with one of conversation["letters"].

Data: HF `allenai/ai2_arc` (subset "ARC-Easy" / "ARC-Challenge", splits train/validation/test) or local
files arc/<subset>/<split>.jsonl (or parquet) under data_dir.
"""

from tasks.common import DatasetTask
from tasks.answers import extract_choice_letter, letters_for, render_mc
from tasks.records import default_data_dir, load_records, local_candidates

SUBSETS = ("ARC-Easy", "ARC-Challenge")


class ARC(DatasetTask):

    def __init__(self, subset="ARC-Easy", split="train", data_dir=None, shuffle_seed=42, **slice_kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train/validation/test, got {split!r}")
        records = load_records("allenai/ai2_arc", subset, split, local_dir=default_data_dir(data_dir),
                               local_files=local_candidates(f"arc/{subset}", split))
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.subset, self.split = subset, split

    @property
    def eval_type(self):
        return "categorical"

    def get_example(self, index):
        row = self.record(index)
        choices, labels = row["choices"]["text"], row["choices"]["label"]
        # a few ARC questions label their choices 1-4 instead of A-D; we always show letters
        letters = letters_for(len(choices))
        if row["answerKey"] not in labels:
            raise ValueError(f"ARC record {row.get('id')}: answerKey {row['answerKey']!r} not among labels {labels}")
        answer = letters[labels.index(row["answerKey"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, choices)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
            "answer": answer,
        }

    def evaluate(self, conversation, assistant_response):
        return int(extract_choice_letter(assistant_response, conversation["letters"]) == conversation["answer"])
