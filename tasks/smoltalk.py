"""
SmolTalk (smol-smoltalk, Hugging Face 2024): general multi-turn chat conversations for SFT / mid-training.
Training only: there is no automatic grading. A leading system message is folded into the first user turn.

Data: HF `HuggingFaceTB/smol-smoltalk` (splits train/test) or local smoltalk/<split>.jsonl (or parquet)
under data_dir, each record with a "messages" list.
"""

from tasks.common import DatasetTask, fold_system_message, validate_messages
from tasks.records import default_data_dir, load_records, local_candidates


class SmolTalk(DatasetTask):

    def __init__(self, split="train", data_dir=None, shuffle_seed=42, **slice_kwargs):
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        records = load_records("HuggingFaceTB/smol-smoltalk", None, split, local_dir=default_data_dir(data_dir),
                               local_files=local_candidates("smoltalk", split))
        super().__init__(records, shuffle_seed=shuffle_seed, **slice_kwargs)
        self.split = split

    @property
    def eval_type(self):
        return "generative"

    def get_example(self, index):
        messages = self.record(index)["messages"]
        validate_messages(messages, where=f"SmolTalk {self.split} row {self.order[index]}")
        return {"messages": fold_system_message(messages)}
