"""
Benchmark of BPE training: our nanochat.rustbpe vs PyPI rustbpe vs Hugging Face `tokenizers`,
all with the same split regex and vocab size on the same corpus, plus tiktoken encode throughput
with the vocabulary we trained. Results and the command used live in dev/bench_tokenizer.md.

The corpus is built offline from text every machine with Python has: the docstrings and other
long string constants of the Python standard library and the installed packages (read with ast,
so no code is executed) and the licence texts in /usr/share/common-licenses. The unique documents
are shuffled and repeated pass after pass (a fresh shuffle each pass) until the target size.

    python -m dev.bench_tokenizer                    # 50 MB, vocab 32768
    python -m dev.bench_tokenizer --mb 5 --vocab_size 4096 --skip_hf   # a quick look
"""

import argparse
import ast
import glob
import json
import os
import random
import site
import sysconfig
import time

MIN_STRING_CHARS = 64  # shorter constants are mostly identifiers, format strings and messages


def _string_constants(path):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return []
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= MIN_STRING_CHARS:
            try:
                node.value.encode("utf-8")  # lone surrogates (from escapes) are not text
            except UnicodeEncodeError:
                continue
            texts.append(node.value)
    return texts


def collect_documents(max_unique_mb=None):
    """Unique documents: Python string constants (stdlib first, then site-packages) and licences."""
    seen, docs, total = set(), [], 0
    roots = [sysconfig.get_paths()["stdlib"]] + site.getsitepackages()
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
            for text in _string_constants(path):
                if text not in seen:
                    seen.add(text)
                    docs.append(text)
                    total += len(text.encode("utf-8"))
            if max_unique_mb and total >= max_unique_mb * 1e6:
                break
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for paragraph in f.read().split("\n\n"):
                    if len(paragraph) >= MIN_STRING_CHARS and paragraph not in seen:
                        seen.add(paragraph)
                        docs.append(paragraph)
                        total += len(paragraph.encode("utf-8"))
    return docs


def cached_documents(cache_path):
    """collect_documents() is slow (it parses every .py file): keep its result in a JSON file."""
    if cache_path and os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            return json.load(f)
    docs = collect_documents()
    if cache_path:
        os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
        with open(cache_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(docs, f)
        os.replace(cache_path + ".tmp", cache_path)
    return docs


def build_corpus(target_mb, seed=0, cache_path=None):
    unique = cached_documents(cache_path)
    if not unique:
        raise RuntimeError("found no text to build the corpus from")
    rng = random.Random(seed)
    corpus, total = [], 0
    while total < target_mb * 1e6:
        order = list(unique)
        rng.shuffle(order)
        for doc in order:
            corpus.append(doc)
            total += len(doc.encode("utf-8"))
            if total >= target_mb * 1e6:
                break
    unique_bytes = sum(len(d.encode("utf-8")) for d in unique)
    return corpus, {"unique_docs": len(unique), "unique_mb": unique_bytes / 1e6, "docs": len(corpus), "mb": total / 1e6}



# ------------------------------------------------------------------------------ trainers

def train_ours(docs, vocab_size, pattern):
    from nanochat import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    return dict(tok.get_mergeable_ranks()), tok.get_train_stats()


def train_pypi(docs, vocab_size, pattern):
    import rustbpe
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    return dict(tok.get_mergeable_ranks()), {}


def train_hf(docs, vocab_size, pattern):
    """HF byte-level BPE: our split regex (isolated matches), then bytes mapped to printable chars."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(iter(docs), trainer=trainer)
    return tok, {}


def bytes_per_token_tiktoken(ranks, pattern, text):
    import tiktoken
    enc = tiktoken.Encoding(name="bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return len(text.encode("utf-8")) / len(enc.encode_ordinary(text))


def main(argv=None):
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import SPLIT_PATTERN
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB of UTF-8 (default 50)")
    parser.add_argument("--vocab_size", type=int, default=32768, help="vocab size given to every trainer (default 32768)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the corpus passes")
    parser.add_argument("--cache", default=os.path.join(get_base_dir(), "bench", "tokenizer_corpus_docs.json"),
                        help="where the unique documents are cached between runs")
    parser.add_argument("--skip_pypi", action="store_true", help="do not time PyPI rustbpe")
    parser.add_argument("--skip_hf", action="store_true", help="do not time HF tokenizers")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.vocab_size <= 256:
        parser.error("--mb must be positive and --vocab_size above 256")

    t0 = time.time()
    docs, info = build_corpus(args.mb, args.seed, args.cache)
    print(f"corpus: {info['mb']:.1f} MB in {info['docs']:,} documents, from {info['unique_docs']:,} unique documents "
          f"({info['unique_mb']:.1f} MB) [{time.time() - t0:.1f}s to load]")
    print(f"vocab_size {args.vocab_size:,}, pattern {SPLIT_PATTERN!r}, {os.cpu_count()} CPUs, "
          f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    held_out = "\n".join(docs[:2000])  # for bytes/token (part of the training text: a sanity check, not a generalization score)

    rows = []
    t = time.time()
    ours_ranks, stats = train_ours(docs, args.vocab_size, SPLIT_PATTERN)
    ours_time = time.time() - t
    rows.append(("ours (nanochat.rustbpe)", ours_time, bytes_per_token_tiktoken(ours_ranks, SPLIT_PATTERN, held_out)))
    print(f"ours: {ours_time:.2f}s (counting {stats['count_seconds']:.2f}s, pair init {stats['pair_init_seconds']:.2f}s, "
          f"merges {stats['merge_seconds']:.2f}s; {stats['unique_chunks']:,.0f} unique chunks)")
    same_as_pypi = None
    if not args.skip_pypi:
        t = time.time()
        pypi_ranks, _ = train_pypi(docs, args.vocab_size, SPLIT_PATTERN)
        rows.append(("PyPI rustbpe 0.1.0", time.time() - t, bytes_per_token_tiktoken(pypi_ranks, SPLIT_PATTERN, held_out)))
        same_as_pypi = pypi_ranks == ours_ranks
        print(f"PyPI rustbpe: {rows[-1][1]:.2f}s; identical merges to ours: {same_as_pypi}")
    if not args.skip_hf:
        t = time.time()
        hf_tok, _ = train_hf(docs, args.vocab_size, SPLIT_PATTERN)
        hf_time = time.time() - t
        n_tokens = sum(len(e.ids) for e in hf_tok.encode_batch([held_out]))
        rows.append(("HF tokenizers BPE", hf_time, len(held_out.encode("utf-8")) / n_tokens))
        print(f"HF tokenizers: {hf_time:.2f}s (vocab {hf_tok.get_vocab_size():,})")

    # tiktoken encode throughput with our vocabulary
    import tiktoken
    enc = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ours_ranks, special_tokens={})
    sample, size = [], 0
    for doc in docs:
        sample.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= 10e6:
            break
    t = time.time()
    for doc in sample:
        enc.encode_ordinary(doc)
    single = size / 1e6 / (time.time() - t)
    threads = os.cpu_count() or 1
    t = time.time()
    enc.encode_ordinary_batch(sample, num_threads=threads)
    batch = size / 1e6 / (time.time() - t)

    print()
    print(f"| trainer | wall time (s) | time / ours | bytes per token |")
    print(f"|---|---:|---:|---:|")
    for name, seconds, bpt in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / ours_time:.2f}x | {bpt:.3f} |")
    print()
    print(f"tiktoken encode with our vocab on {size / 1e6:.1f} MB: {single:.1f} MB/s single thread, "
          f"{batch:.1f} MB/s encode_ordinary_batch(num_threads={threads})")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return {"rows": rows, "identical_to_pypi": same_as_pypi, "encode_mb_s_single": single, "encode_mb_s_batch": batch,
            "corpus": info, "stats": stats}


if __name__ == "__main__":
    main()
