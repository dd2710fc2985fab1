"""
Where tokenizer training text comes from: the train split of the parquet shards, or a local .jsonl /
plain-text file, cut into documents of bounded size and stopped after a character budget. Used by
scripts/tok_train.py and, for its PyPI rustbpe reference, scripts/tok_eval.py.
"""

import json
import time

from nanochat.common import print0


def iter_input_file(path, doc_cap):
    """Documents from a .jsonl file (a "text" field or a bare string per line) or, for any other
    file, consecutive runs of whole lines of about doc_cap characters."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from e
                text = record.get("text") if isinstance(record, dict) else record
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_number}: expected a string or an object with a string 'text'")
                yield text
    else:
        with open(path, encoding="utf-8") as f:
            lines, size = [], 0
            for line in f:
                lines.append(line)
                size += len(line)
                if size >= doc_cap:
                    yield "".join(lines)
                    lines, size = [], 0
            if lines:
                yield "".join(lines)


def iter_shards():
    """Every document of the train split of the parquet shards, in order."""
    from nanochat.dataset import parquets_iter_batched  # imported lazily: only this source needs pyarrow
    for batch in parquets_iter_batched(split="train"):
        yield from batch


def capped_texts(documents, max_chars, doc_cap, progress_every=200_000_000):
    """Each document cut to doc_cap characters, stopping once max_chars have been yielded."""
    total, next_report, t0 = 0, progress_every, time.time()
    for doc in documents:
        doc = doc[:doc_cap]
        total += len(doc)
        yield doc
        if total >= next_report:
            print0(f"  read {total / 1e6:,.0f}M chars ({total / 1e6 / (time.time() - t0):.1f}M chars/s)")
            next_report += progress_every
        if total >= max_chars:
            return
