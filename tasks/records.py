"""
Loading a task's records: local files first (JSON / JSONL / JSONL.GZ / parquet with the Hugging Face field
names, under data_dir or the NANOCHAT_TASK_DATA environment variable), otherwise the Hugging Face hub via
`datasets`. When neither works, DataNotFoundError says how to provide the data.
"""

import glob
import gzip
import json
import os

from nanochat.common import UserInputError

DATA_DIR_ENV = "NANOCHAT_TASK_DATA"


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
