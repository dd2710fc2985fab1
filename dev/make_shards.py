"""
Turn local text into pretraining shards in the same format as the downloaded ones (parquet files
shard_00000.parquet, ... with one `text` column), so every later stage can run offline.

    python -m dev.make_shards notes/ books/*.txt --out_dir ~/.cache/nanochat/base_data
    python -m dev.make_shards data.jsonl --field content --docs_per_shard 50000 --val_docs 2000 --out_dir DIR

Inputs are .txt/.md files (one document per file, per blank-line-separated paragraph, or per line:
--txt_doc), .jsonl files (one document per line, taken from --field), or directories searched
recursively for those. Documents are shuffled with a fixed seed (so the validation shard is a fair
sample), then cut into shards by document count or character count. The last --val_docs documents
form the final shard, which the loader treats as the validation split.
"""

import argparse
import json
import os
import random
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.dataset import HASH_SUFFIX, TEXT_COLUMN, list_parquet_files, record_hash, shard_filename

TEXT_EXTENSIONS = (".txt", ".md")
JSONL_EXTENSIONS = (".jsonl",)


def find_input_files(paths):
    """Expand directories (recursively, sorted) into .txt/.md/.jsonl files; plain files are kept as given."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if name.endswith(TEXT_EXTENSIONS + JSONL_EXTENSIONS):
                        found.append(os.path.join(root, name))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return found


def read_documents(path, field="text", txt_doc="file"):
    """The documents in one input file (list of str; blank ones dropped). Bad JSONL lines raise with
    the file name and line number rather than being skipped silently."""
    if path.endswith(JSONL_EXTENSIONS):
        docs = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
                if not isinstance(record, dict) or field not in record:
                    raise ValueError(f"{path}:{lineno}: no field {field!r} (use --field to choose the text field)")
                if not isinstance(record[field], str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not a string")
                if record[field].strip():
                    docs.append(record[field])
        return docs
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if txt_doc == "file":
        pieces = [text]
    elif txt_doc == "paragraph":
        pieces = [p.strip("\n") for p in text.split("\n\n")]
    elif txt_doc == "line":
        pieces = text.splitlines()
    else:
        raise ValueError(f"txt_doc must be file, paragraph or line, got {txt_doc!r}")
    return [p for p in pieces if p.strip()]


def plan_shards(docs, docs_per_shard=None, chars_per_shard=None, val_docs=0):
    """Split a document list into consecutive shard-sized lists; the last `val_docs` documents (if > 0)
    form their own final shard. Exactly one of docs_per_shard / chars_per_shard must be given."""
    if (docs_per_shard is None) == (chars_per_shard is None):
        raise ValueError("give exactly one of docs_per_shard or chars_per_shard")
    if (docs_per_shard is not None and docs_per_shard < 1) or (chars_per_shard is not None and chars_per_shard < 1):
        raise ValueError("shard size must be >= 1")
    if val_docs < 0:
        raise ValueError(f"val_docs must be >= 0, got {val_docs}")
    if val_docs and val_docs >= len(docs):
        raise ValueError(f"val_docs={val_docs} leaves no training documents out of {len(docs)}")
    train = docs[:len(docs) - val_docs] if val_docs else docs
    shards, current, current_chars = [], [], 0
    for doc in train:
        current.append(doc)
        current_chars += len(doc)
        if (docs_per_shard and len(current) >= docs_per_shard) or (chars_per_shard and current_chars >= chars_per_shard):
            shards.append(current)
            current, current_chars = [], 0
    if current:
        shards.append(current)
    if val_docs:
        shards.append(docs[len(docs) - val_docs:])
    return shards


def write_shard(docs, path, row_group_size=1024):
    """Write one shard atomically (temporary file, then rename) with zstd compression, and record its
    content hash beside it (shard_XXXXX.parquet.sha256), checked whenever the shard is first read."""
    table = pa.table({TEXT_COLUMN: pa.array(docs, type=pa.string())})
    tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp_path, row_group_size=row_group_size, compression="zstd")
        os.replace(tmp_path, path)
        record_hash(path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_shards(docs, out_dir, docs_per_shard=None, chars_per_shard=None, row_group_size=1024, val_docs=0,
                 shuffle_seed=42, overwrite=False, log=print):
    """Shuffle (unless shuffle_seed is None) and write documents as shards into out_dir. Refuses to mix
    with shards already there unless overwrite=True, which deletes them first. Returns the shard paths."""
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError("no non-empty documents to write")
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    if shuffle_seed is not None:
        docs = list(docs)
        random.Random(shuffle_seed).shuffle(docs)
    shards = plan_shards(docs, docs_per_shard, chars_per_shard, val_docs)
    os.makedirs(out_dir, exist_ok=True)
    existing = list_parquet_files(out_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(existing)} shard(s); pick another --out_dir or pass --overwrite")
    for path in existing:
        os.remove(path)
        if os.path.exists(path + HASH_SUFFIX):
            os.remove(path + HASH_SUFFIX)
    if len(shards) < 2:
        log("warning: only one shard was written; it is the validation split and leaves no training data "
            "(use --val_docs or a smaller shard size)")
    paths = []
    for index, shard_docs in enumerate(shards):
        path = os.path.join(out_dir, shard_filename(index))
        write_shard(shard_docs, path, row_group_size)
        paths.append(path)
        split = "val" if index == len(shards) - 1 else "train"
        log(f"{os.path.basename(path)} ({split}): {len(shard_docs)} docs, {sum(map(len, shard_docs)) / 1e6:.2f}M chars, "
            f"{os.path.getsize(path) / 1e6:.2f} MB")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write local text / JSONL files as pretraining parquet shards.")
    parser.add_argument("inputs", nargs="+", help=".txt/.md/.jsonl files or directories of them")
    parser.add_argument("--out_dir", required=True, help="where shard_XXXXX.parquet files go")
    parser.add_argument("--field", default="text", help="JSONL field holding the document text (default: text)")
    parser.add_argument("--txt_doc", choices=["file", "paragraph", "line"], default="file",
                        help="what a document is in a .txt/.md file (default: the whole file)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--docs_per_shard", type=int, default=None, help="documents per shard")
    size.add_argument("--chars_per_shard", type=int, default=None, help="characters per shard (default 250M)")
    parser.add_argument("--row_group_size", type=int, default=1024, help="documents per parquet row group (default 1024)")
    parser.add_argument("--val_docs", type=int, default=0,
                        help="documents in the final (validation) shard; 0 = the last shard as it falls (default)")
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed; -1 keeps the input order (default 42)")
    parser.add_argument("--overwrite", action="store_true", help="delete shards already in --out_dir first")
    args = parser.parse_args(argv)
    if args.docs_per_shard is None and args.chars_per_shard is None:
        args.chars_per_shard = 250_000_000
    t0 = time.time()
    try:
        docs = []
        for path in find_input_files(args.inputs):
            docs.extend(read_documents(path, field=args.field, txt_doc=args.txt_doc))
        print(f"read {len(docs)} documents ({sum(map(len, docs)) / 1e6:.2f}M chars)")
        paths = write_shards(docs, args.out_dir, docs_per_shard=args.docs_per_shard, chars_per_shard=args.chars_per_shard,
                             row_group_size=args.row_group_size, val_docs=args.val_docs,
                             shuffle_seed=None if args.seed == -1 else args.seed, overwrite=args.overwrite)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shard(s) to {args.out_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
