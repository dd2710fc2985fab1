"""
Train the BPE tokenizer on pretraining text and save it to <base dir>/tokenizer, together with
token_bytes.pt (the byte length of every token id, for bits-per-byte).

    python -m scripts.tok_train                                  # train split of the parquet shards
    python -m scripts.tok_train --max_chars 200000000 --vocab_size 8192
    python -m scripts.tok_train --input corpus.jsonl             # {"text": ...} per line (or a JSON string)
    python -m scripts.tok_train --input book.txt                 # plain UTF-8 text
"""

import argparse
import json
import os
import sys
import time

from nanochat.common import print0
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir, save_token_bytes


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_chars", type=float, default=2e9, help="train on at most this many characters (default 2e9)")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="cut every document to this many characters (default 10000)")
    parser.add_argument("--vocab_size", type=int, default=32768,
                        help=f"vocabulary size including the {len(SPECIAL_TOKENS)} special tokens (default 32768)")
    parser.add_argument("--input", default=None, help="train on this .jsonl / text file instead of the parquet shards")
    parser.add_argument("--out_dir", default=None, help="where to write the tokenizer (default <base dir>/tokenizer)")
    args = parser.parse_args(argv)
    if args.max_chars < 1:
        parser.error(f"--max_chars must be at least 1, got {args.max_chars}")
    if args.doc_cap < 1:
        parser.error(f"--doc_cap must be at least 1, got {args.doc_cap}")
    if args.vocab_size <= 256 + len(SPECIAL_TOKENS):
        parser.error(f"--vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {args.vocab_size}")
    if args.input is not None and not os.path.isfile(args.input):
        parser.error(f"--input {args.input} is not a file")
    args.max_chars = int(args.max_chars)
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out_dir or get_tokenizer_dir()
    source = iter_input_file(args.input, args.doc_cap) if args.input else iter_shards()
    print0(f"training a {args.vocab_size:,}-token BPE on up to {args.max_chars:,} chars "
           f"(documents capped at {args.doc_cap:,}) from {args.input or 'the train shards'}")
    texts = capped_texts(source, args.max_chars, args.doc_cap)
    t0 = time.time()
    try:
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train_time = time.time() - t0
    stats = tokenizer.train_stats
    print0(f"trained in {train_time:.1f}s: {stats['documents']:,.0f} documents, {stats['bytes'] / 1e6:,.1f} MB, "
           f"{stats['unique_chunks']:,.0f} unique chunks | counting {stats['count_seconds']:.1f}s, "
           f"merging {stats['pair_init_seconds'] + stats['merge_seconds']:.1f}s")

    tokenizer.save(out_dir)
    token_bytes_path = save_token_bytes(tokenizer, out_dir)
    lengths = tokenizer.token_byte_lengths()
    regular = [n for n in lengths if n > 0]
    print0(f"saved to {out_dir} (vocab {tokenizer.get_vocab_size():,}); {os.path.basename(token_bytes_path)}: "
           f"token lengths min {min(regular)}, max {max(regular)}, mean {sum(regular) / len(regular):.2f} bytes")

    sample = "Hello world! The tokenizer was trained on 1,234,567 characters. 안녕하세요 🙂\n\tdef f(x): return x**2"
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample, "round trip failed"
    print0(f"sanity check: {len(sample.encode())} bytes -> {len(ids)} tokens, round trip ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
