"""
Train the BPE tokenizer on pretraining text and save it to <base dir>/tokenizer, together with
token_bytes.pt (the byte length of every token id, for bits-per-byte).

    python -m scripts.tok_train                                  # train split of the parquet shards
    python -m scripts.tok_train --max_chars 200000000 --vocab_size 8192
    python -m scripts.tok_train --input corpus.jsonl             # {"text": ...} per line (or a JSON string)
    python -m scripts.tok_train --input book.txt                 # plain UTF-8 text
"""

import argparse
import os
import time

from nanochat.common import UserInputError, print0, run_stage
from nanochat.text_sources import capped_texts, iter_input_file, iter_shards
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir, save_token_bytes


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_chars", type=float, default=2e9, help="train on at most this many characters (default 2e9)")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="cut every document to this many characters (default 10000)")
    parser.add_argument("--vocab_size", type=int, default=32768,
                        help=f"vocabulary size including the {len(SPECIAL_TOKENS)} special tokens (default 32768)")
    parser.add_argument("--input", default=None, help="train on this .jsonl / text file instead of the parquet shards")
    parser.add_argument("--out_dir", default=None, help="where to write the tokenizer (default <base dir>/tokenizer)")
    args = parser.parse_args(argv)
    if args.max_chars < 1:
        raise UserInputError(f"--max_chars must be at least 1, got {args.max_chars}")
    if args.doc_cap < 1:
        raise UserInputError(f"--doc_cap must be at least 1, got {args.doc_cap}")
    if args.vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise UserInputError(f"--vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {args.vocab_size}")
    if args.input is not None and not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input {args.input} is not a file")
    args.max_chars = int(args.max_chars)
    return args


def main(argv=None):
    args = get_args(argv)
    out_dir = args.out_dir or get_tokenizer_dir()
    source = iter_input_file(args.input, args.doc_cap) if args.input else iter_shards()
    print0(f"training a {args.vocab_size:,}-token BPE on up to {args.max_chars:,} chars "
           f"(documents capped at {args.doc_cap:,}) from {args.input or 'the train shards'}")
    texts = capped_texts(source, args.max_chars, args.doc_cap)
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
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
    return tokenizer


if __name__ == "__main__":
    run_stage(main)
